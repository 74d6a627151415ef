"""The segmented Triton kernels on the CPU (TRITON_INTERPRET=1) against a float64 reference."""

from dataclasses import replace

from triton_interpreter import fresh_process_test, needs_interpreter  # (first: it asks for the interpreter)
import pytest
import torch

from loraplex.kernels import ops as kernel_ops
from loraplex.kernels.ops import TritonAdapterOps
from loraplex.kernels.tile_config import TileConfig
from loraplex.kernels.weight_pool import WeightPool
from loraplex.runtime.adapters.ops import TorchAdapterOps, module_delta
from loraplex.runtime.adapters.peft_format import AdapterWeights, ModuleDelta
from loraplex.runtime.adapters.segments import Segments, build_segments


test_in_fresh_process = fresh_process_test(__file__)


SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
GROUPS = (QKV, ("o_proj",), GATE_UP, ("down_proj",))
RTOL = 1e-4


def make_adapter(k=1, r=16, hybrid_r=0, layers=(0,), projections=tuple(SHAPES), seed=0) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in layers:
        for proj in projections:
            fin, fout = SHAPES[proj]
            A = torch.randn(k, fin // k, r, generator=g) / fin ** 0.5
            B = torch.randn(k, r, fout // k, generator=g)
            gA = torch.randn(fin, hybrid_r, generator=g) / fin ** 0.5 if hybrid_r else None
            gB = torch.randn(hybrid_r, fout, generator=g) if hybrid_r else None
            modules[(layer, proj)] = ModuleDelta(k, A, B, 0.5 + torch.rand(1, generator=g).item(), gA, gB)
    return AdapterWeights("GRALORA" if k > 1 or hybrid_r else "LORA", k * r + hybrid_r, {}, modules)


def make_ops(adapters: dict[int, AdapterWeights], num_slots=8, num_layers=1, dtype=torch.float32):
    ops = TritonAdapterOps(num_slots, SHAPES, num_layers, "cpu", dtype)
    for slot, adapter in adapters.items():
        ops.load(slot, adapter)
    return ops


def reference(adapters, token_slots, layer, projections, x, y0):
    """float64 y0 + deltas, and a mask of the elements any delta touches."""
    y, touched = y0.double().clone(), torch.zeros(y0.shape, dtype=torch.bool)
    for slot in set(token_slots) - {-1}:
        rows = torch.tensor([t for t, s in enumerate(token_slots) if s == slot])
        col = 0
        for proj in projections:
            out = SHAPES[proj][1]
            m = adapters[slot].modules.get((layer, proj)) if slot in adapters else None
            if m is not None:
                y[rows, col:col + out] += module_delta(x[rows].double(), m.to("cpu", torch.float64))
                touched[rows, col:col + out] = True
            col += out
    return y, touched


def run_and_check(ops, adapters, token_slots, projections, layer=0, meta=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    fin = SHAPES[projections[0]][0]
    x = torch.randn(len(token_slots), fin, generator=g)
    y0 = torch.randn(len(token_slots), sum(SHAPES[p][1] for p in projections), generator=g)
    meta = meta if meta is not None else ops.metadata(token_slots)
    if hasattr(meta, "partials"):
        meta.partials.fill_(float("nan"))  # expand must read only what shrink wrote
    y = y0.clone().to(ops.dtype)
    ops.apply(layer, projections, x.to(ops.dtype), y, meta)
    ref, touched = reference(adapters, token_slots, layer, projections, x.to(ops.dtype).float(), y0.to(ops.dtype))
    y = y.float()
    assert torch.equal(y[~touched], y0.to(ops.dtype).float()[~touched]), "an element without a delta changed"
    assert not torch.isnan(y).any()
    delta_ref = ref - y0.to(ops.dtype).double()
    err = (y.double() - ref).norm() / delta_ref.norm().clamp_min(1e-30)
    assert err < (RTOL if ops.dtype == torch.float32 else 2e-2), f"relative error {err:.2e}"
    return touched


@needs_interpreter
def test_lora_many_tokens_per_segment():
    adapters = {0: make_adapter(r=16, seed=1), 3: make_adapter(r=16, seed=2)}
    slots = [0, 3, -1, 0, 0, 3] * 7  # segments of 21 and 14 tokens, 7 rows without adapter
    touched = run_and_check(make_ops(adapters), adapters, slots, QKV)
    assert touched.any(1).sum() == 35


@needs_interpreter
@pytest.mark.parametrize("k", [2, 4])
def test_gralora(k):
    adapters = {1: make_adapter(k=k, r=16, seed=k)}
    run_and_check(make_ops(adapters), adapters, [1, -1, 1, 1], QKV)


@needs_interpreter
@pytest.mark.parametrize("passes", [1, 2])
def test_hybrid_one_and_two_passes(passes):
    adapters = {0: make_adapter(k=2, r=8, hybrid_r=8, seed=3), 1: make_adapter(r=8, seed=4)}
    ops = make_ops(adapters)
    ops.hybrid_passes = passes
    run_and_check(ops, adapters, [0, 1, 0, -1, 1], QKV)
    run_and_check(ops, adapters, [0, 0, 1], GATE_UP)


@needs_interpreter
def test_mixed_ranks_in_one_launch(monkeypatch):
    # ranks 20 and 12 / 6 (not multiples of 8 or of the 16-wide rank tile): the rank loop past one tile
    adapters = {0: make_adapter(r=8, seed=5), 1: make_adapter(r=16, seed=6), 2: make_adapter(r=64, seed=7),
                3: make_adapter(k=4, r=16, hybrid_r=16, seed=8), 4: make_adapter(r=20, seed=9),
                5: make_adapter(k=2, r=12, hybrid_r=6, seed=10)}
    ops = make_ops(adapters)
    launches = []
    for name in ("shrink", "expand"):
        original = getattr(kernel_ops, name)
        monkeypatch.setattr(kernel_ops, name, lambda *a, _f=original, _n=name, **kw: (launches.append(_n), _f(*a, **kw)))
    run_and_check(ops, adapters, [2, 0, 1, 3, 2, -1, 0, 1, 3, 3, 2, 4, 5, 4, 5, 5], QKV)
    assert launches == ["shrink", "expand"]


@needs_interpreter
@pytest.mark.parametrize("block_m", [1, 2, 16])  # < 16: the register (no tl.dot) decode path
def test_few_tokens_per_segment_with_split_inputs(block_m):
    adapters = {s: make_adapter(k=1 + (s % 2), r=8 * (1 + s % 2), seed=10 + s) for s in range(6)}
    ops = make_ops(adapters)
    ops.tile_config = TileConfig(block_m=block_m, block_k=32, block_r=16, block_n=32)
    slots = [5, 0, 3, -1, 1, 4, 2, 2, 2, 2, 2]  # slot 2: 5 tokens, in tiles of block_m rows
    ops.num_splits = 1
    run_and_check(ops, adapters, slots, QKV)
    # down_proj (in=128) in 32-wide steps over 3 splits: split 3 is empty (it must write zeros)
    ops.num_splits = 3
    run_and_check(ops, adapters, slots, ("down_proj",))


@needs_interpreter
def test_prefill_tiles(monkeypatch):
    adapters = {0: make_adapter(r=64, seed=20), 1: make_adapter(k=2, r=16, hybrid_r=8, seed=21)}
    ops = make_ops(adapters)
    slots = [0] * 70 + [1] * 20 + [-1] * 5
    meta = ops.metadata(slots)
    assert meta.config.block_m == 32 and meta.tiles.shape[0] == 4  # 70 tokens = 3 tiles, 20 = 1
    run_and_check(ops, adapters, slots, ("down_proj",), meta=meta)
    # split-K partials added up once before the expand (prefill tiles' default) or by every output tile
    sums = []
    original = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda t, *a, **kw: (sums.append(t.shape), original(t, *a, **kw))[1])
    ops.num_splits = 2
    for presum, sums_expected in ((None, 1), (False, 0), (True, 1)):
        ops.presum, sums[:] = presum, []
        run_and_check(ops, adapters, slots, ("down_proj",), meta=meta)
        run_and_check(ops, adapters, slots, GATE_UP, meta=meta)
        assert len([s for s in sums if s[0] == 2]) == 2 * sums_expected


@needs_interpreter
def test_empty_segments_and_rows_without_adapter():
    adapters = {2: make_adapter(r=16, seed=30)}
    ops = make_ops(adapters)
    run_and_check(ops, adapters, [-1, -1, -1], QKV)  # no segment at all
    base = build_segments([-1, 2, -1, 2, -1], "cpu")
    # a zero-length segment (slot 5) between real ones: it must do nothing
    seg = Segments(num_tokens=5, token_order=base.token_order, starts=torch.tensor([0, 2], dtype=torch.int32),
                   lengths=torch.tensor([2, 0], dtype=torch.int32), slots=torch.tensor([2, 5], dtype=torch.int32),
                   host=[(0, 2, 2), (2, 0, 5)], max_length=2)
    touched = run_and_check(ops, adapters, [-1, 2, -1, 2, -1], QKV, meta=ops.extend(seg))
    assert touched.any(1).tolist() == [False, True, False, True, False]


@needs_interpreter
def test_missing_modules_and_layers():
    adapters = {0: make_adapter(r=8, projections=("q_proj", "v_proj"), layers=(1,), seed=40),
                1: make_adapter(k=2, r=8, projections=("k_proj", "down_proj"), layers=(0, 1), seed=41)}
    ops = make_ops(adapters, num_layers=2)
    slots = [0, 1, 0, 1]
    for layer in (0, 1):
        for group in (QKV, ("down_proj",)):
            run_and_check(ops, adapters, slots, group, layer=layer)


@needs_interpreter
def test_matches_torch_ops():
    adapters = {0: make_adapter(r=8, layers=(0, 1), seed=50), 2: make_adapter(k=4, r=16, layers=(0, 1), seed=51),
                5: make_adapter(k=2, r=16, hybrid_r=16, layers=(0, 1), seed=52)}
    triton_ops = make_ops(adapters, num_layers=2)
    torch_ops = TorchAdapterOps(8, SHAPES, 2, "cpu", torch.float32)
    for slot, adapter in adapters.items():
        torch_ops.load(slot, adapter)
    slots = [2, 0, -1, 5, 5, 2, 0, 0, -1, 5]
    g = torch.Generator().manual_seed(53)
    for layer, group in zip((0, 1, 0, 1), GROUPS):
        x = torch.randn(len(slots), SHAPES[group[0]][0], generator=g)
        y = torch.randn(len(slots), sum(SHAPES[p][1] for p in group), generator=g)
        y_triton, y_torch = y.clone(), y.clone()
        triton_ops.apply(layer, group, x, y_triton, triton_ops.metadata(slots))
        torch_ops.apply(layer, group, x, y_torch, torch_ops.metadata(slots))
        torch.testing.assert_close(y_triton, y_torch, rtol=1e-4, atol=1e-4)


@needs_interpreter
def test_load_evict_reload_reuses_the_pool():
    small, big = make_adapter(r=8, seed=60), make_adapter(r=64, seed=61)
    ops = make_ops({0: small, 1: small})
    ops.evict(0)
    ops.load(0, make_adapter(r=8, seed=62))  # fits the freed region exactly: no growth
    assert ops.pool.version == 2  # the first two loads grew it twice
    ops.load(1, big)  # replaces slot 1 with a larger adapter: the pool grows, offsets stay valid
    adapters = {0: make_adapter(r=8, seed=62), 1: big}
    run_and_check(ops, adapters, [0, 1, 1, 0, 3], QKV)
    ops.evict(1)
    run_and_check(ops, {0: adapters[0]}, [0, 1, 1, 0], QKV)  # evicted slot: its rows untouched


def test_copy_shares_cut_pieces_into_serial_views_that_copy_the_same():
    """packed_layout.copy_shares: every chunk a view (of the pool and of the piece) of at most SERIAL_ELEMENTS, a
    transposed piece included, dealt into at most n runs; copying them gives what copying the whole pieces gives."""
    from loraplex.kernels import packed_layout as layout
    g = torch.Generator().manual_seed(5)
    pieces = [torch.randn(16, 4096, generator=g), torch.randn(14336, 16, generator=g).t(),  # B, as PEFT keeps it
              torch.randn(2, 8, 2048, generator=g), torch.randn(100, generator=g), torch.randn(3, 40000, generator=g)]
    pool = torch.zeros(sum(p.numel() for p in pieces), dtype=torch.bfloat16)
    targets, offset = [], 0
    for p in pieces:
        targets.append(pool[offset:offset + p.numel()].view(p.shape))
        offset += p.numel()
    shares = layout.copy_shares(targets, pieces, 3)
    assert 1 <= len(shares) <= 3
    chunks = [(t, p) for ts, ps in shares for t, p in zip(ts, ps)]
    assert all(t.shape == p.shape and t.numel() <= layout.SERIAL_ELEMENTS for t, p in chunks)
    assert all(t.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr() for t, _ in chunks)
    assert sum(t.numel() for t, _ in chunks) == pool.numel()
    for ts, ps in shares:
        torch._foreach_copy_(ts, ps)
    expected = torch.cat([p.reshape(-1) for p in pieces]).to(torch.bfloat16)
    assert torch.equal(pool, expected)


@needs_interpreter
def test_packs_take_the_spare_block_of_their_size():
    """After a pack, memory for the next packed copy of that size is allocated in the background (pinned on CUDA):
    the next adapter of the same size is packed into it, one of another size into fresh memory; both stay right."""
    first, second, other = make_adapter(r=8, seed=80), make_adapter(r=8, seed=81), make_adapter(r=16, seed=82)
    ops = make_ops({0: first})
    spare = ops.host_buffers.spare.result()
    ops.load(1, second)
    assert second.packed.data.data_ptr() == spare.data_ptr()
    assert ops.host_buffers.spare.result().data_ptr() != spare.data_ptr()  # the next one
    ops.load(2, other)  # another size: fresh memory; the spare waiting is replaced by one of the new size
    assert other.packed.data.data_ptr() != ops.host_buffers.spare.result().data_ptr()
    assert ops.host_buffers.spare.result().numel() == other.packed.data.numel()
    run_and_check(ops, {0: first, 1: second, 2: other}, [0, 1, 2, 2, 1, 0, 3], QKV)


@needs_interpreter
def test_graph_metadata_is_reused_while_slots_and_residency_stay():
    """Consecutive decode steps of one batch share their metadata (the fixed buffers already hold it);
    a load or an evict, or other slots, make it anew, and the deltas stay right."""
    adapters = {0: make_adapter(r=8, seed=70), 1: make_adapter(k=2, r=16, seed=71)}
    ops = make_ops(adapters)
    slots = [1, 0, -1, 1]
    first = ops.metadata(slots, pad_to=8)
    assert ops.metadata(slots, pad_to=8) is first
    other = ops.metadata([0, 0, 1, -1], pad_to=8)
    assert other is not first
    again = ops.metadata(slots, pad_to=8)
    assert again is not first  # the buffers held the other step's rows: written again
    run_and_check(ops, adapters, slots + [-1] * 4, QKV, meta=again)
    adapters[0] = make_adapter(r=32, seed=72)
    ops.load(0, adapters[0])
    reloaded = ops.metadata(slots, pad_to=8)
    assert reloaded is not again and reloaded.plan != again.plan  # rank 32 now
    run_and_check(ops, adapters, slots + [-1] * 4, QKV, meta=reloaded)


@needs_interpreter
def test_mixed_graph_metadata_pads_prefill_tiles():
    """A mixed CUDA-graph step (prefill chunks beside decode rows, padded to a token bucket): long segments
    in prefill tiles, short ones (decode rows) in one-row tiles, each list padded with null-slot tiles to a
    count that any step of that bucket fits, in buffers whose address stays for every bucket; the deltas
    equal the reference for the real rows and leave padding alone."""
    adapters = {0: make_adapter(r=8, seed=80), 1: make_adapter(k=2, r=16, seed=81), 2: make_adapter(r=16, seed=82),
                3: make_adapter(k=4, r=8, hybrid_r=4, seed=83)}
    ops = make_ops(adapters)
    ops.graph_rows, ops.graph_tokens = 8, 256
    # a 70-token chunk, decode rows (slots 0, 2, 3 and none), a 20-token chunk; slot 3 has two decode rows
    slots = [1] * 70 + [0, 2, -1, 3, 1, 3] + [0] * 20
    padded = slots + [-1] * (128 - len(slots))
    meta = ops.metadata(padded, pad_to=128, mixed=True)
    block_m = meta.plan.config.block_m
    assert meta.tiles.shape[0] == meta.plan.num_tiles == 128 // block_m + 8
    assert meta.short_tiles.shape[0] == meta.short_plan.num_tiles == 2 * 8
    assert meta.short_plan.config.block_m == 1 and meta.short_plan.width == meta.plan.width
    long = [t for t in meta.tiles.tolist() if t[0] != ops.null_slot]
    short = [t for t in meta.short_tiles.tolist() if t[0] != ops.null_slot]
    assert sorted(t[0] for t in short) == [2, 3, 3] and {t[0] for t in long} == {0, 1}
    assert sum(min(end - first, block_m) for _, first, end in long) == 71 + 21
    for group in GROUPS:
        run_and_check(ops, adapters, padded, group, meta=meta)
    # programs on the tile axis: the bucket's full tiles + one per segment (up to 16 or the full count), and
    # SHORT_GRID at most for the one-row tiles
    assert meta.plan.busy_tiles == 128 // block_m + 8 and meta.short_plan.busy_tiles == 2 * 8
    assert meta.tile_count.item() == len(long) and meta.short_count.item() == len(short)
    ops.num_splits = 2  # split-K under the padded tiles (what an 8B-shaped GPU step gets, below)
    run_and_check(ops, adapters, padded, QKV, meta=meta)
    # fewer programs than working tiles: each program strides over several tiles
    strided = replace(meta, plan=replace(meta.plan, busy_tiles=1), short_plan=replace(meta.short_plan, busy_tiles=2))
    for group in GROUPS:
        run_and_check(ops, adapters, padded, group, meta=strided)
    ops.num_splits = None
    larger = ops.metadata([0] * 200 + [2] + [-1] * 55, pad_to=256, mixed=True)
    assert larger.tiles.data_ptr() == meta.tiles.data_ptr()  # captured graphs keep their addresses
    assert larger.token_order.data_ptr() == meta.token_order.data_ptr()
    run_and_check(ops, adapters, [0] * 200 + [2] + [-1] * 55, QKV, meta=larger)


@needs_interpreter
def test_expand_with_fewer_programs_than_tiles():
    """expand_grid_divisor: the expand's tile axis cut to a quarter, each program striding over several tiles' outputs
    (decode rows, prefill chunks and split-K partials alike): the same deltas."""
    adapters = {0: make_adapter(r=8, seed=90), 1: make_adapter(k=2, r=16, seed=91), 2: make_adapter(r=16, seed=92)}
    ops = make_ops(adapters)
    ops.graph_rows, ops.graph_tokens = 8, 256
    slots = [1] * 70 + [0, 2, -1, 2, 1] + [0] * 20
    padded = slots + [-1] * (128 - len(slots))
    ops.expand_grid_divisor, ops.num_splits = 4, 2
    meta = ops.metadata(padded, pad_to=128, mixed=True)
    assert -(-meta.plan.grid_tiles // 4) < meta.tile_count.item()
    for group in GROUPS:
        run_and_check(ops, adapters, padded, group, meta=meta)
    for group in GROUPS:  # an eager step's metadata: not padded, one program per tile whatever the divisor
        run_and_check(ops, adapters, slots, group)


@needs_interpreter
def test_mixed_graph_split_k_counts_the_working_tiles_not_the_padding():
    """A mixed graph's prefill tile list is padded with null tiles (one per possible sequence): the shrink's
    split-K must be sized by the tiles a step of the bucket fills, or a 1,024-token step on an 8B shape
    streams each 14,336-feature input on 16 programs of an H100's 132 multiprocessors."""
    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
              "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
    ops = TritonAdapterOps(8, shapes, 1, "cpu", torch.float32)
    ops.graph_rows, ops.graph_tokens, ops.num_sms = 256, 2048, 132
    meta = ops.metadata([0] * 900 + [1] * 60 + list(range(2, 8)) + [-1] * 58, pad_to=1024, mixed=True)
    bm = meta.plan.config.block_m
    assert meta.plan.num_tiles == 1024 // bm + 8 and meta.plan.busy_tiles == 1024 // bm + 8
    padded_count = replace(meta.plan, busy_tiles=None)
    for group in GROUPS:
        assert ops.splits(meta.plan, group) >= ops.splits(padded_count, group)
    assert ops.splits(meta.plan, ("down_proj",)) >= 8 > ops.splits(replace(padded_count, num_tiles=272), ("down_proj",))


@needs_interpreter
def test_ranks_up_to_a_power_of_two_share_a_launch_plan():
    """A launch plan (part of a CUDA graph's key) rounds rank and width up to a power of two (>= 16): rank 4,
    8 and 16 adapters replay one graph, rank 32 gets its own; the results stay exact (run_and_check)."""
    adapters = {0: make_adapter(r=4, seed=90), 1: make_adapter(r=16, seed=91), 2: make_adapter(r=32, seed=92),
                3: make_adapter(r=8, seed=93)}
    ops = make_ops(adapters)
    plans = {slot: ops.metadata([slot] * 4, pad_to=4).plan for slot in adapters}
    assert plans[0] == plans[1] == plans[3] != plans[2]
    assert (plans[0].block_rank, plans[0].width, plans[2].block_rank) == (16, 16, 32)
    slots = [0, 3, 3, 1, 2, -1]
    run_and_check(ops, adapters, slots, QKV, meta=ops.metadata(slots, pad_to=len(slots)))


@needs_interpreter
def test_weight_pool_first_fit_and_merge():
    pool = WeightPool("cpu", torch.float32)
    a, b, c = pool.allocate(100), pool.allocate(64), pool.allocate(10)
    assert (a, b) == (0, 128) and c % 64 == 0
    pool.buffer[b:b + 64] = 7.0
    pool.free(a)
    pool.free(c)
    assert pool.allocate(128) == 0  # first fit into the freed front
    pool.reserve(10_000)
    assert pool.capacity >= 10_000 and torch.all(pool.buffer[b:b + 64] == 7.0)
    pool.free(0)
    pool.free(b)
    assert pool.free_regions == [(0, pool.capacity)]


@needs_interpreter
def test_bf16_weights_and_activations():
    adapters = {0: make_adapter(r=16, seed=70), 1: make_adapter(k=4, r=16, hybrid_r=8, seed=71)}
    ops = make_ops(adapters, dtype=torch.bfloat16)
    run_and_check(ops, adapters, [0, 1, 1, -1, 0], QKV)
