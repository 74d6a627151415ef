"""`--dtype auto` picks bf16 only where it is fast (CUDA, CPUs with native bf16); the default model is
cached at the GGUF's dequantised precision (fp32), so every dtype is a cast of the same weights."""
from __future__ import annotations

import platform

import pytest
import torch
from safetensors import safe_open

from loraplex.runtime import base_model
from loraplex.runtime.base_model import default_model_dir, load_base_model, resolve_dtype


def test_auto_is_float32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(base_model, "cpu_flags", lambda: {"fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bfloat16_on_a_cpu_with_native_bf16(monkeypatch, flag):
    monkeypatch.setattr(base_model, "cpu_flags", lambda: {"avx2", flag})
    assert resolve_dtype("auto", "cpu") == torch.bfloat16


@pytest.mark.parametrize("native", [False, True])
def test_without_proc_cpuinfo_torch_probes_decide(monkeypatch, native):
    monkeypatch.setattr(base_model, "cpu_flags", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_explicit_dtypes_are_kept(monkeypatch):
    monkeypatch.setattr(base_model, "cpu_flags", lambda: set())
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("float32", "cuda") == torch.float32


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads x86 /proc/cpuinfo")
def test_cpu_flags_are_read_from_proc_cpuinfo():
    assert {"sse2", "fpu"} <= base_model.cpu_flags()


def test_default_model_cache_is_fp32_and_bf16_loads_cast_it():
    path = default_model_dir()
    assert path.name.endswith("-fp32")  # a new folder: a bf16 cache from before is never read as fp32
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
        embed = f.get_tensor("model.embed_tokens.weight")
    fp32 = load_base_model(None, dtype="float32", device="cpu")
    assert torch.equal(fp32.model.embed_tokens.weight, embed)
    del fp32
    bf16 = load_base_model(None, dtype="bfloat16", device="cpu")
    assert torch.equal(bf16.model.embed_tokens.weight, embed.to(torch.bfloat16))


def test_float32_serves_the_ggufs_dequantised_weights_exactly():
    """`--dtype float32` holds the GGUF's own dequantised values (Q4_1 / Q8_0 blocks), not a rounding of them."""
    import gguf
    reader = gguf.GGUFReader(base_model.default_gguf())
    tensors = {t.name: t for t in reader.tensors}

    def dequantised(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    net = load_base_model(None, dtype="float32", device="cpu").model
    inter, kv = net.config.intermediate_size, net.layers[0].self_attn.n_kv * net.layers[0].self_attn.head_dim
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    assert torch.equal(net.layers[0].mlp.down_proj.base.weight, dequantised("blk.0.ffn_down.weight"))
    assert torch.equal(net.layers[29].mlp.gate_up_proj.base.weight[:inter], dequantised("blk.29.ffn_gate.weight"))
    assert torch.equal(net.layers[7].self_attn.qkv_proj.base.weight[-kv:], dequantised("blk.7.attn_v.weight"))
    assert torch.equal(net.embed_tokens.weight, dequantised("token_embd.weight"))
