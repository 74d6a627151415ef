"""DoRA rows' per-output-channel rescale (Triton), run after the expand on the same tiles.

For each tile (one slot's rows) and each column tile of the fused projections, a module whose
table row has a DORA_OFFSET reads its [2, out] rescale piece (g, c; see runtime/adapters/dora.py)
from the pool and rewrites y = (1 + g) * y + c on the tile's rows, where y already holds
base + delta. Tiles of other slots (LoRA, GraLoRA, the null slot) exit at once, so their rows
are untouched; each element has one writer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import packed_layout as layout
from .tile_config import TileConfig

_DORA_OFFSET = tl.constexpr(layout.DORA_OFFSET)
_NUM_FIELDS = tl.constexpr(layout.NUM_FIELDS)


@triton.jit
def _rescale_kernel(
    y_ptr, y_row_stride, token_order_ptr, tiles_ptr, pool_ptr, table_ptr, table_slot_stride,
    proj0, proj1, proj2, out0, out1, out2, y_col1, y_col2, tile_start1, tile_start2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    col_tile = tl.program_id(1)
    p = (col_tile >= tile_start1).to(tl.int32) + (col_tile >= tile_start2).to(tl.int32)
    local_tile = col_tile - tl.where(p == 0, 0, tl.where(p == 1, tile_start1, tile_start2))
    out_features = tl.where(p == 0, out0, tl.where(p == 1, out1, out2))
    y_col0 = tl.where(p == 0, 0, tl.where(p == 1, y_col1, y_col2))
    proj = tl.where(p == 0, proj0, tl.where(p == 1, proj1, proj2))

    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    rows = tl.load(tiles_ptr + tile * 3 + 1) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(tiles_ptr + tile * 3 + 2)
    offset = tl.load(table_ptr + slot.to(tl.int64) * table_slot_stride + proj * _NUM_FIELDS + _DORA_OFFSET)
    if offset == 0:
        return
    tokens = tl.load(token_order_ptr + rows, mask=row_mask, other=0)
    cols = local_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features
    g = tl.load(pool_ptr + offset + cols, mask=col_mask, other=0.0).to(tl.float32)
    c = tl.load(pool_ptr + offset + out_features + cols, mask=col_mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + tokens[:, None] * y_row_stride + (y_col0 + cols)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + g[None, :] * y + c[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


def dora_rescale(y: torch.Tensor, token_order: torch.Tensor, tiles: torch.Tensor, pool: torch.Tensor,
                 table: torch.Tensor, proj_ids: list[int], out_features: list[int], cfg: TileConfig) -> None:
    """y[token, cols of p] = (1 + g) * y + c for the rows of DoRA modules (table: one layer's rows)."""
    assert y.stride(1) == 1 and table.stride(1) == layout.NUM_FIELDS
    col_tiles = [triton.cdiv(out, cfg.block_n) for out in out_features]
    starts = [sum(col_tiles[:i]) for i in range(1, len(col_tiles))] + [1 << 30] * 2
    y_cols = [sum(out_features[:i]) for i in range(1, len(out_features))] + [0, 0]
    pad = 3 - len(proj_ids)
    p0, p1, p2 = proj_ids + [0] * pad
    o0, o1, o2 = out_features + [1] * pad
    _rescale_kernel[(tiles.shape[0], sum(col_tiles))](
        y, y.stride(0), token_order, tiles, pool, table, table.stride(0),
        p0, p1, p2, o0, o1, o2, y_cols[0], y_cols[1], starts[0], starts[1],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
    )
