"""Segmented block-LoRA shrink and expand kernels (Triton): LoRA, GraLoRA, hybrid, mixed ranks.

A step's adapter tokens are grouped by slot; `tiles` [num_tiles, 3] int32 lists (slot, first row,
end row) of each group of at most block_m rows of `token_order` (the rows of one segment); the first
`tile_count` (a device scalar) carry work. Programs on the grid's tile axis loop over those tiles with
a stride of their number, so a CUDA graph whose tile list is padded for the largest step of its bucket
launches as many programs as a typical step fills, not one per padding tile (a 1,024-token mixed step
on 256 sequences had 272 tiles, ~16 busy: the rest cost a launch slot on every program of the grid).
Weights come from the flat pool through the module table of one layer (see packed_layout.py),
so slots of any rank, k and hybrid rank share one launch; a program whose slot has less rank
(or fewer blocks) than the launch's largest exits at once, so nothing is computed on padding
beyond the 16-wide minimum of a tile.

shrink: one program per (tile stride, fused projection p, block n, rank slice of block_r, input split).
  Block n < k is input chunk n through A[n]; block n == k is the hybrid general_A over the whole
  input. The partial sums over the split's input features go to partials[split, row, p, :],
  already permuted for the expand: piece j (width r/k) of block n lands at j*r + n*r/k.
expand: one program per (tile stride, output tile of block_n columns inside one output block j). The
  sum over splits of partials[:, row, p, j*r : j*r+r] times B[j] (plus the hybrid values times
  general_B) is scaled and added into y; each element of y has exactly one writer, so no atomics.
Up to a few tokens per tile, products are summed in registers (tl.dot needs 16 rows).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from . import packed_layout as layout
from .tile_config import TileConfig

MAX_FUSED = 3  # projections sharing one base linear (q, k, v)

_K = tl.constexpr(layout.K)
_RANK = tl.constexpr(layout.RANK)
_GENERAL_RANK = tl.constexpr(layout.GENERAL_RANK)
_A_OFFSET = tl.constexpr(layout.A_OFFSET)
_B_OFFSET = tl.constexpr(layout.B_OFFSET)
_GENERAL_A_OFFSET = tl.constexpr(layout.GENERAL_A_OFFSET)
_GENERAL_B_OFFSET = tl.constexpr(layout.GENERAL_B_OFFSET)
_NUM_FIELDS = tl.constexpr(layout.NUM_FIELDS)


def interpreting() -> bool:
    """Under the interpreter bf16/fp16 tl.dot silently returns garbage: operands go to fp32.

    (The interpreter itself must be chosen before triton is imported: TRITON_INTERPRET=1 then.)
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _wait_for_previous_launch(PDL: tl.constexpr):
    """With programmatic dependent launch, this grid may start before the previous one ends:
    wait for it before touching what it writes. Every program waits, early exits included,
    so this grid never completes before the previous one (the next launch relies on that)."""
    if PDL:
        tl_cuda.gdc_wait()


@triton.jit
def _pick(p, v0, v1, v2):
    return tl.where(p == 0, v0, tl.where(p == 1, v1, v2))


@triton.jit
def _tile_rows(tiles_ptr, token_order_ptr, tile, BLOCK_M: tl.constexpr):
    slot = tl.load(tiles_ptr + tile * 3)
    rows = tl.load(tiles_ptr + tile * 3 + 1) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(tiles_ptr + tile * 3 + 2)
    tokens = tl.load(token_order_ptr + rows, mask=row_mask, other=0)
    return slot, rows, row_mask, tokens


