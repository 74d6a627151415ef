"""Prefill adapter deltas folded into the base matmul: y = [x | s] @ [W | B]^T.

A prefill-sized NF4 projection dequantises its whole weight into a scratch buffer and runs one dense matmul
(runtime/nf4_linear.py). The expand kernel then reads and rewrites every output row of an adapter's tokens:
for a 2,048-token 8B layer at rank 16 that read-modify-write of y is 352 MB, about 165 of the 259 us the
adapter costs next to the base's ~1.7 ms (H100, bench/lora_kernels.py --prefill-sweep). Folded, the base
matmul computes the delta itself: the scratch weight gets NB * P * RB more columns holding each folded
adapter's scale * B^T (block b, projection p: only the rows of p's outputs, rank columns past the adapter's
own zero), and the input gets as many columns holding each token's shrink result s = x A^T in its own
adapter's block, zeros elsewhere. The product adds s B^T * scale for each token and nothing across adapters;
it costs the K columns (2-3% more FLOPs for qkv at NB=2, rank 16) instead of the expand.

Off by default (DEFAULT_FOLD_BLOCKS; `loraplex serve --fold-prefill-adapters N`): on the 8B trace (H100, 2026-12-07)
every prefill step folded and took more GPU time than with the expand (mixed steps 11.16 s against ~10.0 s), its
logits within bf16 rounding of the expand's. bench/step_host.py --fold-ab (H100, 2026-12-08, per kernel) found why:
every folded input was copied into a new wide buffer (+4.2 ms a 2,048-token step, fixed since: the producer's buffer is
handed over), the fold's partial sums were added up front again (fixed: fold_inputs adds them), and the tile lists
the fold leaves empty still launch their expand and shrink programs. Turn it on only after --fold-ab shows the mixed
steps (decode rows beside a chunk) faster, not only long prefills.

Column c of the extension: block b = c // (P * RB), projection p = c // RB % P, rank index i = c % RB.
Only plain LoRA modules (k == 1, no hybrid part, no DoRA) fold (ops.py picks the slots); a slot of the
launch's null row (no module: k == 0) folds to zeros.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import packed_layout as layout
from .segmented_lora import MAX_FUSED, _pick

FOLD_BLOCKS = 2  # adapters one prefill step folds (its CUDA graph's extension is this many blocks wide)
# what a server folds without --fold-prefill-adapters (TritonAdapterOps.default_fold_blocks): off, see the docstring
DEFAULT_FOLD_BLOCKS = 0
FOLD_MAX_RANK = 64  # the widest block (a launch plan's block rank) that folds
# the extension's columns are padded to a multiple of this (zeros): K = in_features + 128 keeps cuBLAS's K a multiple
# of its tiles. Measured no different from unpadded (H100, bench/results/step_host_fold_8b.json: cuBLAS picks another
# kernel for K = 4,096 + 32, as fast)
FOLD_ALIGN = 128
# the most columns a weight's scratch gets beyond in_features, with any alignment up to FOLD_ALIGN
MAX_FOLD_COLUMNS = -(-FOLD_BLOCKS * MAX_FUSED * FOLD_MAX_RANK // FOLD_ALIGN) * FOLD_ALIGN

# A mixed step folds an adapter when the step has at least FOLD_MIN_STEP_TOKENS tokens (smaller ones run the fused NF4
# kernel, which has no dense weight to extend) and the adapter's segment at least FOLD_MIN_TOKENS and 1/FOLD_SHARE of
# them: its columns cost every token of the step, the expand it saves only its own tokens (break-even near 1/15 of
# the step for qkv at rank 16, an H100's matmul peak against its bandwidth)
FOLD_MIN_STEP_TOKENS = 128
FOLD_SHARE = 8
FOLD_MIN_TOKENS = 64

_K = tl.constexpr(layout.K)
_RANK = tl.constexpr(layout.RANK)
_B_OFFSET = tl.constexpr(layout.B_OFFSET)
_NUM_FIELDS = tl.constexpr(layout.NUM_FIELDS)


def fold_columns(blocks: int, projections: int, block_rank: int, align: int = 1) -> int:
    """Extension columns of a matmul of `projections` folding `blocks` adapters of width block_rank, rounded up to a
    multiple of `align` (zero columns: an aligned K may keep the matmul on its fastest kernels)."""
    return -(-blocks * projections * block_rank // align) * align


def choose_fold_slots(segments: list[tuple[int, int, int]], tokens: int, packed: dict, blocks: int) -> set[int]:
    """Of a step's (start, length, slot) segments, the slots to fold: at most `blocks`, the longest plain-LoRA ones
    (packed: slot -> its PackedAdapter) with a large enough share of the step's `tokens`."""
    if blocks <= 0 or tokens < FOLD_MIN_STEP_TOKENS:
        return set()
    candidates = []
    for _, length, slot in segments:
        p = packed.get(slot)
        if p is None or length < FOLD_MIN_TOKENS or length * FOLD_SHARE < tokens:
            continue
        # (a rank up to the power of two FOLD_MAX_RANK gets a launch plan width up to it)
        if p.ks == {1} and not p.has_general and not p.has_dora and p.block_rank <= FOLD_MAX_RANK:
            candidates.append((length, slot))
    return {slot for _, slot in sorted(candidates, reverse=True)[:blocks]}


