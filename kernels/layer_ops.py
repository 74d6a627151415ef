"""The small elementwise pieces of a decoder layer, fused (CUDA fast path).

A decode step on the GPU is mostly launches: in plain PyTorch an RMSNorm is eight kernels, the rotary
embedding of q and k ten, the K/V cache writes two, SiLU-and-multiply two — about 35 kernels of a few
microseconds each per layer, more time than the layer's NF4 weights take to stream at batch 32
(bench/profile_step.py on the H200). Here they are four launches per layer:
  rms_norm           [residual add +] RMSNorm, one program per token row
  rope_and_cache     rotary embedding of q and k and the K/V cache write, one program per token
  silu_and_mul       silu(gate) * up over the fused gate_up output
Each rounds where the PyTorch reference (runtime/model.py) rounds, so the results equal it up to the
order of a sum (and rsqrt's approximation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, N, eps,
                     stride_x, stride_r, stride_o, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # x + residual, rounded to the activation dtype as the reference's add
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # reference: rounded before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(s), s) with s = x (+ residual); x, residual: [T, N]; out: where to write the first ([T, N],
    rows of any stride)."""
    T, N = x.shape
    dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(T, N, dtype=dtype, device=x.device)
    assert out.shape == (T, N) and out.dtype == dtype and out.stride(1) == 1
    total = torch.empty_like(x) if residual is not None else x
    if T:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(T,)](
            x, residual if residual is not None else x, weight, out, total, N, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), total.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out, total


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, dt: tl.constexpr):
    """The reference's x * cos + cat(-x2, x1) * sin, each product and the sum rounded to dtype dt."""
    y1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    return y1, y2


