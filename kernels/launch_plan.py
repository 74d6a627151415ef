"""Per-step launch metadata of the segmented adapter kernels (vLLM's split: which token uses which adapter, here;
the kernels that consume it, in segmented_lora.py; TritonAdapterOps.metadata builds it once per step).

LaunchPlan: the launch parameters every layer of a step shares (part of a CUDA graph's key); StepSegments: the
step's token segments with their device tile lists (prefill-sized, one-row and folded) and plans.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.runtime.adapters.segments import Segments

from .tile_config import TileConfig


def plan_size(n: int) -> int:
    """A rank or width as a launch plan holds it: rounded up to a power of two, at least 16. Programs past a
    slot's own rank exit at once (the kernels read it from the module table), so rank-4, -8 and -16
    adapters share one plan, and so one captured CUDA graph: a new rank in traffic costs a capture on the
    serving path only once per power of two."""
    return max(16, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class LaunchPlan:
    """Launch parameters shared by every layer of a step (hashable: part of a CUDA graph's key)."""
    config: TileConfig
    ks: frozenset[int]  # block counts of the modules in use
    has_general: bool
    block_rank: int  # largest rank of one block (r, or the hybrid rank)
    width: int  # widest shrink result (k*r + hybrid rank)
    num_tiles: int
    has_dora: bool = False
    # tiles expected to carry work (None: num_tiles): the programs on the kernels' tile axis (each loops over
    # the step's working tiles with that stride) and what sizes the shrink's split-K. A mixed graph pads its
    # tile list up to any step's need (+ one per sequence): a 1,024-token bucket at 256 sequences lists 272
    # tiles of which a step fills ~16-30; a program per listed tile cost every launch ~250 idle programs per
    # output tile, and split-K sized by the padded count streamed 4,096-14,336 input features serially
    busy_tiles: int | None = None
    fold: int = 0  # adapter blocks the step folds into its base matmuls (kernels/lora_fold.py), 0: none
    fold_rank: int = 0  # their width (a power of two >= 16)
    fold_align: int = 1  # the extension's columns, padded to a multiple of this (lora_fold.FOLD_ALIGN)

    @property
    def max_k(self) -> int:
        return max(self.ks)

    @property
    def grid_tiles(self) -> int:
        return self.num_tiles if self.busy_tiles is None else min(self.busy_tiles, self.num_tiles)


@dataclass
class StepSegments(Segments):
    """Segments plus what the kernels need, built once per step and shared by all layers."""
    tiles: torch.Tensor  # [num_tiles, 3] int32 (slot, first row, end row) into token_order, working ones first
    tile_count: torch.Tensor  # [1] int32 on the device: how many of `tiles` carry work
    plan: LaunchPlan
    # mixed CUDA-graph steps: the short segments (decode rows) get one-row tiles and the decode tile config,
    # a second pair of launches beside the prefill-tiled long segments (None: every segment is in `tiles`)
    short_tiles: torch.Tensor | None = None
    short_count: torch.Tensor | None = None
    short_plan: LaunchPlan | None = None
    # mixed CUDA-graph steps that fold (plan.fold > 0): the folded slots' segments, which take the shrink only
    # (their deltas come out of the base matmul), each token's fold block (-1: none) and row in token_order,
    # and the slot of each fold block (the null slot when unused)
    fold_tiles: torch.Tensor | None = None
    fold_count: torch.Tensor | None = None
    fold_plan: LaunchPlan | None = None
    token_block: torch.Tensor | None = None
    token_row: torch.Tensor | None = None
    fold_slots: torch.Tensor | None = None

    @property
    def config(self) -> TileConfig:
        return self.plan.config