def fold_rows(segments: list[tuple[int, int, int]], order: list[int], capacity: int, null_slot: int) -> torch.Tensor:
    """The folded segments' per-token metadata, [2 capacity + FOLD_BLOCKS] int32: each token's fold block (-1: none),
    its row in the step's token order, then the slot of each fold block (null_slot when unused)."""
    rows = np.full(2 * capacity + FOLD_BLOCKS, -1, dtype=np.int32)  # (numpy: host work of every mixed step)
    rows[capacity:2 * capacity] = 0
    slots = sorted({slot for _, _, slot in segments})
    rows[2 * capacity:] = null_slot
    rows[2 * capacity:2 * capacity + len(slots)] = slots
    for start, length, slot in segments:
        tokens = np.asarray(order[start:start + length], dtype=np.int64)
        rows[tokens] = slots.index(slot)
        rows[capacity + tokens] = np.arange(start, start + length, dtype=np.int32)
    return torch.from_numpy(rows)


@triton.jit
def _plain_rank(table_ptr, table_slot_stride, slot, proj):
    """The rank of a plain LoRA module of this slot (0 when it has none, or blocks: those never fold)."""
    entry = table_ptr + slot.to(tl.int64) * table_slot_stride + proj * _NUM_FIELDS
    k = tl.load(entry + _K).to(tl.int32)
    r = tl.load(entry + _RANK).to(tl.int32)
    return tl.where(k == 1, r, 0), entry


