"""The fused layer kernels (RMSNorm + residual, rotary + K/V cache write, SiLU-mul) on the CPU
(TRITON_INTERPRET=1) against runtime/model.py's PyTorch reference, and a whole decoder step with them
on against the reference path."""

from triton_interpreter import fresh_process_test, needs_interpreter  # (first: it asks for the interpreter)
import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels.layer_ops import rms_norm, rope_and_cache, silu_and_mul
from loraplex.runtime.model import RMSNorm, rotate

DTYPES = [torch.float32, torch.bfloat16]

test_in_fresh_process = fresh_process_test(__file__)


def close(got, want, dtype):
    # bf16: a rounding step or two apart (the interpreter rounds fp32 -> bf16 its own way, not to nearest)
    tol = 1e-5 if dtype == torch.float32 else 3.2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
    x = torch.randn(5, hidden, generator=g).to(dtype)
    residual = torch.randn(5, hidden, generator=g).to(dtype)
    out, total = rms_norm(x, norm.weight.detach(), norm.eps)
    assert total is x
    close(out, norm(x).detach(), dtype)
    out, total = rms_norm(x, norm.weight.detach(), norm.eps, residual=residual)
    close(total, residual + x, dtype)
    close(out, norm(residual + x).detach(), dtype)
    empty, _ = rms_norm(x[:0], norm.weight.detach(), norm.eps)
    assert empty.shape == (0, hidden)
    wide = torch.full((5, hidden + 32), 9.0, dtype=dtype)  # rows of a wider buffer (a folding matmul's input)
    into, _ = rms_norm(x, norm.weight.detach(), norm.eps, residual=residual, out=wide[:, :hidden])
    assert into.data_ptr() == wide.data_ptr() and (wide[:, hidden:] == 9).all()
    close(wide[:, :hidden], norm(residual + x).detach(), dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 1, 24)])
def test_rope_and_cache_equals_rotate_and_index_put(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(1)
    T, slots = 6, 20
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    angles = torch.rand(T, 1, head_dim // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    slot_mapping = torch.randperm(slots, generator=g)[:T]
    k_cache = torch.full((slots, kv_heads, head_dim), 7.0, dtype=dtype)
    v_cache = k_cache.clone()
    q = rope_and_cache(qkv, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads, head_dim)

    q_ref, k_ref, v_ref = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    close(q, rotate(q_ref.view(T, heads, head_dim), cos, sin), dtype)
    k_want, v_want = torch.full_like(k_cache, 7.0), torch.full_like(v_cache, 7.0)
    k_want[slot_mapping] = rotate(k_ref.reshape(T, kv_heads, head_dim), cos, sin)
    v_want[slot_mapping] = v_ref.reshape(T, kv_heads, head_dim)
    close(k_cache, k_want, dtype)
    assert torch.equal(v_cache, v_want)  # copied, untouched slots kept


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(4, 2 * 80, generator=g) * 3).to(dtype)
    gate, up = gate_up.split(80, dim=-1)
    close(silu_and_mul(gate_up), F.silu(gate) * up, dtype)
    wide = torch.full((4, 80 + 16), 9.0, dtype=dtype)
    silu_and_mul(gate_up, out=wide[:, :80])
    close(wide[:, :80], F.silu(gate) * up, dtype)
    assert (wide[:, 80:] == 9).all()


@needs_interpreter
def test_decoder_with_fused_layer_ops_equals_reference():
    """A prefill and a decode step of a tiny random Llama through the runner's eager path, with the
    fused kernels on and off: same logits (fp32) and the same K/V in the cache."""
    from transformers import LlamaConfig

    from loraplex.runtime.model import CausalLM, StepContext
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(3)
    model = CausalLM(cfg).eval()
    for layer in model.layers:  # norms away from 1, so that a missing weight shows
        with torch.no_grad():
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)

    def run(fused: bool):
        for layer in model.layers:
            layer.self_attn.k_cache = torch.zeros(32, 2, 16)
            layer.self_attn.v_cache = torch.zeros(32, 2, 16)
        ids = torch.tensor([5, 17, 3, 99, 42])
        ctx = StepContext(positions=torch.arange(5), slot_mapping=torch.arange(3, 8), fused_layer_ops=fused)
        from loraplex.runtime.model import PrefillChunk
        ctx.prefills = [PrefillChunk(0, 5, torch.arange(3, 8), None)]
        with torch.no_grad():
            logits = model(ids, ctx)
        caches = [(layer.self_attn.k_cache.clone(), layer.self_attn.v_cache.clone()) for layer in model.layers]
        return logits, caches

    ref_logits, ref_caches = run(False)
    got_logits, got_caches = run(True)
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=1e-4)
    for (k, v), (k_ref, v_ref) in zip(got_caches, ref_caches):
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
