"""The engine with its adapter math forced onto the Triton kernels (interpreted on the CPU) still
matches PEFT per adapter, on a tiny model, in one mixed batch of LoRA/rsLoRA/GraLoRA/hybrid rows."""

from triton_interpreter import fresh_process_test, needs_interpreter  # (first: it asks for the interpreter)
import torch

from loraplex.runtime.adapters.peft_format import BaseShape, parse_adapter
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.sequence import SamplingParams


test_in_fresh_process = fresh_process_test(__file__)


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_configs():
    from peft import GraloraConfig, LoraConfig
    return {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=ALL, init_lora_weights=False),
        "rslora": LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 4}, init_lora_weights=False),
        "gralora": GraloraConfig(r=8, gralora_k=2, alpha=16, target_modules=ALL, init_weights=False),
        "gralora4": GraloraConfig(r=8, gralora_k=4, alpha=16, target_modules=["q_proj", "up_proj"], init_weights=False),
        "hybrid": GraloraConfig(r=8, hybrid_r=4, gralora_k=2, alpha=24, target_modules=["q_proj", "v_proj", "down_proj"],
                                init_weights=False),
        "layers": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], layers_to_transform=[1],
                             init_lora_weights=False),
    }


@needs_interpreter
def test_kernel_path_matches_peft(tiny_model_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    base = load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig(max_gpu_adapters=6, kv_cache_tokens=1024, adapter_ops="triton"))
    assert engine.ops.name == "triton"
    shape = BaseShape(base.num_layers, base.projection_shapes)
    tok = base.tokenizer
    prompts = ["hello there", "the quick brown fox jumps", "a", "numbers 1 2 3 4 5 6"]
    rows, refs = [], {}
    for i, (kind, config) in enumerate(peft_configs().items()):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), config).eval()
        model.save_pretrained(tmp_path / kind)
        adapter = parse_adapter((tmp_path / kind / "adapter_config.json").read_bytes(),
                                (tmp_path / kind / "adapter_model.safetensors").read_bytes(), shape, 64)
        refs[kind] = (AdapterRef(kind, 1, adapter), model)
        rows.append((kind, prompts[i % len(prompts)]))
    rows += [(None, prompts[1]), ("lora", prompts[3])]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    got = engine.score([(tok(p)["input_ids"], refs[k][0] if k else None) for k, p in rows])
    for (kind, prompt), logits in zip(rows, got):
        with torch.no_grad():
            expected = (refs[kind][1] if kind else plain)(torch.tensor([tok(prompt)["input_ids"]])).logits[0]
        err = ((logits - expected).norm() / expected.norm()).item()
        assert err <= 1e-4, f"{kind}: relative error {err:.2e}"

    # generation: the kernel path decodes exactly like the PyTorch reference path
    requests = [(tok(p)["input_ids"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), refs[k][0])
                for k, p in rows if k]
    torch_engine = Engine(base, EngineConfig(max_gpu_adapters=6, kv_cache_tokens=1024, adapter_ops="torch"))
    tokens = lambda results: [[t for o in outs for t in o.token_ids] for outs in results]
    assert tokens(engine.generate(requests)) == tokens(torch_engine.generate(requests))
