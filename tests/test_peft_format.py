"""PEFT adapter parsing: the packed representation computes exactly what PEFT's layers compute."""
from __future__ import annotations

import json

import pytest
import torch
from peft import GraloraConfig, LoraConfig, get_peft_model
from safetensors.torch import save
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.runtime.adapters.ops import module_delta
from loraplex.runtime.adapters.peft_format import AdapterError, BaseShape, parse_adapter
from loraplex.runtime.model import projection_shapes

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2)
SHAPE = BaseShape(3, projection_shapes(CFG))
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved(peft_config, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(CFG), peft_config)
    model.save_pretrained(tmp_path)
    return model, (tmp_path / "adapter_config.json").read_bytes(), (tmp_path / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("peft_config", [
    LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False),
    LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
               alpha_pattern={"q_proj": 16}, init_lora_weights=False),
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1], init_lora_weights=False),
    GraloraConfig(r=4, gralora_k=2, alpha=8, target_modules=ALL, init_weights=False),
    GraloraConfig(r=8, gralora_k=4, alpha=8, target_modules=["q_proj", "up_proj"], init_weights=False),
    GraloraConfig(r=4, hybrid_r=2, gralora_k=2, alpha=12, target_modules=["k_proj", "down_proj"], init_weights=False),
], ids=["lora", "rslora-patterns", "layers", "gralora-k2", "gralora-k4", "hybrid"])
def test_module_delta_equals_peft_layer(peft_config, tmp_path):
    model, cfg, weights = saved(peft_config, tmp_path)
    adapter = parse_adapter(cfg, weights, SHAPE, max_rank=64)
    peft_layers = {name: m for name, m in model.named_modules() if hasattr(m, "base_layer") and not hasattr(m.base_layer, "base_layer")}
    assert len(adapter.modules) == len(peft_layers) > 0
    for (layer, proj), delta in adapter.modules.items():
        group = "self_attn" if proj in ALL[:4] else "mlp"
        peft_layer = peft_layers[f"base_model.model.model.layers.{layer}.{group}.{proj}"]
        x = torch.randn(5, SHAPE.projections[proj][0])
        with torch.no_grad():
            expected = peft_layer(x) - peft_layer.base_layer(x)
        torch.testing.assert_close(module_delta(x, delta), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem(tmp_path):
    _, cfg, weights = saved(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), tmp_path)
    other = BaseShape(3, {**SHAPE.projections, "q_proj": (48, 32)})
    with pytest.raises(AdapterError, match=r"lora_A.weight has shape \[4, 32\], expected \[4, 48\]"):
        parse_adapter(cfg, weights, other, 64)
    with pytest.raises(AdapterError, match="layer 2 does not exist"):
        parse_adapter(cfg, weights, BaseShape(2, SHAPE.projections), 64)
    with pytest.raises(AdapterError, match="max-lora-rank 2"):
        parse_adapter(cfg, weights, SHAPE, 2)
    for change, message in [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"peft_type": "IA3"}, "peft_type"), ({"r": 0}, "r must be a positive integer")]:
        with pytest.raises(AdapterError, match=message):
            parse_adapter(json.dumps({**json.loads(cfg), **change}).encode(), weights, SHAPE, 64)
    extra = save({"base_model.model.lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="unexpected tensor"):
        parse_adapter(cfg, extra, SHAPE, 64)
    gcfg = json.dumps({"peft_type": "GRALORA", "r": 6, "gralora_k": 4, "alpha": 8}).encode()
    with pytest.raises(AdapterError, match="must divide r"):
        parse_adapter(gcfg, weights, SHAPE, 64)


def test_owned_buffer_is_kept_and_a_borrowed_one_copied(tmp_path):
    """parse_adapter(owned=True) keeps views of the buffer it is handed (an upload's received bytes: no copy per
    tensor); without `owned` nothing it returns points into the caller's buffer, so writing it later changes
    no adapter."""
    _, cfg, weights = saved(LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False), tmp_path)
    for owned in (True, False):
        buffer = bytearray(weights)
        start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
        adapter = parse_adapter(cfg, buffer, SHAPE, max_rank=64, owned=owned)
        inside = [start <= t.data_ptr() < start + len(buffer) for m in adapter.modules.values() for t in m.tensors()]
        assert all(inside) if owned else not any(inside)
        before = {key: module_delta(torch.ones(1, SHAPE.projections[key[1]][0]), m) for key, m in adapter.modules.items()}
        if not owned:
            buffer[-4096:] = bytes(4096)  # the caller reuses its buffer: the adapter is unchanged
            for key, m in adapter.modules.items():
                torch.testing.assert_close(module_delta(torch.ones(1, SHAPE.projections[key[1]][0]), m), before[key])
    fresh = parse_adapter(cfg, weights, SHAPE, max_rank=64)  # (read-only bytes: one private copy, kept)
    for key, m in fresh.modules.items():
        torch.testing.assert_close(module_delta(torch.ones(1, SHAPE.projections[key[1]][0]), m), before[key])
