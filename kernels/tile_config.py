"""Tile shapes for the segmented kernels, chosen from the problem size (no autotuning).

Decode (few tokens per segment) is memory-bound on adapter weights: tiles are thin in tokens and
long in features, and the shrink splits the input dimension so enough programs stream weights at
once. Prefill (many tokens per segment) reuses each weight tile over many tokens: square-ish tiles.
tl.dot needs every block dimension >= 16, so tiny ranks / token counts are padded in the tile
(masked loads), never in the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_SPLITS = 16


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # tokens of one segment per program
    block_k: int  # shrink: input features per loop step
    block_r: int  # rank per program (shrink) / per loop step (expand)
    block_n: int  # expand: output features per program
    shrink_warps: int = 4
    expand_warps: int = 4
    num_stages: int = 3
    # the shrink's split-K partial sums added up once (one more launch) before the expand instead of by
    # every output tile of the expand: prefill, where a row tile meets 32-224 output tiles on the 8B shape
    presum: bool = False


def choose_tile_config(max_length: int) -> TileConfig:
    """max_length: the longest segment (tokens sharing one adapter) of the step.

    Up to 2 tokens per segment the kernels multiply-add in registers (no tl.dot) and the expand
    runs one warp per program, which keeps the most weight bytes in flight; from 3 tokens on,
    tl.dot on 16-row tiles is faster (H100 measurements, bench/lora_kernels.py --sweep).
    """
    if max_length <= 2:
        block_m = max(max_length, 1)
        return TileConfig(block_m=block_m, block_k=256 // block_m, block_r=16, block_n=256,
                          shrink_warps=4, expand_warps=1, num_stages=1)
    if max_length <= 16:
        return TileConfig(block_m=16, block_k=256, block_r=16, block_n=256)
    if max_length <= 32:
        return TileConfig(block_m=32, block_k=128, block_r=16, block_n=128)
    # Prefill: the 17-32 token tiles with the split sums added once. A 2,048-token 8B layer at rank 16
    # (bench/lora_kernels.py --prefill-sweep, H100): 259 us against 386 for 64 x 64 x 32 x 128 tiles summing
    # in the expand and 328 for those presummed; 16-wide rank tiles beat 32 (half of them masked at rank 16)
    return TileConfig(block_m=32, block_k=128, block_r=16, block_n=128, num_stages=2, presum=True)


def choose_splits(programs: int, chunk: int, block_k: int, num_sms: int) -> int:
    """How many pieces the shrink cuts each input chunk into (partial sums, added by the expand).

    programs: shrink programs without splitting; chunk: input features of the smallest block.
    Aim for a few programs per multiprocessor, each streaming at least two block_k steps.
    """
    wanted = -(-4 * num_sms // max(programs, 1))
    most = max(1, chunk // (2 * block_k))
    return max(1, min(wanted, most, MAX_SPLITS))