@triton.jit
def _fold_inputs_kernel(
    xw_ptr, xw_row_stride, ext_col0, num_tokens,
    token_block_ptr, token_row_ptr,
    partial_ptr, partial_split_stride, partial_row_stride, partial_proj_stride, num_splits,
    table_ptr, table_slot_stride, fold_slots_ptr, num_blocks, proj0, proj1, proj2,
    P: tl.constexpr, RB: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """xw[t, ext_col0 + (b P + p) RB + i] = s of token t through module p of fold block b, or 0 (not its block, or
    b >= num_blocks: padding columns)."""
    b = tl.program_id(1) // P
    p = tl.program_id(1) % P
    slot = tl.load(fold_slots_ptr + b, mask=b < num_blocks, other=0)  # (no token is in a padding block)
    rank, _ = _plain_rank(table_ptr, table_slot_stride, slot, _pick(p, proj0, proj1, proj2))
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    mine = tl.load(token_block_ptr + t, mask=t_mask, other=-1) == b
    rows = tl.load(token_row_ptr + t, mask=t_mask, other=0).to(tl.int64)
    i = tl.arange(0, RB)
    take = mine[:, None] & (i < rank)[None, :]
    v = tl.zeros((BLOCK_T, RB), dtype=tl.float32)
    src = partial_ptr + rows[:, None] * partial_row_stride + p * partial_proj_stride + i[None, :]
    for s in range(0, num_splits):  # (what the shrink wrote for other tokens and past the rank is never read)
        v += tl.load(src + s * partial_split_stride, mask=take, other=0.0)
    dst = xw_ptr + t.to(tl.int64)[:, None] * xw_row_stride + ext_col0 + tl.program_id(1) * RB + i[None, :]
    tl.store(dst, v.to(xw_ptr.dtype.element_ty), mask=t_mask[:, None])


@triton.jit
def _fold_weights_kernel(
    w_ptr, w_row_stride, ext_col0,
    pool_ptr, table_ptr, table_slot_stride, scale_ptr, scale_slot_stride, fold_slots_ptr, num_blocks,
    proj0, proj1, proj2, out0, out1, out2, largest,
    P: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """w[o, ext_col0 + (b P + p) RB + i] = scale * B[i, o - start of p] of fold block b's module p, 0 elsewhere;
    clamped to +-largest (the weight dtype's largest finite value): every other token multiplies these columns by
    zero, and zero times an overflowed inf would be NaN in another request's output. Blocks b >= num_blocks: padding,
    zeros."""
    b = tl.program_id(1) // P
    p = tl.program_id(1) % P
    proj = _pick(p, proj0, proj1, proj2)
    start = _pick(p, 0, out0, out0 + out1)
    width = _pick(p, out0, out1, out2)
    total = out0 + out1 + out2  # (absent projections: 0)
    slot = tl.load(fold_slots_ptr + b, mask=b < num_blocks, other=0)
    rank, entry = _plain_rank(table_ptr, table_slot_stride, slot, proj)
    rank = tl.where(b < num_blocks, rank, 0)
    scale = tl.load(scale_ptr + slot.to(tl.int64) * scale_slot_stride + proj)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = rows - start
    i = tl.arange(0, RB)
    take = ((local >= 0) & (local < width))[:, None] & (i < rank)[None, :]
    b_ptr = pool_ptr + tl.load(entry + _B_OFFSET)  # B [rank, width]: output features contiguous
    v = tl.load(b_ptr + i[None, :] * width + local[:, None], mask=take, other=0.0).to(tl.float32) * scale
    v = tl.minimum(tl.maximum(v, -largest), largest)
    dst = w_ptr + rows.to(tl.int64)[:, None] * w_row_stride + ext_col0 + tl.program_id(1) * RB + i[None, :]
    tl.store(dst, v.to(w_ptr.dtype.element_ty), mask=(rows < total)[:, None])


def _padded(values: list[int], fill: int) -> list[int]:
    return values + [fill] * (MAX_FUSED - len(values))


def fold_inputs(xw: torch.Tensor, in_features: int, token_block: torch.Tensor, token_row: torch.Tensor,
                partials: torch.Tensor, num_splits: int, table: torch.Tensor, fold_slots: torch.Tensor,
                proj_ids: list[int], block_rank: int) -> None:
    """Write the extension columns of xw [T, in_features + c], c >= NB P RB a multiple of RB (past NB P RB: zeros);
    xw[:, :in_features] is the input.

    token_block [>= T] int32: each token's fold block or -1; token_row [>= T]: its row in the partial sums
    (its place in the step's token order); partials [>= num_splits, rows, MAX_FUSED, >= RB] fp32, the shrink's;
    table: one layer's module table [slots, projections, NUM_FIELDS]; fold_slots [NB] int32 (null slot: unused).
    """
    T, P = xw.shape[0], len(proj_ids)
    blocks, columns = fold_slots.shape[0], xw.shape[1] - in_features
    assert xw.stride(1) == 1 and columns >= fold_columns(blocks, P, block_rank) and columns % block_rank == 0
    assert partials.stride(3) == 1 and table.stride(1) == layout.NUM_FIELDS
    if T == 0:
        return
    block_t = 32
    p0, p1, p2 = _padded(proj_ids, 0)
    _fold_inputs_kernel[(triton.cdiv(T, block_t), columns // block_rank)](
        xw, xw.stride(0), in_features, T, token_block, token_row,
        partials, partials.stride(0), partials.stride(1), partials.stride(2), num_splits,
        table, table.stride(0), fold_slots, blocks, p0, p1, p2,
        P=P, RB=block_rank, BLOCK_T=block_t, num_warps=4)


def fold_weights(w: torch.Tensor, in_features: int, pool: torch.Tensor, table: torch.Tensor, scales: torch.Tensor,
                 fold_slots: torch.Tensor, proj_ids: list[int], out_features: list[int], block_rank: int) -> None:
    """Write the extension columns of the scratch weight w [sum(out_features), in_features + c] (c as for fold_inputs).

    scales: one layer's [slots, projections] fp32; the rest as for fold_inputs."""
    P, blocks, columns = len(proj_ids), fold_slots.shape[0], w.shape[1] - in_features
    assert w.stride(1) == 1 and w.shape[0] == sum(out_features) and columns % block_rank == 0
    assert columns >= fold_columns(blocks, P, block_rank)
    assert scales.stride(1) == 1 and table.stride(1) == layout.NUM_FIELDS
    block_n = 64
    p0, p1, p2 = _padded(proj_ids, 0)
    o0, o1, o2 = _padded(out_features, 0)
    _fold_weights_kernel[(triton.cdiv(w.shape[0], block_n), columns // block_rank)](
        w, w.stride(0), in_features, pool, table, table.stride(0), scales, scales.stride(0), fold_slots, blocks,
        p0, p1, p2, o0, o1, o2, torch.finfo(w.dtype).max, P=P, RB=block_rank, BLOCK_N=block_n, num_warps=4)


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Both kernels once on small inputs against plain PyTorch: None when they agree, else why not (the caller then
    folds nothing: a kernel that fails to build on this device must not take a server down)."""
    try:
        g = torch.Generator().manual_seed(0)
        rank, rb, outs, fin, T = 4, 16, [32, 16], 64, 5
        pool = torch.randn(256, generator=g).to(device, dtype)
        table = torch.zeros(2, 2, layout.NUM_FIELDS, dtype=torch.int64)
        for p in range(2):
            table[0, p, layout.K], table[0, p, layout.RANK], table[0, p, layout.B_OFFSET] = 1, rank, 128 * p
        table, scales = table.to(device), torch.tensor([[0.5, 2.0], [0.0, 0.0]], device=device)
        fold_slots = torch.tensor([1, 0], dtype=torch.int32, device=device)  # block 0 unused (slot 1: no modules)
        w = torch.full((sum(outs), 2 * 2 * rb), float("nan"), dtype=dtype, device=device)
        fold_weights(w, 0, pool, table, scales, fold_slots, [0, 1], outs, rb)
        want = torch.zeros(sum(outs), 2 * 2 * rb, dtype=torch.float32)
        host_pool = pool.float().cpu()
        for p, (start, width) in enumerate(((0, outs[0]), (outs[0], outs[1]))):
            b = host_pool[128 * p:128 * p + rank * width].view(rank, width)
            want[start:start + width, (2 + p) * rb:(2 + p) * rb + rank] = float(scales[0, p]) * b.t()
        partials = torch.randn(1, T, MAX_FUSED, rb, generator=g).to(device)
        token_block = torch.tensor([1, -1, 1, 0, 1], dtype=torch.int32, device=device)
        token_row = torch.tensor([4, 0, 3, 1, 0], dtype=torch.int32, device=device)
        xw = torch.full((T, fin + 2 * 2 * rb), float("nan"), dtype=dtype, device=device)
        fold_inputs(xw, fin, token_block, token_row, partials, 1, table, fold_slots, [0, 1], rb)
        want_x = torch.zeros(T, 2 * 2 * rb)
        for t in (0, 2, 4):
            for p in range(2):
                want_x[t, (2 + p) * rb:(2 + p) * rb + rank] = partials[0, token_row[t].item(), p, :rank].cpu()
        for name, got, ref in (("fold_weights", w, want), ("fold_inputs", xw[:, fin:], want_x)):
            if not torch.allclose(got.float().cpu(), ref, rtol=2e-2, atol=1e-2):
                return f"{name} differs from PyTorch"
        return None
    except Exception as e:  # noqa: BLE001 - any build or launch failure means: do not fold
        return f"{type(e).__name__}: {e}"