@triton.jit
def _a_tile(a_tiles, chunk, cols, col_mask, k0, k_end, BLOCK_K: tl.constexpr):
    """A[k0 : k0+BLOCK_K, cols] of a block stored [rank, chunk] (input features contiguous)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    return tl.load(a_tiles + cols[None, :] * chunk + kk[:, None], mask=(kk < k_end)[:, None] & col_mask[None, :],
                   other=0.0)


# Integer arguments that change from step to step are not specialised on (== 1, % 16): a prefill
# whose adapters differ in block count or rank would otherwise compile a new variant mid-serving.
@triton.jit(do_not_specialize=["blocks_per_proj", "rank_tiles", "partial_split_stride", "partial_row_stride",
                               "partial_proj_stride"])
def _shrink_kernel(
    x_ptr, x_row_stride, in_features,
    token_order_ptr, tiles_ptr, tile_count_ptr,
    pool_ptr, table_ptr, table_slot_stride,
    proj0, proj1, proj2, blocks_per_proj, rank_tiles,
    partial_ptr, partial_split_stride, partial_row_stride, partial_proj_stride,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ALIGNED: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the next launch may start once every program of this one has started
        tl_cuda.gdc_launch_dependents()
    p = tl.program_id(1) // (blocks_per_proj * rank_tiles)
    n = tl.program_id(1) // rank_tiles % blocks_per_proj
    r0 = tl.program_id(1) % rank_tiles * BLOCK_R
    split = tl.program_id(2)
    proj = _pick(p, proj0, proj1, proj2)
    for tile in range(tl.program_id(0), tl.load(tile_count_ptr), tl.num_programs(0)):
        _shrink_tile(x_ptr, x_row_stride, in_features, token_order_ptr, tiles_ptr, tile, pool_ptr, table_ptr,
                     table_slot_stride, proj, p, n, r0, split, partial_ptr, partial_split_stride, partial_row_stride,
                     partial_proj_stride, BLOCK_M, BLOCK_K, BLOCK_R, ALIGNED, UPCAST, PDL)
    _wait_for_previous_launch(PDL)  # also for programs that had no tile


@triton.jit
def _shrink_tile(x_ptr, x_row_stride, in_features, token_order_ptr, tiles_ptr, tile, pool_ptr, table_ptr,
                 table_slot_stride, proj, p, n, r0, split, partial_ptr, partial_split_stride, partial_row_stride,
                 partial_proj_stride, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 ALIGNED: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    slot, rows, row_mask, tokens = _tile_rows(tiles_ptr, token_order_ptr, tile, BLOCK_M)
    entry = table_ptr + slot.to(tl.int64) * table_slot_stride + proj * _NUM_FIELDS
    k = tl.load(entry + _K).to(tl.int32)
    r = tl.load(entry + _RANK).to(tl.int32)
    hr = tl.load(entry + _GENERAL_RANK).to(tl.int32)
    is_general = n == k
    rank = tl.where(is_general, hr, r)
    if (k != 0) & (n <= k) & (r0 < rank):
        chunk = tl.where(is_general, in_features, in_features // tl.maximum(k, 1))
        x_col0 = tl.where(is_general, 0, n * chunk)
        if ALIGNED:  # every block width is a multiple of 8: lets the compiler emit 16-byte loads
            chunk = tl.multiple_of(chunk, 8)
            x_col0 = tl.multiple_of(x_col0, 8)
        a_base = tl.where(is_general, tl.load(entry + _GENERAL_A_OFFSET),
                          tl.load(entry + _A_OFFSET) + n.to(tl.int64) * r * chunk)
        if ALIGNED:
            a_base = tl.multiple_of(a_base, 8)
        piece = r // tl.maximum(k, 1)

        # Every split writes its partial sums, zeros included, so the expand can add all splits.
        split_len = tl.cdiv(tl.cdiv(chunk, tl.num_programs(2)), BLOCK_K) * BLOCK_K
        k_begin = split * split_len
        k_end = tl.minimum(chunk, k_begin + split_len)

        x_rows = x_ptr + tokens[:, None] * x_row_stride + x_col0
        out_rows = (partial_ptr + split * partial_split_stride + rows[:, None].to(tl.int64) * partial_row_stride
                    + p * partial_proj_stride)
        a_tiles = pool_ptr + a_base
        _wait_for_previous_launch(PDL)  # x and the partials belong to earlier launches
        cols = r0 + tl.arange(0, BLOCK_R)
        col_mask = cols < rank
        if BLOCK_M < 16:
            # A few tokens: tl.dot would pad them to 16 rows and stage tiles through shared memory;
            # multiply-add in registers instead and sum over the input features once at the end.
            acc_k = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_rows + kk[None, :], mask=row_mask[:, None] & (kk < k_end)[None, :], other=0.0)
                at = _a_tile(a_tiles, chunk, cols, col_mask, k0, k_end, BLOCK_K)
                acc_k += xt.to(tl.float32)[:, :, None] * at.to(tl.float32)[None, :, :]
            acc = tl.sum(acc_k, axis=1)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_rows + kk[None, :], mask=row_mask[:, None] & (kk < k_end)[None, :], other=0.0)
                at = _a_tile(a_tiles, chunk, cols, col_mask, k0, k_end, BLOCK_K)
                if UPCAST:
                    acc += tl.dot(xt.to(tl.float32), at.to(tl.float32))
                else:
                    acc += tl.dot(xt, at.to(xt.dtype))
        pos = tl.where(is_general, k * r + cols, (cols // piece) * r + n * piece + cols % piece)
        tl.store(out_rows + pos[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _rank_product(acc, v_rows, v_pos0, rank, num_splits, partial_split_stride, row_mask,
                  b_ptr, b_row_stride, b_cols, col_mask,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """acc += (sum over splits of v[:, v_pos0 : v_pos0+rank]) @ b[:rank, b_cols]."""
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < rank
        b = tl.load(b_ptr + rr[:, None] * b_row_stride + b_cols[None, :],
                    mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        # Weights are never written by a launch: the first tile is read before waiting for the
        # previous launch (a no-op afterwards), so the weight stream starts while that one drains.
        _wait_for_previous_launch(PDL)
        v = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(0, num_splits):
            v += tl.load(v_rows + s * partial_split_stride + (v_pos0 + rr)[None, :],
                         mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        if BLOCK_M < 16:  # a few tokens: no tl.dot (see the shrink)
            acc += tl.sum(v[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        elif UPCAST:
            acc += tl.dot(v, b.to(tl.float32))
        else:
            acc += tl.dot(v.to(b.dtype), b)
    return acc


@triton.jit(do_not_specialize=["tile_start1", "tile_start2", "partial_split_stride", "partial_row_stride",
                               "partial_proj_stride", "num_splits"])
def _expand_kernel(
    y_ptr, y_row_stride,
    token_order_ptr, tiles_ptr, tile_count_ptr,
    pool_ptr, table_ptr, table_slot_stride, scale_ptr, scale_slot_stride,
    proj0, proj1, proj2, out0, out1, out2, y_col1, y_col2, tile_start1, tile_start2,
    partial_ptr, partial_split_stride, partial_row_stride, partial_proj_stride, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DO_BLOCKS: tl.constexpr, DO_GENERAL: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the next launch may start once every program of this one has started
        tl_cuda.gdc_launch_dependents()
    col_tile = tl.program_id(1)
    p = (col_tile >= tile_start1).to(tl.int32) + (col_tile >= tile_start2).to(tl.int32)
    local_tile = col_tile - _pick(p, 0, tile_start1, tile_start2)
    out_features = _pick(p, out0, out1, out2)
    y_col0 = _pick(p, 0, y_col1, y_col2)
    proj = _pick(p, proj0, proj1, proj2)
    for tile in range(tl.program_id(0), tl.load(tile_count_ptr), tl.num_programs(0)):
        _expand_tile(y_ptr, y_row_stride, token_order_ptr, tiles_ptr, tile, pool_ptr, table_ptr, table_slot_stride,
                     scale_ptr, scale_slot_stride, proj, p, local_tile, out_features, y_col0,
                     partial_ptr, partial_split_stride, partial_row_stride, partial_proj_stride, num_splits,
                     BLOCK_M, BLOCK_N, BLOCK_R, DO_BLOCKS, DO_GENERAL, ALIGNED, UPCAST, PDL)
    _wait_for_previous_launch(PDL)  # also for programs that had no tile


@triton.jit
def _expand_tile(y_ptr, y_row_stride, token_order_ptr, tiles_ptr, tile, pool_ptr, table_ptr, table_slot_stride,
                 scale_ptr, scale_slot_stride, proj, p, local_tile, out_features, y_col0,
                 partial_ptr, partial_split_stride, partial_row_stride, partial_proj_stride, num_splits,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 DO_BLOCKS: tl.constexpr, DO_GENERAL: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
                 PDL: tl.constexpr):
    slot, rows, row_mask, tokens = _tile_rows(tiles_ptr, token_order_ptr, tile, BLOCK_M)
    entry = table_ptr + slot.to(tl.int64) * table_slot_stride + proj * _NUM_FIELDS
    k = tl.load(entry + _K).to(tl.int32)
    r = tl.load(entry + _RANK).to(tl.int32)
    hr = tl.load(entry + _GENERAL_RANK).to(tl.int32)
    has_work = k != 0
    if not DO_BLOCKS:
        has_work = has_work & (hr != 0)
    block_out = out_features // tl.maximum(k, 1)
    tiles_per_block = tl.cdiv(block_out, BLOCK_N)
    j = local_tile // tiles_per_block
    if has_work & (j < k):
        width = out_features
        y_col = y_col0
        if ALIGNED:  # every block width is a multiple of 8: lets the compiler emit 16-byte loads
            width = tl.multiple_of(width, 8)
            block_out = tl.multiple_of(block_out, 8)
            y_col = tl.multiple_of(y_col, 8)
        block_cols = (local_tile % tiles_per_block) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = block_cols < block_out
        cols = j * block_out + block_cols

        v_rows = partial_ptr + rows[:, None].to(tl.int64) * partial_row_stride + p * partial_proj_stride
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if DO_BLOCKS:
            b_base = tl.load(entry + _B_OFFSET) + j.to(tl.int64) * r * block_out
            if ALIGNED:
                b_base = tl.multiple_of(b_base, 8)
            acc = _rank_product(acc, v_rows, j * r, r, num_splits, partial_split_stride, row_mask,
                                pool_ptr + b_base, block_out, block_cols, col_mask, BLOCK_M, BLOCK_R, UPCAST, PDL)
        if DO_GENERAL:
            g_base = tl.multiple_of(tl.load(entry + _GENERAL_B_OFFSET), 64)  # pool pieces are 64-aligned
            acc = _rank_product(acc, v_rows, k * r, hr, num_splits, partial_split_stride, row_mask,
                                pool_ptr + g_base, width, cols, col_mask, BLOCK_M, BLOCK_R, UPCAST, PDL)
        _wait_for_previous_launch(PDL)  # y belongs to earlier launches (a no-op if a rank tile waited)

        scale = tl.load(scale_ptr + slot.to(tl.int64) * scale_slot_stride + proj)
        y_ptrs = y_ptr + tokens[:, None] * y_row_stride + (y_col + cols)[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        old = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (old.to(tl.float32) + scale * acc).to(y_ptr.dtype.element_ty), mask=mask)


def _padded(values: list[int], fill: int) -> list[int]:
    return values + [fill] * (MAX_FUSED - len(values))


def shrink(x: torch.Tensor, token_order: torch.Tensor, tiles: torch.Tensor, tile_count: torch.Tensor,
           grid_tiles: int, pool: torch.Tensor, table: torch.Tensor, proj_ids: list[int], blocks_per_proj: int,
           rank_tiles: int, partials: torch.Tensor, num_splits: int, cfg: TileConfig, aligned: bool = False,
           pdl: bool = False) -> None:
    """partials[split, row, p, :] = split's share of x[token_order[row]] through module p's A blocks.

    tile_count: int32 device scalar, the leading tiles that carry work; grid_tiles: programs over them.
    table: [num_slots, num_projections, NUM_FIELDS] int64 rows of one layer (any slot stride);
    partials: [>= num_splits, N, MAX_FUSED, width] float32.
    aligned: promise that in_features / k is a multiple of 8 for every k in use (faster loads).
    pdl: programmatic dependent launch (Hopper): overlaps this launch's start with the previous one's end.
    """
    assert x.stride(1) == 1 and table.stride(1) == layout.NUM_FIELDS and partials.is_contiguous()
    grid = (max(grid_tiles, 1), len(proj_ids) * blocks_per_proj * rank_tiles, num_splits)
    p0, p1, p2 = _padded(proj_ids, 0)
    _shrink_kernel[grid](
        x, x.stride(0), x.shape[1],
        token_order, tiles, tile_count,
        pool, table, table.stride(0),
        p0, p1, p2, blocks_per_proj, rank_tiles,
        partials, partials.stride(0), partials.stride(1), partials.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, ALIGNED=aligned, UPCAST=interpreting(),
        PDL=pdl, num_warps=cfg.shrink_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
    )


def expand_tiles(out_features: list[int], max_k: int, block_n: int) -> list[int]:
    """Output tiles per projection: enough for any k <= max_k (each output block starts a tile)."""
    return [triton.cdiv(out, block_n) + max_k - 1 for out in out_features]


def expand(y: torch.Tensor, token_order: torch.Tensor, tiles: torch.Tensor, tile_count: torch.Tensor,
           grid_tiles: int, pool: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, proj_ids: list[int],
           out_features: list[int], max_k: int, partials: torch.Tensor, num_splits: int, cfg: TileConfig,
           blocks: bool = True, general: bool = True, aligned: bool = False, pdl: bool = False) -> None:
    """y[token, cols of p] += scale * partial-sum values through module p's B blocks (and general_B).

    y: [T, sum(out_features)], projections' outputs side by side; scales: [num_slots, num_projections].
    aligned: promise that every out_features / k is a multiple of 8 for every k in use.
    """
    assert y.stride(1) == 1 and scales.stride(1) == 1
    col_tiles = expand_tiles(out_features, max_k, cfg.block_n)
    starts = [sum(col_tiles[:i]) for i in range(1, len(col_tiles))]
    y_cols = [sum(out_features[:i]) for i in range(1, len(out_features))]
    big = 1 << 30  # a tile start no tile reaches: projection absent
    p0, p1, p2 = _padded(proj_ids, 0)
    o0, o1, o2 = _padded(out_features, 1)
    c1, c2 = _padded(y_cols, 0)[:2]
    t1, t2 = (starts + [big, big])[:2]
    grid = (max(grid_tiles, 1), sum(col_tiles))
    _expand_kernel[grid](
        y, y.stride(0),
        token_order, tiles, tile_count,
        pool, table, table.stride(0), scales, scales.stride(0),
        p0, p1, p2, o0, o1, o2, c1, c2, t1, t2,
        partials, partials.stride(0), partials.stride(1), partials.stride(2), num_splits,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        DO_BLOCKS=blocks, DO_GENERAL=general, ALIGNED=aligned, UPCAST=interpreting(),
        PDL=pdl, num_warps=cfg.expand_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
    )
