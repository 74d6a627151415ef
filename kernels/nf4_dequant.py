"""A whole NF4 weight to the compute dtype at once: prefill steps dequantise each weight, then one dense matmul.

bitsandbytes' format as kernels/nf4_matmul.py describes it. Each program writes BLOCKS absmax blocks of
consecutive weights: their packed bytes read once, the two nibbles of each byte looked up in the 16 code
values (tl.gather, as the fused matmul does), times the block's absmax (double quantisation: nested code
times nested absmax plus offset), rounded once to the output dtype: w = dtype(code * absmax), exactly as
bitsandbytes' dequantize_4bit computes it. Bound by writing the dense weight (4x the packed bytes):
bitsandbytes' kDequantizeBlockwise ran at 0.44 of an H200's bandwidth in a 1B prefill step
(bench/results/profile_step_prefill_1b.json); runtime/nf4_calibration.py keeps the faster one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_matmul import _block_scale

BLOCKS = 32  # absmax blocks per program: 2,048 weights of a 64-weight blocksize


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, offset_ptr,
                        out_ptr, out_row_stride, blocks_per_row, n_blocks, BLOCKSIZE: tl.constexpr,
                        BLOCKS: tl.constexpr, NESTED: tl.constexpr,
                        NESTED_BLOCKSIZE: tl.constexpr, OFFSET_IN_MEMORY: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per absmax block
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    in_range = blocks < n_blocks
    q = tl.load(packed_ptr + blocks[:, None] * HALF + tl.arange(0, HALF)[None, :], mask=in_range[:, None], other=0,
                eviction_policy="evict_first").to(tl.int32)
    a = tl.load(absmax_ptr + blocks, mask=in_range, other=0)
    if NESTED and OFFSET_IN_MEMORY:
        offset = tl.load(offset_ptr).to(tl.float32)
    scale = _block_scale(a, blocks, in_range, nested_absmax_ptr, nested_code_ptr, offset, NESTED, NESTED_BLOCKSIZE)
    code = tl.load(code_ptr + tl.arange(0, 16)).to(tl.float32)
    nibbles = tl.reshape(tl.join(q >> 4, q & 15), (BLOCKS * BLOCKSIZE,))  # high nibble first: element 2i
    w = tl.reshape(tl.gather(code, nibbles, 0), (BLOCKS, BLOCKSIZE)) * scale[:, None]
    starts = blocks // blocks_per_row * out_row_stride + blocks % blocks_per_row * BLOCKSIZE  # a block is in one row
    tl.store(out_ptr + starts[:, None] + tl.arange(0, BLOCKSIZE)[None, :],
             w.to(out_ptr.dtype.element_ty), mask=in_range[:, None])


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                   out: torch.Tensor, *, nested_absmax: torch.Tensor | None = None,
                   nested_code: torch.Tensor | None = None, nested_blocksize: int = 256,
                   offset: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Write the 4-bit weight held by `packed` (bitsandbytes' storage, out.numel() / 2 bytes) into `out`
    (bf16 / fp16 / fp32): contiguous, or [rows, cols] rows of a wider buffer (stride(1) == 1, cols a multiple of
    the blocksize: lora_fold.py's weight with extension columns). absmax, code, nested_* and offset as for
    nf4_matmul. No host sync."""
    packed = packed.view(torch.uint8)
    n = out.numel()
    strided = out.dim() == 2 and out.stride(1) == 1 and out.shape[1] % blocksize == 0
    if not (out.is_contiguous() or strided) or n % blocksize or packed.numel() * 2 != n \
            or absmax.numel() * blocksize != n:
        raise ValueError(f"packed ({packed.numel()} bytes) / absmax ({absmax.numel()}) do not hold the {n} weights "
                         f"of a contiguous output (or rows of a wider one) in blocks of {blocksize}")
    row, row_stride = (n, n) if out.is_contiguous() else (out.shape[1], out.stride(0))
    if blocksize & (blocksize - 1) or blocksize < 32:
        raise ValueError(f"blocksize {blocksize} must be a power of two >= 32")
    nested = nested_absmax is not None
    if nested != (absmax.dtype == torch.uint8) or (nested and nested_code is None):
        raise ValueError("a uint8 absmax needs nested_absmax and nested_code (and only then)")
    n_blocks = n // blocksize
    blocks = max(1, BLOCKS * 64 // blocksize)  # about 2,048 weights per program whatever the blocksize
    offset_in_memory = isinstance(offset, torch.Tensor)
    _nf4_dequant_kernel[(triton.cdiv(n_blocks, blocks),)](
        packed, absmax, code, nested_absmax if nested else absmax, nested_code if nested else code,
        0.0 if offset_in_memory else float(offset), offset if offset_in_memory else code, out, row_stride,
        max(row // blocksize, 1), n_blocks,
        BLOCKSIZE=blocksize, BLOCKS=blocks, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
        OFFSET_IN_MEMORY=offset_in_memory, num_warps=4)
    return out