@triton.jit
def _rope_and_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                           stride_t, stride_cos, stride_q, stride_cache_slot,
                           N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                           Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr):
    """One token: all its q heads rotated into q_out, its k heads rotated and v heads copied into the cache
    (one program per token: a program per (token, head) was 64 elements of work, launch-bound in prefill)."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    mask = i < HEAD_DIM // 2
    c1 = tl.load(cos_ptr + t * stride_cos + i, mask=mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_cos + HEAD_DIM // 2 + i, mask=mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_cos + i, mask=mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_cos + HEAD_DIM // 2 + i, mask=mask, other=0.0).to(tl.float32)[None, :]
    dt = qkv_ptr.dtype.element_ty
    row = qkv_ptr + t * stride_t

    hq = tl.arange(0, Q_HEADS)
    mq = (hq < N_HEADS)[:, None] & mask[None, :]
    src = row + hq[:, None] * HEAD_DIM + i[None, :]
    x1 = tl.load(src, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(src + HEAD_DIM // 2, mask=mq, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, c1, c2, s1, s2, dt)
    dst = q_out_ptr + t * stride_q + hq[:, None] * HEAD_DIM + i[None, :]
    tl.store(dst, y1, mask=mq)
    tl.store(dst + HEAD_DIM // 2, y2, mask=mq)

    hk = tl.arange(0, KV_HEADS)
    mk = (hk < N_KV)[:, None] & mask[None, :]
    slot = tl.load(slot_ptr + t)
    src = row + (N_HEADS + hk[:, None]) * HEAD_DIM + i[None, :]
    x1 = tl.load(src, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(src + HEAD_DIM // 2, mask=mk, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, c1, c2, s1, s2, dt)
    kdst = k_cache_ptr + slot * stride_cache_slot + hk[:, None] * HEAD_DIM + i[None, :]
    cache_dt = k_cache_ptr.dtype.element_ty
    tl.store(kdst, y1.to(cache_dt), mask=mk)
    tl.store(kdst + HEAD_DIM // 2, y2.to(cache_dt), mask=mk)
    vsrc = row + (N_HEADS + N_KV + hk[:, None]) * HEAD_DIM + i[None, :]
    vdst = v_cache_ptr + slot * stride_cache_slot + hk[:, None] * HEAD_DIM + i[None, :]
    for half in tl.static_range(2):
        v = tl.load(vsrc + half * (HEAD_DIM // 2), mask=mk, other=0.0)
        tl.store(vdst + half * (HEAD_DIM // 2), v.to(v_cache_ptr.dtype.element_ty), mask=mk)


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, n_heads: int, n_kv: int,
                   head_dim: int) -> torch.Tensor:
    """Rotated q [T, n_heads, head_dim]; rotated k and v written to k_cache/v_cache[slot_mapping].

    qkv: [T, (n_heads + 2 n_kv) * head_dim] (q, k, v side by side); cos, sin: [T, 1, head_dim];
    caches: [num_slots, n_kv, head_dim] contiguous."""
    T = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty(T, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if T:
        half = triton.next_power_of_2(head_dim // 2)
        q_heads = triton.next_power_of_2(n_heads)
        _rope_and_cache_kernel[(T,)](
            qkv, cos, sin, q, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos.stride(0), q.stride(0), k_cache.stride(0),
            N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=head_dim, HALF=half,
            Q_HEADS=q_heads, KV_HEADS=triton.next_power_of_2(n_kv),
            num_warps=max(1, min(8, q_heads * half // 256)))
    return q


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, N, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + N + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)  # reference: F.silu rounds, then the product
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dt), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2N] = (gate, up) side by side -> [T, N] (into out: rows of any stride)."""
    T, N = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(1) == 1
    if out is None:
        out = torch.empty(T, N, dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == (T, N) and out.dtype == gate_up.dtype and out.stride(1) == 1
    if T:
        block = min(1024, triton.next_power_of_2(N))
        _silu_and_mul_kernel[(T, triton.cdiv(N, block))](gate_up, out, N, gate_up.stride(0), out.stride(0),
                                                          BLOCK=block, num_warps=4)
    return out


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the three kernels once on small inputs against plain PyTorch: None when they agree, else why not
    (the caller then keeps the PyTorch path: a kernel that fails to build must not take a server down)."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        T, heads, kv, dim, hidden = 3, 4, 2, 64, 256
        x = torch.randn(T, hidden, generator=g).to(device, dtype)
        r = torch.randn(T, hidden, generator=g).to(device, dtype)
        w = (torch.rand(hidden, generator=g) + 0.5).to(device, dtype)
        out, total = rms_norm(x, w, 1e-5, residual=r)
        s = (x + r).float()
        want = w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        qkv = torch.randn(T, (heads + 2 * kv) * dim, generator=g).to(device, dtype)
        angles = torch.rand(T, 1, dim // 2, generator=g).to(device)
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        k_cache, v_cache = (torch.zeros(8, kv, dim, device=device, dtype=dtype) for _ in range(2))
        q = rope_and_cache(qkv, cos, sin, k_cache, v_cache, torch.tensor([5, 0, 2], device=device),
                           heads, kv, dim)
        q_ref = qkv[:, :heads * dim].view(T, heads, dim)
        q_ref = q_ref * cos + torch.cat((-q_ref[..., dim // 2:], q_ref[..., :dim // 2]), -1) * sin
        gate_up = torch.randn(T, 2 * hidden, generator=g).to(device, dtype)
        mlp = silu_and_mul(gate_up)
        mlp_ref = torch.nn.functional.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
        checks = {"rms_norm": (out, want), "residual": (total, x + r), "rope": (q, q_ref),
                  "v_cache": (v_cache[0], qkv[1, (heads + kv) * dim:].view(kv, dim)), "silu_and_mul": (mlp, mlp_ref)}
        for name, (got, ref) in checks.items():
            err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
            if not err < 0.02:
                return f"{name} differs from PyTorch by {err:.3g} (relative)"
        return None
    except Exception as e:  # noqa: BLE001 - any build or launch failure means: do not use the kernels
        return f"{type(e).__name__}: {e}"
