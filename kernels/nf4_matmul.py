"""Fused NF4-dequantise + matmul for a few token rows (decode), on bitsandbytes' storage as it is.

bitsandbytes' 4-bit format (checked against `bitsandbytes.functional.dequantize_4bit`, 0.50):
- `packed`: uint8, two codes per byte over the row-major [out, in] weight; element 2i is the HIGH
  nibble of byte i, element 2i+1 the low nibble.
- block b = flat element index // blocksize has scale absmax[b] (fp32), or with double quantisation
  (`compress_statistics=True`) absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize]
  + offset, all in fp32.
- w = code[nibble] * absmax[block] in fp32, rounded to the compute dtype.

The kernel streams each weight byte once: program (split, n-tile, m-tile) walks its share of the input
features, per step KB pieces of [BLOCK_N, SUB] packed bytes that each lie inside one absmax block.
A piece's nibbles become the 16-bit codes (kernels/nf4_decode.py: a table gather, or byte permutes of the
table in registers on CUDA), the codes (in the compute dtype) multiply x^T padded to >= 16 columns in tl.dot,
and the [BLOCK_N, BLOCK_M] product is scaled by the block's absmax in fp32 (per output element and block,
not per weight; NF4Tiles.prescale scales the codes before the dot instead). Decode on Hopper is bound by
instruction issue on the decoding, not by tensor cores
(sm90 SASS of the 16-row tile's loop step: 441 warp instructions with the gather, 326 with the permutes, for
8,192 weights), so the cost hardly depends on the row count up to 32.
Split-K (so that out=4096 shapes still start a few programs per SM) writes fp32 partial sums
[splits, M, N] that a second small kernel adds in a fixed order: deterministic, no atomics; on
Hopper that launch overlaps the first one's tail (programmatic dependent launch). With
NF4Tiles.sum_in_kernel the last program of each output tile to store its partial (an acquire-release
count per tile, reset by that program) adds them instead, in the same order: the same bits, one launch.
NF4Tiles.codes_as_b swaps the dot's operands, x [BLOCK_M, k] @ codes^T: x's rows become the wgmma's M
(64 a warpgroup) and the codes its shared-memory operand, so 128 features a program take fewer
instructions a weight than with the codes as the register operand (sm90 SASS of the loop step).
Tile sizes come from kernels/nf4_tiles.py: `choose_tiles` (an explicit rule; @triton.autotune needs a GPU at import);
`candidate_tiles` adds other row steps and a prefetching variant (the next step's bytes and absmax are
loaded before this step's math, against load latency) for the start-up calibration to time.
On Hopper the kernel itself is launched early too (EARLY_LAUNCH): its programs start while the stream's previous
kernel drains and wait for it (griddepcontrol.wait) only before the first read of x.
No host syncs, outputs from torch.empty: CUDA-graph capturable.
Rounding: w = bf16(code) * absmax (fp32) instead of bnb's bf16(code * absmax): the same one rounding
of each weight, at a different place; fp32 inputs use fp32 codes and an fp32 dot (exact weights).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from .nf4_decode import (gather_codes, gather_dot, permute_codes, permute_codes_scaled, permute_dot, permute_dot_scaled,
                         table_words)
from .nf4_tiles import NF4Tiles, choose_tiles, sm_count
from .segmented_lora import interpreting

SUM_BLOCK = 512  # output columns per program of the split-sum kernel


@functools.cache
def _pdl(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


# Hopper: the kernel is launched as a programmatic dependent of the stream's previous kernel, so that its programs
# start, build their code tables and issue their first weight loads while that kernel drains; they wait for it
# (griddepcontrol.wait) before reading x. bench/nf4_matmul.py --pdl-ab turns it off to time the difference.
EARLY_LAUNCH = True

ARRIVALS = 1 << 16  # split-K tiles one call may have in flight: 28,672 features / 64 per tile x 128 rows / 64


@functools.cache
def _arrival_counters(device: torch.device) -> torch.Tensor:
    return torch.zeros(ARRIVALS, dtype=torch.int32, device=device)


def _arrivals(device: torch.device, tiles: int) -> torch.Tensor:
    """Per output tile, how many of its split-K programs have stored their partial sums: zero between calls (the last
    program of each tile resets its count). One buffer per device: the calls on it run one at a time, in one stream
    (the engine's), each finished before the next starts (no programmatic dependent launch on this path)."""
    if tiles > ARRIVALS:
        raise ValueError(f"{tiles} split-K output tiles exceed the {ARRIVALS} arrival counters")
    return _arrival_counters(device)


@triton.jit
def _block_scale(a, blocks, row_mask, nested_absmax_ptr, nested_code_ptr, offset,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The fp32 absmax of each row's block from its stored value `a` (fp32, or uint8 when double-quantised)."""
    if NESTED:
        scale = (tl.load(nested_code_ptr + a.to(tl.int32))
                 * tl.load(nested_absmax_ptr + blocks // NESTED_BLOCKSIZE, mask=row_mask, other=0.0) + offset)
    else:
        scale = a
    return scale


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, offset_ptr,
    bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    M, N, K, row_bytes, stride_xm, stride_om, bytes_per_split,
    BLOCKSIZE: tl.constexpr, SUB: tl.constexpr, KB: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, OFFSET_IN_MEMORY: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SUM_IN_KERNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr, PERMUTE: tl.constexpr, PRESCALE: tl.constexpr, CODES_AS_B: tl.constexpr,
    EARLY: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile over packed bytes [split, split + 1) * bytes_per_split of each weight row.

    A loop step covers BLOCK_K input features as KB pieces of SUB packed bytes (2 * SUB features) per
    weight row, each inside one absmax block: codes @ x^T per piece, then times the piece's absmax.
    """
    if PDL:  # the split-sum launch may start its programs now; they wait for this grid to finish
        tl_cuda.gdc_launch_dependents()
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    m_mask = ms < M
    rows64 = rows.to(tl.int64)
    PACKED_ITEM: tl.constexpr = 4 if PERMUTE else 1  # bytes per loaded element of the packed weight
    if PERMUTE:  # [BLOCK_N, SUB // 4] 32-bit words (row_bytes and the offsets below are multiples of 16)
        packed_rows = (packed_ptr + rows64[:, None] * row_bytes).to(tl.pointer_type(tl.int32)) \
            + tl.arange(0, SUB // 4)[None, :]
    else:
        packed_rows = packed_ptr + rows64[:, None] * row_bytes + tl.arange(0, SUB)[None, :]  # [BLOCK_N, SUB]
    block_rows = rows64 * (K // BLOCKSIZE)
    if CODES_AS_B:  # x's rows past M read row M - 1 (their products are never stored): unmasked loads
        x_rows = x_ptr + tl.minimum(ms, M - 1).to(tl.int64)[:, None] * stride_xm + tl.arange(0, 2 * SUB)[None, :]
    else:
        x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm + tl.arange(0, 2 * SUB)[None, :]  # x [BLOCK_M, 2 * SUB]
    # The 16 code values in the dot's input type. tl.gather reads them from shared memory with a 32-bit
    # address (a global-memory gather costs two more instructions per weight: the kernel is issue-bound).
    if FP32_DOT:  # fp32 inputs, or the interpreter (whose bf16/fp16 tl.dot is wrong)
        code = tl.load(code_ptr + tl.arange(0, 16))
    else:  # bf16(code) @ x, scaled in fp32: the weight rounded once, as dequantize_4bit rounds code * absmax
        code = tl.load(code_ptr + tl.arange(0, 16)).to(x_ptr.dtype.element_ty)
        if PERMUTE:  # the table words per column of the packed words (one register each), not uniform values:
            # ptxas would keep those in uniform registers and copy one to a vector register for every other prmt
            table = table_words(code, (tl.arange(0, SUB // 4) < row_bytes)[None, :])
    if NESTED:
        if OFFSET_IN_MEMORY:
            offset = tl.load(offset_ptr).to(tl.float32)

    if CODES_AS_B:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # loop in bytes of a weight row: bytes_per_split and SUB are multiples of 16 -> 16-byte loads
    byte_begin = split * bytes_per_split
    n_steps = tl.minimum(bytes_per_split, row_bytes - byte_begin) // (BLOCK_K // 2)
    if PREFETCH:  # one piece per step (KB == 1): the next step's bytes and absmax scale load while this one
        # computes, and the stored absmax of the step after it (double quantisation turns it into the scale by two
        # more loads that depend on it: issued a step ahead, their latency hides behind a step's math too)
        q_next = tl.load(packed_rows + byte_begin // PACKED_ITEM, mask=row_mask[:, None], other=0,
                         eviction_policy="evict_first")
        blocks_next = block_rows + (2 * byte_begin) // BLOCKSIZE
        scale_next = _block_scale(tl.load(absmax_ptr + blocks_next, mask=row_mask, other=0), blocks_next, row_mask,
                                  nested_absmax_ptr, nested_code_ptr, offset, NESTED, NESTED_BLOCKSIZE)
        a_after = tl.load(absmax_ptr + block_rows + (2 * (byte_begin + SUB)) // BLOCKSIZE,
                          mask=row_mask & (tl.full(rows.shape, 1, tl.int32) < n_steps), other=0)
    if EARLY:  # launched before the stream's previous kernel finished: everything above reads only the weight and
        # its constants; x (and the buffers stored below) may still be that kernel's, so wait for it here
        tl_cuda.gdc_wait()
    for step in range(n_steps):
        for piece in tl.static_range(KB):
            b0 = byte_begin + step * (BLOCK_K // 2) + piece * SUB
            if PREFETCH:
                q, scale = q_next, scale_next
                ahead = row_mask & (tl.full(rows.shape, step + 1, tl.int32) < n_steps)
                q_next = tl.load(packed_rows + (b0 + SUB) // PACKED_ITEM, mask=ahead[:, None], other=0,
                                 eviction_policy="evict_first")
                blocks_next = block_rows + (2 * (b0 + SUB)) // BLOCKSIZE
                scale_next = _block_scale(a_after, blocks_next, ahead, nested_absmax_ptr, nested_code_ptr, offset,
                                          NESTED, NESTED_BLOCKSIZE)
                two_ahead = row_mask & (tl.full(rows.shape, step + 2, tl.int32) < n_steps)
                a_after = tl.load(absmax_ptr + block_rows + (2 * (b0 + 2 * SUB)) // BLOCKSIZE, mask=two_ahead, other=0)
            else:
                q = tl.load(packed_rows + b0 // PACKED_ITEM, mask=row_mask[:, None], other=0,
                            eviction_policy="evict_first")  # read once: leave L2 to x and partials
                blocks = block_rows + (2 * b0) // BLOCKSIZE
                a = tl.load(absmax_ptr + blocks, mask=row_mask, other=0)
                scale = _block_scale(a, blocks, row_mask, nested_absmax_ptr, nested_code_ptr, offset,
                                     NESTED, NESTED_BLOCKSIZE)
            if CODES_AS_B:
                xr = tl.load(x_rows + 2 * b0)
            else:  # loaded along x's rows (contiguous: 16-byte loads), transposed for the dot
                xt = tl.trans(tl.load(x_rows + 2 * b0, mask=m_mask[:, None], other=0.0))
            if CODES_AS_B:  # acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, 2 * SUB] @ codes^T
                if PRESCALE:
                    acc = tl.dot(xr, tl.trans(permute_codes_scaled(q, table, scale, xr.dtype, BLOCK_N, SUB)), acc)
                elif PERMUTE:
                    acc += tl.dot(xr, tl.trans(permute_codes(q, table, xr.dtype, BLOCK_N, SUB))) * scale[None, :]
                elif FP32_DOT:
                    acc += tl.dot(xr.to(tl.float32), tl.trans(gather_codes(q, code, BLOCK_N, SUB)),
                                  input_precision="ieee") * scale[None, :]
                else:
                    acc += tl.dot(xr, tl.trans(gather_codes(q, code, BLOCK_N, SUB))) * scale[None, :]
            elif PRESCALE:
                acc = permute_dot_scaled(q, table, scale, xt, acc, BLOCK_N, SUB)
            elif PERMUTE:
                acc += permute_dot(q, table, xt, BLOCK_N, SUB) * scale[:, None]
            else:
                acc += gather_dot(q, code, xt, BLOCK_N, SUB, FP32_DOT) * scale[:, None]

    if CODES_AS_B:
        result = acc
    else:
        result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    mask = m_mask[:, None] & row_mask[None, :]
    if SPLIT:
        partials = partial_ptr + (split * M + ms.to(tl.int64))[:, None] * N + rows[None, :]
        if not SUM_IN_KERNEL:
            tl.store(partials, result, mask=mask)
        else:  # the tile's last program to arrive adds all its partial sums, in split order
            tl.store(partials, result, mask=mask, cache_modifier=".cg")
            splits = tl.num_programs(0)
            tile = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
            tl.debug_barrier()  # every thread's partial stored before the arrival is counted (release, GPU scope)
            arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == splits - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(splits):  # from L2 (.cg): other SMs wrote them
                    total += tl.load(partials + (s - split).to(tl.int64) * M * N, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + ms.to(tl.int64)[:, None] * stride_om + rows[None, :],
                         total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(arrivals_ptr + tile, 0)  # zero again for the next call (graph replays included)
    else:
        if HAS_BIAS:
            result += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + ms.to(tl.int64)[:, None] * stride_om + rows[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, M, N, stride_om, splits,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[m, cols] = sum over splits, in split order, of partial[split, m, cols] (+ bias)."""
    if PDL:
        tl_cuda.gdc_wait()
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(partial_ptr + (s * M + m).to(tl.int64) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               blocksize: int, out_features: int, *, nested_absmax: torch.Tensor | None = None,
               nested_code: torch.Tensor | None = None, nested_blocksize: int = 256,
               offset: float | torch.Tensor = 0.0, bias: torch.Tensor | None = None,
               tiles: NF4Tiles | None = None, compile_only: bool = False) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) -> [..., out_features] in x's dtype, W the 4-bit [out, in] weight.

    packed: bitsandbytes' storage of W (any shape/storage dtype, out*in/2 bytes); absmax: fp32 per
    block, or uint8 with nested_absmax (fp32 per nested block), nested_code (256 fp32) and offset
    (float or a 0-d tensor: the QuantState's, no host sync) when double-quantised; code: the 16
    fp32 values of the 4-bit type (QuantState.code). in must be a multiple of blocksize.
    tiles: override the tile rule (benchmark sweeps). compile_only: compile the kernel this call would launch (Triton's
    warmup: under its AsyncCompileMode, in the mode's threads) and return `out` uncomputed.
    """
    in_features = x.shape[-1]
    M, N, K = x.numel() // max(in_features, 1), out_features, in_features
    if K % blocksize or K % 2:
        raise ValueError(f"in_features {K} must be a multiple of the blocksize {blocksize}")
    packed = packed.view(torch.uint8)
    if packed.numel() != N * K // 2 or absmax.numel() != N * K // blocksize:
        raise ValueError(f"packed ({packed.numel()} bytes) / absmax ({absmax.numel()}) do not hold a [{N}, {K}] weight")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, not {x.dtype}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias has {bias.numel()} values for {N} output features")
    nested = nested_absmax is not None
    if nested != (absmax.dtype == torch.uint8) or (nested and nested_code is None):
        raise ValueError("a uint8 absmax needs nested_absmax and nested_code (and only then)")
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    tiles = tiles or choose_tiles(M, N, K, blocksize, sm_count(x.device))
    sub = min(tiles.block_k, blocksize) // 2
    if K % tiles.block_k or tiles.block_k < 32 or tiles.block_k % (2 * sub):
        raise ValueError(f"block_k {tiles.block_k} must be a power of two >= 32 dividing in_features {K}")
    if tiles.prefetch and tiles.block_k > 2 * sub:
        raise ValueError(f"prefetch needs block_k <= blocksize, not {tiles.block_k} > {blocksize}")
    k_tiles = K // tiles.block_k
    k_per_split = triton.cdiv(k_tiles, tiles.splits) * tiles.block_k
    splits = triton.cdiv(K, k_per_split)
    partial_shape = (1,) if compile_only else (splits, M, N)  # (compiling: only its type and alignment count)
    partial = out if splits == 1 else torch.empty(*partial_shape, dtype=torch.float32, device=x.device)
    offset_in_memory = isinstance(offset, torch.Tensor)
    permute = tiles.permute and x.dtype != torch.float32 and not interpreting()
    grid = (splits, triton.cdiv(N, tiles.block_n), triton.cdiv(M, tiles.block_m))
    sum_in_kernel = splits > 1 and tiles.sum_in_kernel
    pdl = splits > 1 and not sum_in_kernel and _pdl(x.device)
    arrivals = _arrivals(x.device, grid[1] * grid[2]) if sum_in_kernel else partial
    early = EARLY_LAUNCH and _pdl(x.device)
    if compile_only and interpreting():
        return out.reshape(*x.shape[:-1], N)
    launch = _nf4_matmul_kernel[grid] if not compile_only else functools.partial(_nf4_matmul_kernel.warmup, grid=grid)
    launch(
        x2, packed, absmax, code,
        nested_absmax if nested else absmax, nested_code if nested else code,
        0.0 if offset_in_memory else float(offset), offset if offset_in_memory else code,
        bias if bias is not None else code, out, partial, arrivals,
        M, N, K, K // 2, x2.stride(0), out.stride(0), k_per_split // 2,
        BLOCKSIZE=blocksize, SUB=sub, KB=tiles.block_k // (2 * sub),
        NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize, OFFSET_IN_MEMORY=offset_in_memory,
        HAS_BIAS=bias is not None, SPLIT=splits > 1, SUM_IN_KERNEL=sum_in_kernel,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        FP32_DOT=x.dtype == torch.float32 or interpreting(), PDL=pdl, PREFETCH=tiles.prefetch,
        PERMUTE=permute, PRESCALE=permute and tiles.prescale, CODES_AS_B=tiles.codes_as_b, EARLY=early,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **({"launch_pdl": True} if early else {}),
    )
    if splits > 1 and not sum_in_kernel and not compile_only:
        _sum_splits_kernel[(M, triton.cdiv(N, SUM_BLOCK))](
            partial, bias if bias is not None else partial, out, M, N, out.stride(0), splits,
            HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK, PDL=pdl, num_warps=4,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out.reshape(*x.shape[:-1], N)
