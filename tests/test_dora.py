"""DoRA: PEFT DoRA adapters parsed, served batched with LoRA/GraLoRA rows (torch ops and the Triton
kernels) with PEFT's outputs, trained by `loraplex train --use-dora` and loaded by PEFT and our server."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` of the process

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.runtime.adapters.dora import output_rescale, prepare_dora
from loraplex.runtime.adapters.ops import TorchAdapterOps
from loraplex.runtime.adapters.peft_format import AdapterError, AdapterWeights, ModuleDelta
from loraplex.runtime.adapters.registry import AdapterRegistry
from loraplex.runtime.adapters.store import AdapterStore
from loraplex.runtime.adapters.peft_format import BaseShape
from loraplex.runtime.base_model import default_model_dir, load_base_model
from loraplex.runtime.engine import Engine, EngineConfig

from conftest import peft_reference

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 5, 8,", "Hello"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_dora_adapter(targets: list[str], out_dir: Path, seed: int) -> Path:
    """A PEFT DoRA adapter on the default model; magnitudes perturbed so that m / |W + sBA| is not 1."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=targets,
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
            if "lora_magnitude_vector" in name:
                p.mul_(0.8 + 0.4 * torch.rand_like(p))
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def dora_adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora")
    return {"dora_qv": make_dora_adapter(["q_proj", "v_proj"], root / "qv", seed=10),
            "dora_all": make_dora_adapter(ALL, root / "all", seed=11)}


# -- parsing -------------------------------------------------------------------------------------
def _files(d: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((d / "adapter_config.json").read_text()), load_file(str(d / "adapter_model.safetensors"))


def _parse(config: dict, tensors: dict[str, torch.Tensor], tmp_path: Path):
    from loraplex.runtime.adapters.peft_format import parse_adapter
    save_file(tensors, str(tmp_path / "w.safetensors"))
    base = BaseShape(30, {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)})
    return parse_adapter(json.dumps(config).encode(), (tmp_path / "w.safetensors").read_bytes(), base, 64)


def test_dora_parses_and_bad_dora_is_refused_by_name(dora_adapters, tmp_path):
    config, tensors = _files(dora_adapters["dora_qv"])
    adapter = _parse(config, tensors, tmp_path)
    assert adapter.is_dora and len(adapter.modules) == 60
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_magnitude_vector"
    assert torch.equal(adapter.modules[(3, "v_proj")].magnitude, tensors[key])
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(AdapterError, match=r"layers\.3\.self_attn\.v_proj\.lora_magnitude_vector is missing"):
        _parse(config, missing, tmp_path)
    with pytest.raises(AdapterError, match=r"lora_magnitude_vector has shape \[5\], expected \[192\]"):
        _parse(config, {**tensors, key: torch.ones(5)}, tmp_path)
    with pytest.raises(AdapterError, match="without use_dora"):
        _parse({**config, "use_dora": False}, tensors, tmp_path)
    with pytest.raises(AdapterError, match="use_dora must be true or false"):
        _parse({**config, "use_dora": "yes"}, tensors, tmp_path)


# -- math against PEFT's DoRA layer, with a bias (Qwen2 q/k/v have one) ----------------------------
def test_torch_ops_equal_peft_dora_layer_with_bias():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    fin, fout = 32, 24
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(fin, fout, bias=True))
    peft_net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"],
                                              init_lora_weights=False)).eval()
    layer = peft_net.base_model.model.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    x = torch.randn(5, fin)
    expected = peft_net(x).detach()
    m = ModuleDelta(1, layer.lora_A["default"].weight.detach().t().unsqueeze(0).contiguous(),
                    layer.lora_B["default"].weight.detach().t().unsqueeze(0).contiguous(), layer.scaling["default"],
                    magnitude=layer.lora_magnitude_vector["default"].weight.detach().clone())
    adapter = AdapterWeights("LORA", 4, {}, {(0, "q_proj"): m})
    base = layer.base_layer
    ops = TorchAdapterOps(2, {"q_proj": (fin, fout)}, 1, "cpu", torch.float32,
                          base_weight=lambda layer_idx, proj: (base.weight.detach(), base.bias.detach()))
    ops.load(1, adapter)
    y0 = base(x).detach()
    y = y0.clone()
    ops.apply(0, ("q_proj",), x, y, ops.metadata([1, 1, -1, 1, -1]))
    for row in (0, 1, 3):
        assert rel_err(y[row], expected[row]) < 1e-5
    for row in (2, 4):  # rows without the adapter keep the base output
        assert torch.equal(y[row], y0[row])
    assert rel_err(y0[[0, 1, 3]], expected[[0, 1, 3]]) > 1e-2  # the adapter does something


