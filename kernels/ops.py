"""TritonAdapterOps: the adapter interface on the segmented Triton kernels.

Slots live in one packed weight pool; a device module table [slot, layer, projection, field]
says where each module's weights are and what shape they have (k, rank, hybrid rank). One extra
all-zero table row, `null_slot`, stands for "no adapter": tiles that point at it exit at once, so
CUDA graphs can pad a step's tiles to a fixed count. Per step, `metadata` groups the tokens into
tiles and fixes a `LaunchPlan` (launch_plan.py) from the adapters that step uses (never from everything resident,
so the cost of a step does not depend on how many adapters are loaded); every layer's `apply` is
then two launches (shrink, expand) with no host work beyond computing the launch arguments, and a
third (dora_rescale) when a DoRA adapter is in the step: its rows' outputs scaled per channel.

Loads: `prepare` packs an adapter into the pool layout once, in (pinned) host memory, on any
thread; `load` copies it into a pool region on a side stream and returns an event to wait on, so
the running batch never waits for a load. With a fixed `pool_bytes` the pool never moves
(captured graphs stay valid) and `load` returns None when the adapter does not fit.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from loraplex.runtime.adapters.buffers import COPY_THREADS, copy_threads
from loraplex.runtime.adapters.ops import AdapterOps
from loraplex.runtime.adapters.peft_format import AdapterWeights
from loraplex.runtime.adapters.segments import Segments, build_segments

from . import packed_layout as layout
from .dora_rescale import dora_rescale
from .host_buffers import HostBuffers
from .lora_fold import (DEFAULT_FOLD_BLOCKS, FOLD_ALIGN, FOLD_BLOCKS, choose_fold_slots, fold_columns, fold_inputs,
                        fold_rows, fold_weights)
from .launch_plan import LaunchPlan, StepSegments, plan_size
from .lora_fold import self_check as fold_self_check
from .segmented_lora import MAX_FUSED, expand, interpreting, shrink
from .tile_config import TileConfig, choose_splits, choose_tile_config
from .weight_pool import WeightPool

log = logging.getLogger(__name__)

# Decode under CUDA graphs: rows of one adapter share its weights through L2 rather than a tile, so
# the launch plan (part of a graph's key) does not change with how rows spread over adapters.
GRAPH_DECODE_CONFIG = choose_tile_config(1)
# Mixed steps under CUDA graphs (prefill chunks beside decode rows): prefill tiles, whatever the segments.
MIXED_GRAPH_CONFIG = choose_tile_config(64)
SHORT_SEGMENT = 2  # segments of at most this many tokens take one-row tiles in a mixed graph
SHORT_GRID = 64  # programs over a mixed graph's one-row tiles (each loops over more when a step has more)


@dataclass
class PackedAdapter:
    """An adapter in pool layout: one flat host buffer and its module table, offsets relative to the buffer."""
    data: torch.Tensor  # [n] in the pool dtype (pinned when a CUDA device will read it)
    table: torch.Tensor  # [layers, projections, NUM_FIELDS] int64: module-table rows, offsets relative to 0
    shift: torch.Tensor  # like table, 1 where a field is an offset (moves with the slot's region), else 0
    scales: torch.Tensor  # [layers, projections] fp32
    ks: frozenset[int]
    has_general: bool
    block_rank: int
    width: int
    has_dora: bool = False


@dataclass
class _Resident:
    region: int
    packed: PackedAdapter
    staging: tuple[torch.Tensor, ...]  # host tensors an in-flight copy still reads


class TritonAdapterOps(AdapterOps):
    name = "triton"
    graph_safe = True  # apply() does no host work that depends on the step: CUDA graphs may capture it

    def __init__(self, num_slots, projection_shapes, num_layers, device, dtype, pool_bytes: int | None = None,
                 base_weight=None):
        super().__init__(num_slots, projection_shapes, num_layers, device, dtype, base_weight)
        if self.device.type != "cuda" and not interpreting():
            raise RuntimeError("TritonAdapterOps needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
        self.proj_ids = {name: i for i, name in enumerate(projection_shapes)}
        elem = torch.finfo(dtype).bits // 8
        self.pool = WeightPool(self.device, dtype, None if pool_bytes is None else pool_bytes // elem)
        self.null_slot = num_slots
        self.table = torch.zeros(num_slots + 1, num_layers, len(self.proj_ids), layout.NUM_FIELDS,
                                 dtype=torch.int64, device=self.device)
        self.scales = torch.zeros(num_slots + 1, num_layers, len(self.proj_ids), dtype=torch.float32,
                                  device=self.device)
        self.resident: list[_Resident | None] = [None] * num_slots
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.cuda else 1
        self.max_in_features = max(shape[0] for shape in projection_shapes.values())
        # Knobs for tests and benchmarks; None = chosen from the problem size.
        self.tile_config: TileConfig | None = None
        self.num_splits: int | None = None
        self.presum: bool | None = None  # sum the split partials once before the expand (None: the tile config's)
        self.hybrid_passes = 1  # 2: the hybrid general part gets its own expand launch
        # a mixed graph's expand (a tile list padded for its bucket): programs on the tile axis, the plan's divided by
        # this, each striding over more tiles. Its grid is that times the output tiles (224 for an 8B gate_up), so
        # the programs a step leaves without a tile are many (bench/step_host.py --ops-ab expand_grid_divisor=2)
        self.expand_grid_divisor = 1
        # Programmatic dependent launch: each kernel starts while the previous one drains (Hopper+).
        self.pdl = self.cuda and not interpreting() and torch.cuda.get_device_capability(self.device)[0] >= 9
        self.graph_rows = 64  # rows (sequences) of a CUDA-graph step: the fixed-address metadata buffers' size
        self.graph_tokens = 0  # tokens of the largest mixed CUDA-graph step
        # fixed-address (token order, tiles) buffers that captured graphs read: decode (False), mixed (True)
        self._graph_buffers: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        # A running batch keeps its rows' slots from one decode step to the next: the last graph step's
        # metadata (its key, the result) is reused while the slots and residency stay as they were
        self._residency = 0  # bumped by every load and evict
        self._last_graph_meta: tuple[tuple, StepSegments] | None = None
        self.host_buffers = HostBuffers(dtype, self.cuda)  # packed copies' memory, a spare block pinned ahead
        # adapters a mixed graph step may fold into its base matmuls (lora_fold.py), at most FOLD_BLOCKS; 0: never.
        # The engine sets default_fold_blocks unless told otherwise (bench/step_host.py --fold-ab times it)
        self.fold_blocks = 0
        self.fold_align = FOLD_ALIGN
        self._fold_checked = not self.cuda  # set_fold_blocks runs the kernels' self-check once on a GPU

    def set_fold_blocks(self, blocks: int) -> int:
        """Let mixed steps fold up to `blocks` adapters (<= FOLD_BLOCKS) into their base matmuls; on a GPU only where
        the fold kernels pass their self-check. Returns the number now in force."""
        if blocks and not self._fold_checked:
            problem = fold_self_check(self.device, self.dtype)
            if problem:
                log.warning("adapter deltas are not folded into prefill matmuls: %s", problem)
                return self.fold_blocks
            self._fold_checked = True
        self.fold_blocks = min(blocks, FOLD_BLOCKS)
        return self.fold_blocks

    @property
    def default_fold_blocks(self) -> int:
        """The folding a server gets without --fold-prefill-adapters: lora_fold.DEFAULT_FOLD_BLOCKS on a GPU."""
        return DEFAULT_FOLD_BLOCKS if self.cuda and not interpreting() else 0

    @property
    def pool_bytes(self) -> int:
        return self.pool.capacity * self.pool.buffer.element_size()

    # -- slots -------------------------------------------------------------------------------
    def prepare(self, adapter: AdapterWeights) -> PackedAdapter:
        """The adapter in pool layout (host memory); computed once per adapter version, any thread."""
        packed = adapter.packed
        if isinstance(packed, PackedAdapter) and packed.data.dtype == self.dtype:
            return packed
        super().prepare(adapter)  # DoRA factors
        modules = adapter.modules
        for layer, proj in modules:
            if layer >= self.num_layers or proj not in self.proj_ids:
                raise ValueError(f"adapter module ({layer}, {proj}) is outside the served model")
        offsets, total = layout.module_offsets(modules.values())
        started = time.perf_counter()
        data = self.host_buffers.take(max(total, 1))
        allocated = time.perf_counter()
        # the module table too (loads only add the slot's region to its offsets: the engine thread's part)
        table = [[[0] * layout.NUM_FIELDS for _ in self.proj_ids] for _ in range(self.num_layers)]
        shift = [[[0] * layout.NUM_FIELDS for _ in self.proj_ids] for _ in range(self.num_layers)]
        scales = [[0.0] * len(self.proj_ids) for _ in range(self.num_layers)]
        targets, pieces, gaps = [], [], []
        for ((layer, proj), m), offset in zip(modules.items(), offsets):
            row, module_targets, module_pieces, module_gaps = layout.module_copies(m, data, offset)
            targets += module_targets
            pieces += module_pieces
            gaps += module_gaps
            j = self.proj_ids[proj]
            table[layer][j], scales[layer][j] = row, m.scale
            for f in layout.OFFSET_FIELDS:
                shift[layer][j][f] = 1
            shift[layer][j][layout.DORA_OFFSET] = int(row[layout.DORA_OFFSET] != 0)  # 0: not DoRA, stays 0
        # The copies (fp32 -> pool dtype, B transposed) on the copy threads, in chunks PyTorch copies on the calling
        # thread (packed_layout.copy_shares): an 8B rank-16 pack took 63 ms as a copy_ per piece on 8 threads and
        # 17.6 as a foreach per thread with PyTorch's intra-op threads (H100 host, bench/pack_speed.py), whose
        # OpenMP teams then made concurrent packs of small adapters wait on one another
        inference = torch.is_inference_mode_enabled()  # (thread-local: `data` may be an inference tensor)

        def copy(share: tuple[list, list]) -> None:
            with torch.inference_mode(inference):
                torch._foreach_copy_(*share)
        list(copy_threads().map(copy, layout.copy_shares(targets, pieces, COPY_THREADS)))
        if gaps:
            torch._foreach_zero_(gaps)
        if total < data.numel():
            data[total:].zero_()
        log.info("packed an adapter of %d modules: %.1f MB of %s %s host memory in %.0f ms (allocation %.0f ms)",
                 len(modules), data.numel() * data.element_size() / 1e6, "pinned" if self.cuda else "pageable",
                 self.dtype, 1e3 * (time.perf_counter() - started), 1e3 * (allocated - started))
        packed = PackedAdapter(
            data, torch.tensor(table, dtype=torch.int64), torch.tensor(shift, dtype=torch.int64),
            torch.tensor(scales, dtype=torch.float32), frozenset(m.k for m in modules.values()),
            any(m.general_A is not None for m in modules.values()),
            max((max(m.rank, layout.general_rank(m)) for m in modules.values()), default=1),
            max((layout.intermediate_width(m) for m in modules.values()), default=1),
            adapter.is_dora)
        adapter.packed = packed
        return packed

    def prepared(self, adapter: AdapterWeights) -> bool:
        packed = adapter.packed
        return isinstance(packed, PackedAdapter) and packed.data.dtype == self.dtype

    def host_bytes(self, adapter: AdapterWeights) -> int:
        """The packed copy prepare() keeps in (pinned) host memory: the pool layout, as many bytes as on the device."""
        return self.nbytes(adapter)

    def nbytes(self, adapter: AdapterWeights) -> int:
        return layout.aligned(sum(layout.module_size(m) for m in adapter.modules.values())) * \
            torch.finfo(self.dtype).bits // 8

    def load(self, slot: int, adapter: AdapterWeights) -> torch.cuda.Event | bool:
        """Start copying the adapter into `slot`. False when the pool has no room (fixed pool);
        on CUDA an event that completes when the slot is usable, elsewhere True (done)."""
        if self.resident[slot] is not None:
            self.evict(slot)
        packed = self.prepare(adapter)
        region = self.pool.allocate(packed.data.numel())
        if region is None:
            return False
        rows, scales = packed.table + region * packed.shift, packed.scales  # (one op: this runs on the engine thread)
        target = self.pool.buffer[region:region + packed.data.numel()]
        if not self.cuda:
            target.copy_(packed.data)
            self.table[slot].copy_(rows)
            self.scales[slot].copy_(scales)
            self.resident[slot] = _Resident(region, packed, ())
            self._residency += 1
            return True
        rows, scales = rows.pin_memory(), scales.pin_memory()
        # The region may have belonged to an adapter that a step already queued still reads.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            target.copy_(packed.data, non_blocking=True)
            self.table[slot].copy_(rows, non_blocking=True)
            self.scales[slot].copy_(scales, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.resident[slot] = _Resident(region, packed, (rows, scales))
        self._residency += 1
        return done

    def evict(self, slot: int) -> None:
        resident = self.resident[slot]
        if resident is None:
            return
        if self.cuda:  # ordered after a copy into this slot that may still be under way
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.table[slot].zero_()
        else:
            self.table[slot].zero_()
        self.pool.free(resident.region)
        self.resident[slot] = None
        self._residency += 1

    # -- per step ----------------------------------------------------------------------------
    def plan(self, seg: Segments | list[tuple[int, int, int]], num_tiles: int, config: TileConfig) -> LaunchPlan:
        """The launch parameters of `num_tiles` tiles over the adapters that seg's segments (or these) use."""
        host = seg.host if isinstance(seg, Segments) else seg
        used = [self.resident[slot].packed for _, _, slot in host if self.resident[slot] is not None]
        return LaunchPlan(
            config=config,
            ks=frozenset().union(*(p.ks for p in used)) or frozenset({1}),
            has_general=any(p.has_general for p in used),
            block_rank=plan_size(max((p.block_rank for p in used), default=1)),
            width=plan_size(max((p.width for p in used), default=1)),
            num_tiles=num_tiles,
            has_dora=any(p.has_dora for p in used))

    def metadata(self, token_slots: list[int], pad_to: int | None = None, mixed: bool = False) -> StepSegments:
        """pad_to: a CUDA-graph token count; the step's tensors are then written into fixed buffers of that
        many rows and a fixed number of tiles (padding tiles point at the null slot), so that one graph
        serves every mix of the step's adapters. A decode graph (mixed=False) gets one tile per row
        whatever the segment lengths. A mixed graph (prefill chunks beside decode rows, up to `graph_tokens`
        tokens over at most `graph_rows` sequences) gets prefill-sized tiles for segments longer than
        SHORT_SEGMENT tokens and one-row decode tiles for the others, each list as long as any step of
        pad_to tokens can need: a decode row in a 64-row prefill tile costs 3-4x the one-row tile (1B,
        H100, bench/step_host.py). Both launch plans cover every adapter the step uses, so the graph's key
        does not depend on which adapters decode and which prefill."""
        if pad_to is None:
            return self.extend(build_segments(token_slots, self.device))
        key = (tuple(token_slots), pad_to, mixed, self._residency, self.tile_config, self.fold_blocks, self.fold_align)
        if self._last_graph_meta is not None and self._last_graph_meta[0] == key:
            return self._last_graph_meta[1]  # the fixed buffers hold this step's values already
        seg = build_segments(token_slots, "cpu")
        segments = min(self.graph_rows, self.num_slots)
        fold_host: list[tuple[int, int, int]] = []
        if mixed:
            config = self.tile_config or MIXED_GRAPH_CONFIG
            short_config = self.tile_config or GRAPH_DECODE_CONFIG
            num_tiles = -(-pad_to // config.block_m) + segments
            num_short = min(pad_to, SHORT_SEGMENT * segments)
            long_host = [h for h in seg.host if h[1] > SHORT_SEGMENT]
            short_host = [h for h in seg.host if h[1] <= SHORT_SEGMENT]
            folded = self._fold_slots(long_host, pad_to)
            fold_host = [h for h in long_host if h[2] in folded]
            long_host = [h for h in long_host if h[2] not in folded]
            tiles = self._tiles(long_host, config.block_m)
            short = self._tiles(short_host, short_config.block_m)
            fold_tiles = self._tiles(fold_host, config.block_m)
            num_fold = -(-pad_to // config.block_m) + FOLD_BLOCKS if fold_host else 0
            assert len(short) <= num_short and len(fold_tiles) <= num_fold
            counts = (len(tiles), len(short), len(fold_tiles))
            short += [(self.null_slot, 0, 0)] * (num_short - len(short))
            fold_tiles += [(self.null_slot, 0, 0)] * (num_fold - len(fold_tiles))
            most_tokens = max(self.graph_tokens, pad_to)
            capacity = (most_tokens, 1 + -(-most_tokens // config.block_m) + segments + SHORT_SEGMENT * segments
                        + -(-most_tokens // config.block_m) + FOLD_BLOCKS)
        else:
            config = self.tile_config or GRAPH_DECODE_CONFIG
            num_tiles, num_short, short, num_fold, fold_tiles = pad_to, 0, [], 0, []
            tiles = self._tiles(seg.host, config.block_m)
            counts = (len(tiles), 0, 0)
            capacity = (max(pad_to, self.graph_rows), 1 + max(pad_to, self.graph_rows))
        assert len(tiles) <= num_tiles
        tiles += [(self.null_slot, 0, 0)] * (num_tiles - len(tiles))
        order = seg.token_order.numpy()
        buffers = self._graph_buffers.get(mixed)
        if buffers is None or buffers[0].shape[0] < capacity[0] or buffers[1].shape[0] < capacity[1]:
            # allocated once at the largest size: captured graphs keep reading these addresses
            buffers = self._graph_buffers[mixed] = (
                torch.zeros(capacity[0], dtype=torch.int64, device=self.device),
                torch.zeros(capacity[1], 3, dtype=torch.int32, device=self.device),
                torch.zeros(2 * capacity[0] + FOLD_BLOCKS, dtype=torch.int32, device=self.device))
        graph_order, graph_tiles, graph_fold = buffers
        host_order = torch.zeros(pad_to, dtype=torch.int64, pin_memory=self.cuda)  # padding rows: token 0, no tile
        host_order[:len(order)] = seg.token_order
        # row 0: the working-tile counts of the three lists; then the prefill tiles, the one-row tiles, the folded
        host_tiles = torch.tensor([counts] + tiles + short + fold_tiles, dtype=torch.int32, pin_memory=self.cuda)
        graph_order[:pad_to].copy_(host_order, non_blocking=True)
        graph_tiles[:1 + num_tiles + num_short + num_fold].copy_(host_tiles, non_blocking=True)
        fields = {**vars(seg), "token_order": graph_order[:pad_to]}
        plan = self.plan(seg, num_tiles, config)
        if mixed:  # a step of this bucket fills pad_to / block_m prefill tiles, plus one per segment boundary: a few
            # decode rows of one adapter are a long segment too (>= 3 rows), so small buckets get room for 16 of them
            full = -(-pad_to // config.block_m)
            plan = replace(plan, busy_tiles=full + min(segments, max(full, 16)))
        if fold_host:
            fold_plan = replace(self.plan(fold_host, num_fold, config), busy_tiles=num_fold)
            plan = replace(plan, fold=FOLD_BLOCKS, fold_rank=fold_plan.block_rank, fold_align=self.fold_align)
        meta = StepSegments(**fields, tiles=graph_tiles[1:1 + num_tiles], tile_count=graph_tiles[0, 0:1], plan=plan)
        if mixed:
            meta.short_tiles = graph_tiles[1 + num_tiles:1 + num_tiles + num_short]
            meta.short_count = graph_tiles[0, 1:2]
            meta.short_plan = replace(self.plan(seg, num_short, short_config), busy_tiles=min(num_short, SHORT_GRID))
        if fold_host:
            first = 1 + num_tiles + num_short
            meta.fold_tiles, meta.fold_count = graph_tiles[first:first + num_fold], graph_tiles[0, 2:3]
            meta.fold_plan = fold_plan
            cap = graph_order.shape[0]
            rows = fold_rows(fold_host, order, cap, self.null_slot)
            graph_fold[:2 * cap + FOLD_BLOCKS].copy_(rows.pin_memory() if self.cuda else rows, non_blocking=True)
            meta.token_block, meta.token_row = graph_fold[:pad_to], graph_fold[cap:cap + pad_to]
            meta.fold_slots = graph_fold[2 * cap:2 * cap + FOLD_BLOCKS]
        self._last_graph_meta = (key, meta)
        return meta

    def _fold_slots(self, long_host: list[tuple[int, int, int]], tokens: int) -> set[int]:
        """The slots whose segments a mixed step of `tokens` tokens folds into its base matmuls (lora_fold.py)."""
        assert self.fold_blocks <= FOLD_BLOCKS
        packed = {slot: self.resident[slot].packed for _, _, slot in long_host if self.resident[slot] is not None}
        return choose_fold_slots(long_host, tokens, packed, self.fold_blocks)

    @staticmethod
    def _tiles(host: list[tuple[int, int, int]], block_m: int) -> list[tuple[int, int, int]]:
        """(slot, first row, end row) tiles of block_m rows over segments given as (start, length, slot)."""
        return [(slot, start + m, start + length) for start, length, slot in host for m in range(0, length, block_m)]

    def extend(self, seg: Segments) -> StepSegments:
        """Add the kernels' per-step tensors to Segments built elsewhere."""
        config = self.tile_config or choose_tile_config(seg.max_length)
        tiles = self._tiles(seg.host, config.block_m)
        rows = torch.tensor([(len(tiles), 0, 0)] + tiles, dtype=torch.int32).to(self.device, non_blocking=True)
        return StepSegments(**vars(seg), tiles=rows[1:], tile_count=rows[0, 0:1],
                            plan=self.plan(seg, len(tiles), config))

    def apply(self, layer, projections, x, y, meta: Segments, folded: bool = False) -> None:
        """folded: the base matmul that computed y folded the step's fold segments in already (see folded)."""
        if meta.empty:
            return
        if not isinstance(meta, StepSegments):
            meta = self.extend(meta)
        assert len(projections) <= MAX_FUSED
        self._launch(layer, projections, x, y, meta.token_order, meta.tiles, meta.tile_count, meta.plan)
        if meta.short_tiles is not None:
            self._launch(layer, projections, x, y, meta.token_order, meta.short_tiles, meta.short_count,
                         meta.short_plan)
        if meta.fold_tiles is not None and not folded:
            self._launch(layer, projections, x, y, meta.token_order, meta.fold_tiles, meta.fold_count, meta.fold_plan)

    def fold_width(self, projections: tuple[str, ...], meta: Segments | None) -> int:
        """Columns a base matmul of these projections gets beyond its input features when it folds this step."""
        if not isinstance(meta, StepSegments) or meta.fold_tiles is None:
            return 0
        return fold_columns(meta.plan.fold, len(projections), meta.plan.fold_rank, meta.plan.fold_align)

    def folded(self, layer, projections, x, base, meta: Segments,
               wide: torch.Tensor | None = None) -> torch.Tensor | None:
        """base(x) plus the deltas of the step's fold segments computed by one matmul (kernels/lora_fold.py), or None
        when this step or this base does not fold. x may be the first columns of `wide`, whose other columns this
        fills (AdaptedLinear.input_buffer); else x is copied into a new one. apply(..., folded=True) then adds the
        other segments' deltas."""
        width = self.fold_width(projections, meta)
        can_fold = getattr(base, "can_fold", None)
        if not width or can_fold is None or not can_fold(x.shape[0], x.device, x.dtype):
            return None
        T, in_features = x.shape
        columns = in_features + width
        if (wide is not None and wide.shape == (T, columns) and wide.is_contiguous() and x.data_ptr() == wide.data_ptr()
                and x.stride() == (columns, 1)):
            xw = wide  # the producer wrote x into AdaptedLinear.input_buffer
        else:  # the producer wrote x elsewhere: a copy (8B, 2,048 tokens: 130 us a layer, H100)
            xw = torch.empty(T, columns, dtype=x.dtype, device=x.device)
            xw[:, :in_features].copy_(x)
        plan, proj_ids = meta.fold_plan, [self.proj_ids[p] for p in projections]
        partials, num_splits = self._shrink(layer, projections, x, meta.token_order, meta.fold_tiles, meta.fold_count,
                                            plan, presum=False)  # fold_inputs adds the splits of its own rows
        table, scales = self.table[:, layer], self.scales[:, layer]
        fold_inputs(xw, in_features, meta.token_block, meta.token_row, partials, num_splits, table, meta.fold_slots,
                    proj_ids, meta.plan.fold_rank)
        out_features = [self.projection_shapes[p][1] for p in projections]
        return base.folded_forward(xw, lambda w: fold_weights(
            w, 0, self.pool.buffer, table, scales, meta.fold_slots, proj_ids, out_features, meta.plan.fold_rank))

    def _shrink(self, layer, projections, x, token_order, tiles, tile_count, plan: LaunchPlan, presum: bool = True):
        """The shrink of one tile list: (partial sums, how many splits they hold). presum: the splits added up front
        where the plan's config says (one pass over every row of the partials)."""
        cfg = plan.config
        proj_ids = [self.proj_ids[p] for p in projections]
        in_features = self.projection_shapes[projections[0]][0]
        blocks = plan.max_k + int(plan.has_general)
        rank_tiles = -(-plan.block_rank // cfg.block_r)
        num_splits = self.splits(plan, projections)
        partials = torch.empty(num_splits, token_order.shape[0], MAX_FUSED, plan.width,
                               dtype=torch.float32, device=x.device)
        shrink(x, token_order, tiles, tile_count, plan.grid_tiles, self.pool.buffer, self.table[:, layer], proj_ids,
               blocks, rank_tiles, partials, num_splits, cfg, aligned=self._aligned(plan, [in_features]), pdl=self.pdl)
        if presum and num_splits > 1 and (self.presum if self.presum is not None else cfg.presum):
            partials, num_splits = partials.sum(0, keepdim=True), 1
        return partials, num_splits

    def _launch(self, layer, projections, x, y, token_order, tiles, tile_count, plan: LaunchPlan) -> None:
        """Shrink and expand (and the DoRA rescale) of one tile list."""
        cfg = plan.config
        partials, num_splits = self._shrink(layer, projections, x, token_order, tiles, tile_count, plan)
        proj_ids = [self.proj_ids[p] for p in projections]
        out_features = [self.projection_shapes[p][1] for p in projections]
        table, scales = self.table[:, layer], self.scales[:, layer]
        grid_tiles = plan.grid_tiles if plan.busy_tiles is None else -(-plan.grid_tiles // self.expand_grid_divisor)
        common = (y, token_order, tiles, tile_count, grid_tiles, self.pool.buffer, table, scales, proj_ids,
                  out_features, plan.max_k, partials, num_splits, cfg)
        aligned = self._aligned(plan, out_features)
        if plan.has_general and self.hybrid_passes == 2:
            expand(*common, blocks=True, general=False, aligned=aligned, pdl=self.pdl)
            expand(*common, blocks=False, general=True, aligned=aligned, pdl=self.pdl)
        else:
            expand(*common, blocks=True, general=plan.has_general, aligned=aligned, pdl=self.pdl)
        if plan.has_dora:
            dora_rescale(y, token_order, tiles, self.pool.buffer, table, proj_ids, out_features, cfg)

    def splits(self, plan: LaunchPlan, projections: tuple[str, ...]) -> int:
        """How many pieces the shrink cuts the input features into for this plan (tile_config.choose_splits)."""
        if self.num_splits:
            return self.num_splits
        blocks = plan.max_k + int(plan.has_general)
        rank_tiles = -(-plan.block_rank // plan.config.block_r)
        in_features = self.projection_shapes[projections[0]][0]
        return choose_splits(plan.grid_tiles * len(projections) * blocks * rank_tiles, in_features // plan.max_k,
                             plan.config.block_k, self.num_sms)

    @staticmethod
    def _aligned(plan: LaunchPlan, widths: list[int]) -> bool:
        """Whether every block width (width / k for each k in use) is a multiple of 8 elements."""
        return all(w % (8 * k) == 0 for w in widths for k in plan.ks)
