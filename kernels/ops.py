"""TritonAdapterOps: the adapter interface on the segmented Triton kernels.

Slots live in one packed weight pool; a device module table [slot, layer, projection, field]
says where each module's weights are and what shape they have (k, rank, hybrid rank). Per step,
`metadata` adds to the Segments the token tiles the kernels run over and a scratch buffer for the
shrink results; every layer's `apply` is then two launches (shrink, expand) with no host work
beyond computing the launch arguments.

CUDA graphs: a captured `apply` holds the addresses of the pool, the module table and the step's
scratch. The pool moves when a load outgrows it (`pool.version` counts moves; `pool.reserve`
avoids them) and `metadata` reallocates the scratch when a step needs more than any before it:
capture after both are at their final size, or capture again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.runtime.adapters.ops import AdapterOps
from loraplex.runtime.adapters.peft_format import AdapterWeights
from loraplex.runtime.adapters.segments import Segments, build_segments

from . import packed_layout as layout
from .segmented_lora import MAX_FUSED, expand, interpreting, shrink
from .tile_config import TileConfig, choose_splits, choose_tile_config
from .weight_pool import WeightPool


@dataclass
class StepSegments(Segments):
    """Segments plus what the kernels need, built once per step and shared by all layers."""
    config: TileConfig
    tiles: torch.Tensor  # [num_tiles, 3] int32 (slot, first row, end row) into token_order
    partials: torch.Tensor  # [max_splits, N, MAX_FUSED, width] float32 scratch between shrink and expand

    @property
    def max_splits(self) -> int:
        return self.partials.shape[0]


@dataclass
class _SlotShape:
    region: int  # offset of the slot's region in the pool
    ks: set[int]  # block counts of its modules
    has_general: bool
    block_rank: int  # largest rank of one block (r, or the hybrid rank)
    width: int  # widest shrink result of any module (k*r + hybrid rank)


class TritonAdapterOps(AdapterOps):
    name = "triton"

    def __init__(self, num_slots, projection_shapes, num_layers, device, dtype):
        super().__init__(num_slots, projection_shapes, num_layers, device, dtype)
        if self.device.type != "cuda" and not interpreting():
            raise RuntimeError("TritonAdapterOps needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
        self.proj_ids = {name: i for i, name in enumerate(projection_shapes)}
        self.pool = WeightPool(self.device, dtype)
        self.table = torch.zeros(num_slots, num_layers, len(self.proj_ids), layout.NUM_FIELDS,
                                 dtype=torch.int64, device=self.device)
        self.scales = torch.zeros(num_slots, num_layers, len(self.proj_ids), dtype=torch.float32, device=self.device)
        self.slot_shapes: list[_SlotShape | None] = [None] * num_slots
        self.scratch = torch.empty(0, dtype=torch.float32, device=self.device)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 1)
        self.max_in_features = max(shape[0] for shape in projection_shapes.values())
        # Knobs for tests and benchmarks; None = chosen from the problem size.
        self.tile_config: TileConfig | None = None
        self.num_splits: int | None = None
        self.hybrid_passes = 1  # 2: the hybrid general part gets its own expand launch
        # Programmatic dependent launch: each kernel starts while the previous one drains (Hopper+).
        self.pdl = (self.device.type == "cuda" and not interpreting()
                    and torch.cuda.get_device_capability(self.device)[0] >= 9)

    # -- slots -------------------------------------------------------------------------------
    def load(self, slot: int, adapter: AdapterWeights) -> None:
        if self.slot_shapes[slot] is not None:
            self.evict(slot)
        modules = adapter.modules
        for layer, proj in modules:
            if layer >= self.num_layers or proj not in self.proj_ids:
                raise ValueError(f"adapter module ({layer}, {proj}) is outside the served model")
        region = self.pool.allocate(sum(layout.module_size(m) for m in modules.values()))
        rows = torch.zeros(self.num_layers, len(self.proj_ids), layout.NUM_FIELDS, dtype=torch.int64)
        scales = torch.zeros(self.num_layers, len(self.proj_ids), dtype=torch.float32)
        offset = region
        for (layer, proj), m in modules.items():
            rows[layer, self.proj_ids[proj]] = torch.tensor(layout.write_module(m, self.pool.buffer, offset))
            scales[layer, self.proj_ids[proj]] = m.scale
            offset += layout.module_size(m)
        self.table[slot].copy_(rows)
        self.scales[slot].copy_(scales)
        self.slot_shapes[slot] = _SlotShape(
            region=region,
            ks={m.k for m in modules.values()},
            has_general=any(m.general_A is not None for m in modules.values()),
            block_rank=max((max(m.rank, layout.general_rank(m)) for m in modules.values()), default=1),
            width=max((layout.intermediate_width(m) for m in modules.values()), default=1))

    def evict(self, slot: int) -> None:
        shape = self.slot_shapes[slot]
        if shape is None:
            return
        self.table[slot].zero_()
        self.pool.free(shape.region)
        self.slot_shapes[slot] = None

    def _loaded(self) -> list[_SlotShape]:
        return [s for s in self.slot_shapes if s is not None]

    @property
    def ks(self) -> set[int]:
        return set().union(*(s.ks for s in self._loaded())) or {1}

    def _aligned(self, widths: list[int]) -> bool:
        """Whether every block width (width / k for each k in use) is a multiple of 8 elements."""
        return all(w % (8 * k) == 0 for w in widths for k in self.ks)

    @property
    def has_general(self) -> bool:
        return any(s.has_general for s in self._loaded())

    @property
    def max_block_rank(self) -> int:
        return max((s.block_rank for s in self._loaded()), default=1)

    @property
    def max_width(self) -> int:
        return max((s.width for s in self._loaded()), default=1)

    # -- per step ----------------------------------------------------------------------------
    def metadata(self, token_slots: list[int]) -> StepSegments:
        return self.extend(build_segments(token_slots, self.device))

    def extend(self, seg: Segments) -> StepSegments:
        """Add the kernels' per-step tensors to Segments built elsewhere."""
        cfg = self.tile_config or choose_tile_config(seg.max_length)
        tiles = [(slot, start + m, start + length)
                 for start, length, slot in seg.host for m in range(0, length, cfg.block_m)]
        tiles_t = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(self.device, non_blocking=True)
        max_splits = self.num_splits or choose_splits(len(tiles), self.max_in_features, cfg.block_k, self.num_sms)
        num_rows = seg.token_order.shape[0]
        shape = (max_splits, num_rows, MAX_FUSED, self.max_width)
        needed = max_splits * num_rows * MAX_FUSED * self.max_width
        if self.scratch.numel() < needed:
            self.scratch = torch.empty(needed, dtype=torch.float32, device=self.device)
        return StepSegments(**vars(seg), config=cfg, tiles=tiles_t, partials=self.scratch[:needed].view(shape))

    def apply(self, layer, projections, x, y, meta: Segments) -> None:
        if meta.empty:
            return
        if not isinstance(meta, StepSegments):
            meta = self.extend(meta)
        if meta.partials.shape[-1] < self.max_width:
            raise RuntimeError("an adapter wider than the step's scratch was loaded after metadata(); rebuild it")
        assert len(projections) <= MAX_FUSED
        cfg = meta.config
        proj_ids = [self.proj_ids[p] for p in projections]
        in_features = self.projection_shapes[projections[0]][0]
        out_features = [self.projection_shapes[p][1] for p in projections]
        max_k, has_general = max(self.ks), self.has_general
        blocks = max_k + int(has_general)
        rank_tiles = -(-self.max_block_rank // cfg.block_r)
        num_splits = self.num_splits or min(meta.max_splits, choose_splits(
            meta.tiles.shape[0] * len(projections) * blocks * rank_tiles, in_features // max_k, cfg.block_k,
            self.num_sms))
        table, scales = self.table[:, layer], self.scales[:, layer]
        shrink(x, meta.token_order, meta.tiles, self.pool.buffer, table, proj_ids, blocks, rank_tiles,
               meta.partials, num_splits, cfg, aligned=self._aligned([in_features]), pdl=self.pdl)
        common = (y, meta.token_order, meta.tiles, self.pool.buffer, table, scales, proj_ids, out_features,
                  max_k, meta.partials, num_splits, cfg)
        aligned = self._aligned(out_features)
        if has_general and self.hybrid_passes == 2:
            expand(*common, blocks=True, general=False, aligned=aligned, pdl=self.pdl)
            expand(*common, blocks=False, general=True, aligned=aligned, pdl=self.pdl)
        else:
            expand(*common, blocks=True, general=has_general, aligned=aligned, pdl=self.pdl)