def test_zero_weight_norm_is_refused():
    m = ModuleDelta(1, torch.zeros(1, 4, 2), torch.zeros(1, 2, 3), 1.0, magnitude=torch.ones(3))
    with pytest.raises(AdapterError, match="zero weight norm"):
        output_rescale(m, torch.zeros(3, 4), None)


# -- the Triton kernels (interpreter) against the torch reference -----------------------------------
def _triton_vs_torch():
    from loraplex.kernels.ops import TritonAdapterOps
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}
    g = torch.Generator().manual_seed(0)
    weights = {p: (torch.randn(fout, fin, generator=g) / fin ** 0.5, torch.randn(fout, generator=g))
               for p, (fin, fout) in shapes.items()}

    def adapter(k: int, dora: bool, projections) -> AdapterWeights:
        modules = {}
        for p in projections:
            fin, fout = shapes[p]
            modules[(0, p)] = ModuleDelta(k, torch.randn(k, fin // k, 8, generator=g) / fin ** 0.5,
                                          torch.randn(k, 8, fout // k, generator=g) * 0.3, 0.7,
                                          magnitude=(1 + torch.rand(fout, generator=g)) if dora else None)
        return AdapterWeights("GRALORA" if k > 1 else "LORA", 8 * k, {}, modules)

    adapters = {0: adapter(1, True, ("q_proj", "v_proj")), 1: adapter(1, False, tuple(shapes)),
                2: adapter(2, False, ("q_proj", "k_proj", "o_proj")), 3: adapter(1, True, tuple(shapes))}
    base_weight = lambda layer, proj: weights[proj]
    torch_ops = TorchAdapterOps(4, shapes, 1, "cpu", torch.float32, base_weight=base_weight)
    triton_ops = TritonAdapterOps(4, shapes, 1, "cpu", torch.float32, base_weight=base_weight)
    for slot, a in adapters.items():
        torch_ops.load(slot, a)
        triton_ops.load(slot, a)
    token_slots = [0, 0, 1, -1, 2, 3, 3, 3, 0, -1, 1, 3]
    for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",)):
        x = torch.randn(len(token_slots), 64, generator=g)
        y0 = torch.cat([x @ weights[p][0].T + weights[p][1] for p in group], dim=1)
        y_torch, y_triton = y0.clone(), y0.clone()
        torch_ops.apply(0, group, x, y_torch, torch_ops.metadata(token_slots))
        triton_ops.apply(0, group, x, y_triton, triton_ops.metadata(token_slots))
        assert rel_err(y_triton, y_torch) < 1e-5, group
        for padded in (len(token_slots), 16):  # the CUDA-graph metadata path (fixed buffers, null-slot tiles)
            y_graph = y0.clone()
            triton_ops.apply(0, group, x, y_graph, triton_ops.metadata(token_slots, pad_to=padded))
            assert rel_err(y_graph, y_torch) < 1e-5, (group, padded)
        assert torch.equal(y_triton[[3, 9]], y0[[3, 9]])  # base-only rows untouched
    # the DoRA rows really are rescaled: without the factor, the output differs
    plain = TorchAdapterOps(4, shapes, 1, "cpu", torch.float32)
    plain.load(0, AdapterWeights("LORA", 8, {}, {k: ModuleDelta(m.k, m.A, m.B, m.scale)
                                                for k, m in adapters[0].modules.items()}))
    x = torch.randn(2, 64, generator=g)
    y_dora, y_plain = (torch.cat([x @ weights[p][0].T + weights[p][1] for p in ("q_proj", "k_proj", "v_proj")], 1)
                       for _ in range(2))
    torch_ops.apply(0, ("q_proj", "k_proj", "v_proj"), x, y_dora, torch_ops.metadata([0, 0]))
    plain.apply(0, ("q_proj", "k_proj", "v_proj"), x, y_plain, plain.metadata([0, 0]))
    assert rel_err(y_dora, y_plain) > 1e-2


def test_triton_kernels_equal_torch_ops_in_a_mixed_batch():
    import triton.language as tl
    if type(tl.zeros).__name__ == "InterpretedFunction":
        _triton_vs_torch()
        return
    # triton was imported compiled-mode by another test module: run this one test in a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_triton_kernels_equal_torch_ops_in_a_mixed_batch"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


# -- acceptance: a mixed batch on the default model equals PEFT's logits ---------------------------
def test_mixed_batch_with_lora_and_gralora_matches_peft(dora_adapters, peft_adapters, tmp_path):
    base = load_base_model(None, dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig(max_gpu_adapters=6, kv_cache_tokens=2048, merge_policy="off"))
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), BaseShape(base.num_layers, base.projection_shapes))
    dirs = {**dora_adapters, "lora": peft_adapters["lora"], "gralora": peft_adapters["gralora"]}
    refs = {}
    for kind, d in dirs.items():
        registry.upload(kind, (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes())
        refs[kind] = registry.resolve(kind)
    rows = [("dora_qv", PROMPTS[0]), ("lora", PROMPTS[1]), ("dora_all", PROMPTS[2]), (None, PROMPTS[3]),
            ("gralora", PROMPTS[4]), ("dora_qv", PROMPTS[3]), ("dora_all", PROMPTS[0])]
    tok = base.tokenizer
    got = engine.score([(tok(p)["input_ids"], refs[k] if k else None) for k, p in rows])
    base_model = peft_reference(None)
    references = {kind: peft_reference(dirs[kind] if kind else None) for kind in {k for k, _ in rows}}
    for (kind, prompt), logits in zip(rows, got):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            expected = references[kind](ids).logits[0]
            base_only = base_model(ids).logits[0]
        err = rel_err(logits, expected)
        assert err <= 1e-4, f"{kind}: relative error {err:.2e}"
        if kind:
            assert rel_err(base_only, expected) > 1e-3, kind
    # the DoRA factor matters: the same adapters served as plain LoRA are far from PEFT
    for kind in dora_adapters:
        w = refs[kind].weights
        assert max((m.rescale[0].abs().max().item() for m in w.modules.values()), default=0) > 1e-2


# -- NF4 base: the factor comes from the dequantised NF4 weight ------------------------------------
def test_nf4_base_factor_uses_dequantised_weight(dora_adapters, tmp_path):
    import bitsandbytes.functional as bnbf
    base = load_base_model(None, quantization="nf4", dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig(max_gpu_adapters=2, kv_cache_tokens=1024, merge_policy="off"))
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), BaseShape(base.num_layers, base.projection_shapes))
    d = dora_adapters["dora_qv"]
    registry.upload("d", (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes())
    ref = registry.resolve("d")
    engine.prepare_adapter(ref)
    m = ref.weights.modules[(2, "v_proj")]
    fused = base.model.layers[2].self_attn.qkv_proj.base
    dequantised = bnbf.dequantize_4bit(fused.weight.data, fused.weight.quant_state)[576 + 192:]
    assert torch.allclose(m.rescale, output_rescale(m, dequantised, None), atol=1e-6)
    dense = load_file(str(default_model_dir() / "model.safetensors"))["model.layers.2.self_attn.v_proj.weight"]
    assert not torch.allclose(m.rescale, output_rescale(m, dense, None), atol=1e-6)  # not the fp32 weight
    tok = base.tokenizer
    logits = engine.score([(tok(PROMPTS[0])["input_ids"], ref)])[0]
    assert torch.isfinite(logits).all()


# -- trained by loraplex, loaded by PEFT and by our server -------------------------------------------
@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = [{"prompt": f"Add {a} and {b}.", "completion": f" {a + b}"}
            for a, b in ((rng.randint(10, 49), rng.randint(10, 49)) for _ in range(16))]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_train_use_dora_loads_in_peft_and_serves(method, data_file, tmp_path, fp32_server):
    from peft import PeftModel
    from loraplex.trainer.methods import load_model, training_device
    out = tmp_path / method
    steps = "2" if method == "qlora" else "3"
    exe = shutil.which("loraplex", path=str(Path(sys.executable).parent)) or shutil.which("loraplex")
    done = subprocess.run([exe, "train", "--method", method, "--use-dora",
                           "--data", str(data_file), "--output", str(out), "--rank", "4", "--max-steps", steps,
                           "--batch-size", "2", "--max-length", "48", "--lr", "5e-3", "--target-modules", "q_proj",
                           "v_proj"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(str(out / "adapter_model.safetensors")))
    model = PeftModel.from_pretrained(load_model(None, method, training_device(), False), out).eval()
    assert model.peft_config["default"].use_dora
    r = fp32_server.upload(f"trained-dora-{method}", out)
    assert r.status_code == 201, r.text
    assert fp32_server.complete(f"trained-dora-{method}", "Add 12 and 30.", 4)["usage"]["completion_tokens"] > 0
