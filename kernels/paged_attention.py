"""Paged attention (Triton): queries attend to K/V read straight from the paged cache, with GQA.

Cache layout: k_cache, v_cache [num_blocks * block_size, n_kv_heads, head_dim]; position p of
sequence b lives in slot block_tables[b, p // block_size] * block_size + p % block_size.
Queries of B sequences are packed [T, H, D]; sequence b owns rows query_start[b]:query_start[b+1]
(n_b of them), has context_lens[b] tokens cached (this step's included), and its i-th query sits at
position context_lens[b] - n_b + i: it attends to the cached positions <= its own (and
> pos - sliding_window with a window, Mistral-style).

One kernel, two launch shapes. A program owns one KV head and a tile of BLOCK_M rows, each row a
(query token, query head of that KV head's group) pair, so every K/V tile is read once per KV
head and feeds the G query heads of its group through tl.dot. It runs an online softmax (exp2,
fp32 statistics and accumulator) over tiles of BLOCK_N cache positions, gathering each position's
slot from the block table, so block_size and BLOCK_N are independent. Tiles that every row sees
whole skip the causal / window mask; only the edge tiles are masked.
  decode (max_query_len == 1): grid (B, KV, splits), rows = the G heads of one query.
  prefill / mixed: grid (T // BLOCK_Q + B, KV) over query tiles of BLOCK_Q = BLOCK_M // G tokens;
    a program finds its sequence by binary search over query_start (vLLM's trick: the tiles of
    sequence b start at query_start[b] // BLOCK_Q + b, which bounds the grid without host syncs).

Split-K (flash-decoding), decode only: with few (sequence, KV head) pairs the grid cannot fill the
GPU, so each pair's context is cut into `splits` equal runs of tiles (by its actual length, read
on the device), each program writes a normalised partial output and its log-sum-exp, and a second
small kernel merges them. Splits cost a second launch and a [B, H, splits, D] fp32 round trip, so
they are used only when B * KV programs are fewer than the SMs (see `choose_splits`);
`num_splits` overrides it. Prefill has enough query tiles to fill the GPU and never splits.

CUDA graphs: shapes depend only on q, block_tables and the host ints passed in; nothing reads a
device value on the host. Rows of a sequence with context 0 get zeros (padding rows of a graph
bucket: context_lens 0, one row each); sequences with n_b = 0 write nothing, nor do rows past
query_start[B].

Constraints: block_size a power of two (any BLOCK_N works with it); any head_dim (padded to a power
of two inside; tuned for 64 and 128); H a multiple of KV; the last dimension of q, out and the
caches contiguous (q and out may be strided views otherwise). Mixed batches (decode rows and
prefill chunks) work in one prefill launch; there a sequence with one query runs the decode launch's
tile (DECODE_M rows, G of them its heads) instead of BLOCK_M rows of which it fills G: on the 8B shape
a mixed graph's tile is 128 rows, and each decode row paid 32x its attention's tensor-core work.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .segmented_lora import interpreting

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
NO_WINDOW = 1 << 30  # a window no context reaches


@triton.jit
def _find_sequence(query_start, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first query tile query_start[b] // BLOCK_Q + b is <= tile."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, q_pos, tile_lo, tile_hi,
                  k_base, v_base, table_row, stride_slot, ctx_len, window, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Online softmax over cache tiles [tile_lo, tile_hi). MASKED: apply the causal / window mask
    and guard loads past the context; otherwise every row sees every position of these tiles."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for tile in range(tile_lo, tile_hi):
        k_pos = tile * BLOCK_N + offs_n
        n_ok = k_pos < ctx_len
        if MASKED:
            block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=n_ok, other=0)
        else:
            block = tl.load(table_row + k_pos // BLOCK_SIZE)
        slot_off = (block.to(tl.int64) * BLOCK_SIZE + k_pos % BLOCK_SIZE) * stride_slot
        kt_ptrs = k_base + slot_off[None, :] + offs_d[:, None]  # K^T tile [BLOCK_D, BLOCK_N]
        v_ptrs = v_base + slot_off[:, None] + offs_d[None, :]  # V tile [BLOCK_N, BLOCK_D]
        if MASKED or BLOCK_D != HEAD_DIM:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite, so fully masked rows stay NaN-free
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_query_tile(q_ptr, k_cache, v_cache, out_ptr, part_out, part_lse, block_tables, context_lens, query_start,
                       seq, q_tile, qk_scale, window,
                       stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_kvh, stride_bt,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Query tile `q_tile` (BLOCK_Q tokens x GROUP heads of this program's KV head) of sequence `seq`."""
    kv_head = tl.program_id(1)
    q_first = tl.load(query_start + seq)
    n_q = tl.load(query_start + seq + 1) - q_first
    ctx_len = tl.load(context_lens + seq)

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < n_q)
    q_pos = ctx_len - n_q + tok
    q_rows = (q_first + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(k_cache.dtype.element_ty)

    # Tiles [tile_lo, tile_hi) hold every position some row sees; [full_lo, full_hi) those all see.
    pos_first = ctx_len - n_q + q_tile * BLOCK_Q
    pos_last = ctx_len - n_q + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, n_q) - 1
    tile_lo = tl.maximum(pos_first - window + 1, 0) // BLOCK_N
    tile_hi = tl.cdiv(tl.maximum(pos_last + 1, 0), BLOCK_N)
    full_lo = tl.cdiv(tl.maximum(pos_last - window + 1, 0), BLOCK_N)
    full_hi = tl.maximum(pos_first + 1, 0) // BLOCK_N
    if SPLIT:  # this program's share of the sequence's tiles
        split = tl.program_id(2)
        per_split = tl.cdiv(tile_hi - tile_lo, tl.num_programs(2))
        tile_lo = tl.minimum(tile_lo + split * per_split, tile_hi)
        tile_hi = tl.minimum(tile_lo + per_split, tile_hi)
    mid_lo = tl.minimum(tl.maximum(full_lo, tile_lo), tile_hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, tile_hi), mid_lo)

    k_base = k_cache + kv_head * stride_kvh
    v_base = v_cache + kv_head * stride_kvh
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, tile_lo, mid_lo, k_base, v_base, table_row, stride_slot,
                                  ctx_len, window, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, UPCAST,
                                  PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, mid_lo, mid_hi, k_base, v_base, table_row, stride_slot,
                                  ctx_len, window, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, UPCAST,
                                  PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, mid_hi, tile_hi, k_base, v_base, table_row, stride_slot,
                                  ctx_len, window, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, UPCAST,
                                  PRECISION)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that saw nothing (context 0) give zeros

    if SPLIT:
        num_heads = tl.num_programs(1) * GROUP
        part = (seq.to(tl.int64) * num_heads + head) * tl.num_programs(2) + tl.program_id(2)
        tl.store(part_out + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + part, lse, mask=row_ok)
    else:
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# The batch's sequence count and block-table width change every step: specialising on them (Triton's
# default for integers: ==1, divisible by 16) compiled a new kernel at run time for each combination
# (H200, 1B shape: a 32-request burst's prefill steps took 80 ms instead of 17 ms on a fresh server).
@triton.jit(do_not_specialize=["num_seqs", "window", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache, v_cache, out_ptr, part_out, part_lse,
    block_tables, context_lens, query_start,
    num_seqs, qk_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_kvh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DECODE: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    DECODE_M: tl.constexpr,
):
    # (arguments spelled out: older Triton front ends reject starred arguments in a jit call)
    if DECODE:
        _attend_query_tile(q_ptr, k_cache, v_cache, out_ptr, part_out, part_lse, block_tables, context_lens,
                           query_start, tl.program_id(0), 0, qk_scale, window, stride_qt, stride_qh, stride_ot,
                           stride_oh, stride_slot, stride_kvh, stride_bt, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, 1,
                           BLOCK_N, BLOCK_SIZE, SPLIT, UPCAST, PRECISION)
    else:  # the last tiles (most causal work) start first
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = _find_sequence(query_start, tile, num_seqs, BLOCK_Q)
        q_tile = tile - (tl.load(query_start + seq) // BLOCK_Q + seq)
        n_q = tl.load(query_start + seq + 1) - tl.load(query_start + seq)
        # a decode row of a mixed batch takes a DECODE_M-row tile for its GROUP query heads, not BLOCK_M rows of
        # which GROUP work (8B: 4 of 128, over every cache tile of its context)
        one_query_tile: tl.constexpr = DECODE_M < BLOCK_M
        if q_tile * BLOCK_Q < n_q:  # else a gap tile of the grid, or a sequence without queries
            if one_query_tile and n_q == 1:
                _attend_query_tile(q_ptr, k_cache, v_cache, out_ptr, part_out, part_lse, block_tables, context_lens,
                                   query_start, seq, 0, qk_scale, window, stride_qt, stride_qh, stride_ot,
                                   stride_oh, stride_slot, stride_kvh, stride_bt, GROUP, HEAD_DIM, BLOCK_D, DECODE_M,
                                   1, BLOCK_N, BLOCK_SIZE, False, UPCAST, PRECISION)
            else:
                _attend_query_tile(q_ptr, k_cache, v_cache, out_ptr, part_out, part_lse, block_tables, context_lens,
                                   query_start, seq, q_tile, qk_scale, window, stride_qt, stride_qh, stride_ot,
                                   stride_oh, stride_slot, stride_kvh, stride_bt, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M,
                                   BLOCK_Q, BLOCK_N, BLOCK_SIZE, False, UPCAST, PRECISION)


@triton.jit
def _merge_splits_kernel(out_ptr, part_out, part_lse, query_start, num_splits, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One (sequence, head): the partial outputs weighted by exp2(lse - max lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start + seq)
    if tl.load(query_start + seq + 1) == q_row:
        return
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + splits
    lse = tl.load(part_lse + part, mask=s_ok, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # 0 for empty splits
    o = tl.load(part_out + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(weight, 0)
    merged = tl.sum(weight[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + offs_d, merged.to(out_ptr.dtype.element_ty),
             mask=d_ok)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(num_seqs: int, n_kv_heads: int, max_blocks: int, block_size: int, block_n: int,
                  num_sms: int) -> int:
    """Decode splits from host ints only (graph-safe): none once B * KV programs cover the SMs;
    otherwise enough for about two programs per SM, each with at least two tiles of the longest
    context the block table allows (an actual context shorter than that leaves splits empty,
    which cost one exit and a zero weight in the merge)."""
    programs = num_seqs * n_kv_heads
    if programs >= num_sms:
        return 1
    max_tiles = triton.cdiv(max_blocks * block_size, block_n)
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * num_sms, programs), max_tiles // 2))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float, *,
                    max_query_len: int, sliding_window: int | None = None, out: torch.Tensor | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """Attention of packed queries q [T, H, D] over the paged cache; returns out [T, H, D].

    k_cache, v_cache: [slots, KV, D], H a multiple of KV (GQA), D-contiguous rows; block_tables
    [B, max_blocks] int32; context_lens [B] int32 (tokens cached for b, this step's included);
    query_start [B+1] int32; max_query_len: the largest n_b (host int, no sync); 1 selects the
    decode launch, which reads only the first query of each sequence. num_splits (decode only):
    override the split-K choice. block_size: a power of two.
    """
    T, H, D = q.shape
    KV = k_cache.shape[1]
    B = block_tables.shape[0]
    assert H % KV == 0, "query heads must be a multiple of KV heads"
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == D and k_cache.stride() == v_cache.stride()
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and block_tables.stride(1) == 1
    assert block_size > 0 and block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert context_lens.shape == (B,) and query_start.shape == (B + 1,)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if T == 0 or B == 0:
        return out
    group = H // KV
    block_d = triton.next_power_of_2(D)
    upcast = interpreting()
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"  # tf32 is ignored for bf16/fp16
    window = NO_WINDOW if not sliding_window else int(sliding_window)
    common = dict(GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size, UPCAST=upcast, PRECISION=precision)
    args = (block_tables, context_lens, query_start, B, scale * LOG2E, window,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            block_tables.stride(0))

    if max_query_len == 1:
        block_m = max(16, triton.next_power_of_2(group))
        block_n = max(16, min(128, 8192 // block_d))  # a 16 KiB bf16 K tile
        splits = num_splits or choose_splits(B, KV, block_tables.shape[1], block_size, block_n, _num_sms(q.device))
        splits = max(1, min(splits, MAX_SPLITS))
        if splits == 1:
            _paged_attention_kernel[(B, KV, 1)](
                q, k_cache, v_cache, out, out, out, *args, BLOCK_M=block_m, BLOCK_Q=1, BLOCK_N=block_n,
                DECODE=True, SPLIT=False, DECODE_M=block_m, num_warps=4, num_stages=3, **common)
            return out
        part_out = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        _paged_attention_kernel[(B, KV, splits)](
            q, k_cache, v_cache, out, part_out, part_lse, *args, BLOCK_M=block_m, BLOCK_Q=1, BLOCK_N=block_n,
            DECODE=True, SPLIT=True, DECODE_M=block_m, num_warps=4, num_stages=3, **common)
        _merge_splits_kernel[(B, H)](out, part_out, part_lse, query_start, splits, out.stride(0), out.stride(1),
                                     HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
                                     num_warps=4 if block_d >= 128 else 2)
        return out

    # Prefill / mixed: rows of a tile are BLOCK_Q tokens x G heads; 128 rows once chunks are long. A sequence
    # with one query (a decode row beside prefill chunks) takes the decode launch's smaller tile.
    block_m = min(128, max(16, triton.next_power_of_2(max_query_len * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    block_n = 64 if block_d <= 128 else 32
    grid = (T // block_q + B, KV)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, out, out, *args, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DECODE=False, SPLIT=False, DECODE_M=max(16, triton.next_power_of_2(group)),
        num_warps=8 if block_m >= 128 else 4, num_stages=3, **common)
    return out

