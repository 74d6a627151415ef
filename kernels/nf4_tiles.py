"""Tilings of the fused NF4 matmul (kernels/nf4_matmul.py): NF4Tiles, the row-count rule (choose_tiles) and the
candidates the start-up calibration times (candidate_tiles, runtime/nf4_calibration.py keeps the fastest per shape and
row count)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

MAX_SPLITS = 32


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
    # split-K: the last program of each output tile to finish adds the partial sums (no second launch). Same bits, but
    # 1-18% slower than the second launch on every 8B matmul at 16-64 rows (H100, bench/results/nf4_sum_ab.json): not
    # a calibration candidate; bench/nf4_matmul.py --sum-ab times it
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
    SMs: one 4-warp program per SM; H100, bench/results/serve_trace.json); the rule's tiles in the gather decode, all
    of them in the permute decode (and scaled, see _every_decode), and from 33 to 64 rows the codes-as-B tiles
    (_codes_as_b): the start-up calibration times them all and keeps the fastest."""
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
    tiles = _every_decode(list(dict.fromkeys(tiles + _unsplit([rule]))), M)
    if rule.block_m >= 64:
        tiles += [t for t in _codes_as_b(M, K, rule, blocksize) if t not in tiles]
    return tiles


def _codes_as_b(M: int, K: int, rule: NF4Tiles, blocksize: int) -> list[NF4Tiles]:
    """33-64 rows: x's rows as the wgmma's M and the codes its shared-memory operand (fewer instructions a weight:
    sm90 SASS, scaled decode, 344 a loop step for 8,192 weights against 265 for 4,096 with the codes as the register
    operand), permute decode, codes scaled before the dot: 128 and 64 features a program, the rule's input step with
    and without the next step's loads issued ahead, and twice that step (half the loop's barriers and waits a weight:
    0.152 warp instructions a weight against 0.168 at 128 features, 0.200 against 0.230 at 64, in sm90 SASS), split-K
    by powers of two while the fp32 partial sums stay under the packed weight bytes.
    Every tiling that won at 48-64 rows on the four 8B matmuls was one of these (H100, bench/results/nf4_sum_ab.json:
    o_proj at 48 rows 14.4 us with 128 features and 8 splits, where the calibration's best without them took 15.8)."""
    k_most = min(MAX_SPLITS, max(1, K // (8 * M)))  # (M <= 64 here)
    tiles = []
    steps = ((rule.block_k, False), (min(rule.block_k, blocksize), True), (2 * rule.block_k, False))
    for block_n in (128, 64):
        for block_k, prefetch in steps:
            if K % block_k:
                continue
            for splits in (1, 2, 4, 8, 16, 32):
                if splits <= min(k_most, K // block_k):
                    tiles.append(NF4Tiles(rule.block_m, block_n, block_k, splits, 4, rule.num_stages, prefetch=prefetch,
                                          permute=True, prescale=True, codes_as_b=True))
    return tiles


PRESCALE_ROWS = 32  # above this many rows the permute tiles are also timed with the codes scaled before the dot


def _every_decode(tiles: list[NF4Tiles], M: int) -> list[NF4Tiles]:
    """The rule's tiles (tiles[0]) in the gather decode, then all of `tiles` with the byte-permute decode (a CUDA-only
    variant, faster on every 8B matmul and row count by 5-25%: H100, bench/results/nf4_decode_ab.json; the gather
    tiling stays as the fallback where a permute kernel fails its check), and above PRESCALE_ROWS each permute tile
    with its codes scaled before the dot: there the fp32 rescale of the accumulator (BLOCK_M / 64 FFMAs per weight,
    after the dot has finished) costs more than a 16-bit FMA per pair of weights."""
    permute = [replace(t, permute=True) for t in tiles]
    return tiles[:1] + permute + ([replace(t, prescale=True) for t in permute] if M > PRESCALE_ROWS else [])


def _unsplit(tiles: list[NF4Tiles]) -> list[NF4Tiles]:
    """The split-K tiles of `tiles` without split-K: in the trace's decode steps (96-128 rows, 8B) the sums of the
    fp32 partials took 0.83 s beside 1.75 s of matmul (bench/results/profile_step_8b.json): tens of MB per call."""
    return [replace(t, splits=1) for t in tiles if t.splits > 1]


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: small, but still exercises split-K
