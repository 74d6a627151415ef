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
Tile sizes come from `choose_tiles` (an explicit rule; @triton.autotune needs a GPU at import);
`candidate_tiles` adds other row steps and a prefetching variant (the next step's bytes and absmax are
loaded before this step's math, against load latency) for the start-up calibration to time.
No host syncs, outputs from torch.empty: CUDA-graph capturable.
Rounding: w = bf16(code) * absmax (fp32) instead of bnb's bf16(code * absmax): the same one rounding
of each weight, at a different place; fp32 inputs use fp32 codes and an fp32 dot (exact weights).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from .nf4_decode import gather_codes, gather_dot, permute_codes, permute_codes_scaled, permute_dot, permute_dot_scaled, table_words
from .segmented_lora import interpreting

MAX_SPLITS = 32
SUM_BLOCK = 512  # output columns per program of the split-sum kernel


@dataclass(frozen=True)
class NF4Tiles:
    block_m: int  # x rows per program (16, 32, 64 or 128: tl.dot needs 16; fewer rows are masked)
    block_n: int  # output features per program
    block_k: int  # input features per loop step (a power of two >= 32 dividing in_features)
    splits: int  # programs along the input features (fp32 partial sums when > 1)
    num_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False  # load the next step's bytes and absmax before this step's math (block_k <= blocksize)
    permute: bool = False  # decode through byte permutes of the code table held in registers (CUDA only)
    prescale: bool = False  # (with permute) codes times their absmax in 16-bit pairs, the dot accumulating in place
    # split-K: the last program of each output tile to finish adds the partial sums (no second launch). Off until a GPU
    # run checks it (tests/test_gpu_fastpath.py) and times it (bench/nf4_matmul.py --sum-ab): not yet run on one
    sum_in_kernel: bool = False
    codes_as_b: bool = False  # x [BLOCK_M, k] @ codes^T (x rows as the wgmma's M, codes from shared memory; BLOCK_M >= 64)


# (block_m, block_k, num_stages) of the row-count rule below, smallest block_m first
STEPS = ((16, 64, 3), (32, 128, 2), (64, 64, 3))
# Above 64 rows (large decode batches, short prefill chunks): 128 rows per program over 8 warps, so that
# each weight is decoded once per 128 rows instead of the whole weight being dequantised to bf16 first.
WIDE_STEP = (128, 64, 2)
WIDE_ROWS = 64  # row counts above this use WIDE_STEP by the rule


def choose_tiles(M: int, N: int, K: int, blocksize: int, num_sms: int,
                 step: tuple[int, int, int] | None = None, block_n: int = 128, num_warps: int | None = None) -> NF4Tiles:
    """Tiles for x [M, K] times an NF4 weight [N, K]; step: (block_m, block_k, num_stages) instead of the
    row-count rule, block_n and num_warps instead of 128 and the rule's (for candidate_tiles).

    The kernel is bound by instruction issue on the dequantisation (see the module docstring), nearly
    independent of M up to 32: one m-tile covers all rows so each weight
    is decoded once. 4 warps over 128 output rows make one 64-row wgmma per warpgroup with the codes
    as the register operand. Split-K until about 4 programs per SM are started, keeping the fp32
    partial sums (written and read once, in L2) under half of the packed weight bytes.
    """
    if step is not None:
        bm, bk, stages = step
    elif M <= 16:  # (H100 sweep, bench/nf4_matmul.py --sweep: 64 x 3 stages beat 128 x 2 by 5-14%)
        bm, bk, stages = STEPS[0]
    elif M <= 32:
        bm, bk, stages = STEPS[1]
    elif M <= WIDE_ROWS:  # the [128, 64] fp32 accumulator and dot result take ~210 registers: shorter steps, deeper prefetch
        bm, bk, stages = STEPS[2]
    else:
        bm, bk, stages = WIDE_STEP
    bn, warps = block_n, num_warps or (8 if bm > 64 else 4)
    bk = min(bk, K & -K)  # K is a multiple of the blocksize, so this is at least blocksize >= 32
    programs = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    k_tiles = K // bk
    wanted = triton.cdiv(4 * num_sms, programs)
    # splits * M * N * 4 bytes <= (N * K / 2) / 2; past 64 rows up to twice that (still in L2): the other
    # path there writes and reads a bf16 copy of the weight, 8x its packed bytes
    partial_cap = max(1, K // (16 * min(M, WIDE_ROWS)))
    splits = max(1, min(wanted, k_tiles, partial_cap, MAX_SPLITS))
    splits = triton.cdiv(k_tiles, triton.cdiv(k_tiles, splits))  # no split left without work
    return NF4Tiles(bm, bn, bk, splits, warps, stages)


def candidate_tiles(M: int, N: int, K: int, blocksize: int, num_sms: int) -> list[NF4Tiles]:
    """The rule's tiles, then those of the smaller row steps (several m-tiles decode each weight more
    than once, but start more programs: on the H200 the 16-row step ran at 3.3x its floor at 32 rows, the
    32-row one at 4.4x, bench/results/nf4_matmul.json), then each step with one absmax block per loop step
    and the next step's loads issued ahead (prefetch), then the rule's tiles with 2x and 4x its splits where
    the partial-sum cap held them down (from 32 rows a [4096, 4096] weight got 4 splits, 128 programs for 132
    SMs: one 4-warp program per SM; H100, bench/results/serve_trace.json): the start-up calibration times
    them all and keeps the fastest."""
    rule = choose_tiles(M, N, K, blocksize, num_sms)
    if M > WIDE_ROWS:  # wide batches: 128 or 64 rows per program; smaller steps decode each weight too often.
        # Also 128-feature loop steps and a deeper pipeline: at 96-128 rows the rule's tiles ran at 2x a dense
        # bf16 matmul (28672x4096: 170 vs 88 us, H100), tensor-core bound at ~0.2 of peak
        bm, bk, stages = WIDE_STEP
        wide = [rule, choose_tiles(M, N, K, blocksize, num_sms, STEPS[-1]),
                choose_tiles(M, N, K, blocksize, num_sms, (bm, 2 * bk, stages)),
                choose_tiles(M, N, K, blocksize, num_sms, (bm, bk, stages + 1)), replace(rule, codes_as_b=True)]
        return _every_decode(list(dict.fromkeys(wide + _unsplit(wide))), M)
    steps = [step for step in STEPS if step[0] < rule.block_m]
    tiles = [rule] + [choose_tiles(M, N, K, blocksize, num_sms, step) for step in steps]
    for bm, bk, stages in [(rule.block_m, rule.block_k, rule.num_stages)] + steps:
        one_block = choose_tiles(M, N, K, blocksize, num_sms, (bm, min(bk, blocksize), stages))
        tiles.append(replace(one_block, prefetch=True))
    k_tiles = K // rule.block_k
    programs = triton.cdiv(N, rule.block_n) * triton.cdiv(M, rule.block_m)
    if programs * rule.splits < 2 * num_sms:
        for more in (2 * rule.splits, 4 * rule.splits):
            splits = min(more, k_tiles, MAX_SPLITS)
            splits = triton.cdiv(k_tiles, triton.cdiv(k_tiles, splits))  # no split left without work
            if splits > rule.splits:
                tiles.append(replace(rule, splits=splits))
    # and the largest split count under the rule's that divides the K loop evenly: 48 rows of a [4096, 4096]
    # weight got 5 splits of 13, 13, 13, 13 and 12 steps and took 21.5 us, where 64 rows with 4 took 18.7 (H100)
    even = max((d for d in range(1, rule.splits) if k_tiles % d == 0), default=None)
    if even is not None and k_tiles % rule.splits:
        tiles.append(replace(rule, splits=even))
    # From 32 rows the partial-sum cap holds split-K to a few programs per SM (64 rows of [4096, 4096]: 32 n-tiles x
    # 4 splits of 4 warps, 4 warps an SM, too few to hide load latency; 19.0 us vs 14.6 dense, H100): more warps
    # per program, or twice the programs over 64 output features each (one 64-row wgmma per program)
    if M > STEPS[0][0]:
        step = (rule.block_m, rule.block_k, rule.num_stages)
        narrow = choose_tiles(M, N, K, blocksize, num_sms, step, block_n=64)
        narrow_ahead = choose_tiles(M, N, K, blocksize, num_sms, (rule.block_m, min(rule.block_k, blocksize),
                                                                  rule.num_stages), block_n=64)
        tiles += [choose_tiles(M, N, K, blocksize, num_sms, step, num_warps=8), narrow,
                  replace(narrow_ahead, prefetch=True)]
        # the 64-feature tile won at 48-64 rows on every 8B shape (H100, bench/results/nf4_decode_ab.json): it too
        # with an even split (48 rows of [4096, 4096]: 5 splits took 17.4 us, 64 rows with 4 took 16.3)
        even = max((d for d in range(1, narrow.splits) if k_tiles % d == 0), default=None)
        if even is not None and k_tiles % narrow.splits:
            tiles.append(replace(narrow, splits=even))
        if rule.block_m >= 64:  # x's rows as the wgmma's M, the codes its shared-memory operand: fewer instructions a
            # weight at 128 features a program (sm90 SASS, scaled decode: 344 a loop step for 8,192 weights against 265
            # for 4,096 with the codes as the register operand)
            tiles += [replace(rule, codes_as_b=True), replace(narrow, codes_as_b=True)]
    return _every_decode(list(dict.fromkeys(tiles + _unsplit([rule]))), M)


PRESCALE_ROWS = 32  # above this many rows the permute tiles are also timed with the codes scaled before the dot


def _every_decode(tiles: list[NF4Tiles], M: int) -> list[NF4Tiles]:
    """`tiles` (gather decode), then each again with the byte-permute decode (a CUDA-only variant), and above
    PRESCALE_ROWS each permute tile with its codes scaled before the dot: there the fp32 rescale of the accumulator
    (BLOCK_M / 64 FFMAs per weight, after the dot has finished) costs more than a 16-bit FMA per pair of weights."""
    permute = [replace(t, permute=True) for t in tiles]
    return tiles + permute + ([replace(t, prescale=True) for t in permute] if M > PRESCALE_ROWS else [])


def _unsplit(tiles: list[NF4Tiles]) -> list[NF4Tiles]:
    """The split-K tiles of `tiles` without split-K: in the trace's decode steps (96-128 rows, 8B) the sums of the
    fp32 partials took 0.83 s beside 1.75 s of matmul (bench/results/profile_step_8b.json): tens of MB per call."""
    return [replace(t, splits=1) for t in tiles if t.splits > 1]


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: small, but still exercises split-K


@functools.cache
def _pdl(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


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
                    total += tl.load(partial_ptr + (s * M + ms.to(tl.int64))[:, None] * N + rows[None, :], mask=mask,
                                     other=0.0, cache_modifier=".cg")
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
               tiles: NF4Tiles | None = None) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) -> [..., out_features] in x's dtype, W the 4-bit [out, in] weight.

    packed: bitsandbytes' storage of W (any shape/storage dtype, out*in/2 bytes); absmax: fp32 per
    block, or uint8 with nested_absmax (fp32 per nested block), nested_code (256 fp32) and offset
    (float or a 0-d tensor: the QuantState's, no host sync) when double-quantised; code: the 16
    fp32 values of the 4-bit type (QuantState.code). in must be a multiple of blocksize.
    tiles: override the tile rule (benchmark sweeps).
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
    tiles = tiles or choose_tiles(M, N, K, blocksize, _num_sms(x.device))
    sub = min(tiles.block_k, blocksize) // 2
    if K % tiles.block_k or tiles.block_k < 32 or tiles.block_k % (2 * sub):
        raise ValueError(f"block_k {tiles.block_k} must be a power of two >= 32 dividing in_features {K}")
    if tiles.prefetch and tiles.block_k > 2 * sub:
        raise ValueError(f"prefetch needs block_k <= blocksize, not {tiles.block_k} > {blocksize}")
    k_tiles = K // tiles.block_k
    k_per_split = triton.cdiv(k_tiles, tiles.splits) * tiles.block_k
    splits = triton.cdiv(K, k_per_split)
    partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else out
    offset_in_memory = isinstance(offset, torch.Tensor)
    permute = tiles.permute and x.dtype != torch.float32 and not interpreting()
    grid = (splits, triton.cdiv(N, tiles.block_n), triton.cdiv(M, tiles.block_m))
    sum_in_kernel = splits > 1 and tiles.sum_in_kernel
    pdl = splits > 1 and not sum_in_kernel and _pdl(x.device)
    arrivals = _arrivals(x.device, grid[1] * grid[2]) if sum_in_kernel else partial
    _nf4_matmul_kernel[grid](
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
        PERMUTE=permute, PRESCALE=permute and tiles.prescale, CODES_AS_B=tiles.codes_as_b,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if splits > 1 and not sum_in_kernel:
        _sum_splits_kernel[(M, triton.cdiv(N, SUM_BLOCK))](
            partial, bias if bias is not None else partial, out, M, N, out.stride(0), splits,
            HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK, PDL=pdl, num_warps=4,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out.reshape(*x.shape[:-1], N)
