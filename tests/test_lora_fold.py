"""Adapter deltas folded into the base matmul (kernels/lora_fold.py) on the CPU (TRITON_INTERPRET=1): the folded
kernels against a torch reference, which segments a mixed step folds, and a folded projection against base + deltas."""

from triton_interpreter import fresh_process_test, needs_interpreter  # (first: it asks for the interpreter)
import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels.lora_fold import FOLD_BLOCKS, fold_inputs, fold_weights
from loraplex.runtime.model import AdaptedLinear, StepContext
from test_kernels import GATE_UP, GROUPS, QKV, SHAPES, make_adapter, make_ops, reference

test_in_fresh_process = fresh_process_test(__file__)


class FoldableLinear(torch.nn.Linear):
    """A dense stand-in for NF4Linear's prefill path: folds above 64 rows, as NF4Linear.can_fold says on CUDA."""

    def can_fold(self, rows, device, dtype):
        return rows > 64 and dtype == self.weight.dtype

    def folded_forward(self, xw, write_columns):
        extension = torch.full((self.out_features, xw.shape[1] - self.in_features), float("nan"), dtype=xw.dtype)
        write_columns(extension)  # every column written: NaN would survive otherwise
        return F.linear(xw, torch.cat([self.weight, extension], 1), self.bias)


def folding_ops(adapters):
    """Triton ops over these adapters, folding turned on (off by default), for mixed steps of up to 256 tokens."""
    ops = make_ops(adapters)
    ops.graph_rows, ops.graph_tokens = 16, 256
    assert ops.fold_blocks == 0 and ops.set_fold_blocks(FOLD_BLOCKS) == FOLD_BLOCKS
    return ops


def base_for(group, seed=5):
    torch.manual_seed(seed)
    return FoldableLinear(SHAPES[group[0]][0], sum(SHAPES[p][1] for p in group), bias=False)


def mixed_step():
    """Adapters and the token slots of a 256-token mixed step: two plain LoRA prefill chunks (slots 1, 0), a GraLoRA
    chunk (4), a DoRA-less plain chunk too short to fold (5), decode rows (2, 3), base rows, padding."""
    adapters = {0: make_adapter(r=16, seed=90), 1: make_adapter(r=8, seed=91), 2: make_adapter(r=16, seed=92),
                3: make_adapter(k=4, r=8, hybrid_r=4, seed=93), 4: make_adapter(k=2, r=16, seed=94),
                5: make_adapter(r=16, seed=95)}
    slots = [1] * 90 + [0, 2, -1, 3] + [0] * 70 + [4] * 40 + [5] * 20 + [-1] * 5 + [1, 1]
    return adapters, slots + [-1] * (256 - len(slots))


@needs_interpreter
def test_fold_kernels_write_each_tokens_block_and_each_projections_rows():
    g = torch.Generator().manual_seed(3)
    adapters = {0: make_adapter(r=8, seed=10), 2: make_adapter(r=16, seed=11)}
    ops = make_ops(adapters)
    proj_ids = [ops.proj_ids[p] for p in QKV]
    rb, T, fin = 16, 7, 64
    fold_slots = torch.tensor([2, 0], dtype=torch.int32)  # block 0: slot 2, block 1: slot 0
    token_block = torch.tensor([1, -1, 0, 0, 1, -1, 0], dtype=torch.int32)
    token_row = torch.tensor([4, 0, 1, 6, 2, 3, 5], dtype=torch.int32)
    partials = torch.randn(3, 8, 3, 32, generator=g)
    pad = 2 * rb  # zero columns past the blocks (lora_fold.FOLD_ALIGN)
    xw = torch.full((T, fin + 2 * 3 * rb + pad), float("nan"))
    fold_inputs(xw, fin, token_block, token_row, partials, 3, ops.table[:, 0], fold_slots, proj_ids, rb)
    assert torch.isnan(xw[:, :fin]).all(), "the input columns are the producer's"
    want = torch.zeros(T, 2 * 3 * rb + pad)
    summed = partials.sum(0)
    for t in range(T):
        b = int(token_block[t])
        if b < 0:
            continue
        rank = adapters[int(fold_slots[b])].modules[(0, "q_proj")].A.shape[-1]
        for p in range(3):
            want[t, (b * 3 + p) * rb:(b * 3 + p) * rb + rank] = summed[token_row[t], p, :rank]
    torch.testing.assert_close(xw[:, fin:], want, rtol=1e-6, atol=1e-6)

    outs = [SHAPES[p][1] for p in QKV]
    w = torch.full((sum(outs), 2 * 3 * rb + pad), float("nan"))
    fold_weights(w, 0, ops.pool.buffer, ops.table[:, 0], ops.scales[:, 0], fold_slots, proj_ids, outs, rb)
    want = torch.zeros_like(w)
    for b, slot in enumerate(fold_slots.tolist()):
        row = 0
        for p, proj in enumerate(QKV):
            m = adapters[slot].modules[(0, proj)]
            rank = m.B.shape[1]
            want[row:row + outs[p], (b * 3 + p) * rb:(b * 3 + p) * rb + rank] = m.scale * m.B[0].t()
            row += outs[p]
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_mixed_step_folds_the_long_plain_lora_chunks_only():
    adapters, slots = mixed_step()
    ops = folding_ops(adapters)
    meta = ops.metadata(slots, pad_to=256, mixed=True)
    assert meta.plan.fold == FOLD_BLOCKS and meta.plan.fold_rank == 16
    fold = [t for t in meta.fold_tiles.tolist()[:meta.fold_count.item()]]
    long = [t for t in meta.tiles.tolist()[:meta.tile_count.item()]]
    short = [t for t in meta.short_tiles.tolist()[:meta.short_count.item()]]
    assert {t[0] for t in fold} == {0, 1}  # 92 and 71 tokens of 256; the GraLoRA chunk does not fold
    assert {t[0] for t in long} == {4, 5} and {t[0] for t in short} == {2, 3}
    assert meta.fold_slots.tolist() == [0, 1]
    blocks = meta.token_block[:len(slots)].tolist()
    assert all(b == (0 if s == 0 else 1 if s == 1 else -1) for s, b in zip(slots, blocks))
    order = meta.token_order.tolist()
    assert all(order[meta.token_row[t]] == t for t, b in enumerate(blocks) if b >= 0)
    assert ops.fold_width(QKV, meta) == 128 and ops.fold_width(("o_proj",), meta) == 128  # (FOLD_ALIGN)
    ops.fold_align = 1
    meta = ops.metadata(slots, pad_to=256, mixed=True)
    assert ops.fold_width(QKV, meta) == FOLD_BLOCKS * 3 * 16 and ops.fold_width(("o_proj",), meta) == FOLD_BLOCKS * 16
    # a step with fewer tokens, a smaller share, or folding turned off: nothing folds
    assert ops.metadata([1] * 100 + [-1] * 28, pad_to=128, mixed=True).plan.fold == FOLD_BLOCKS
    assert ops.metadata([1] * 60 + [-1] * 68, pad_to=128, mixed=True).fold_tiles is None  # under 64 tokens
    assert ops.metadata([1] * 70 + [-1] * 698, pad_to=768, mixed=True).fold_tiles is None  # under 1/8 of the step
    ops.fold_blocks = 0
    assert ops.metadata(slots, pad_to=256, mixed=True).fold_tiles is None


@needs_interpreter
@pytest.mark.parametrize("group,align,splits", [(g, 128, None) for g in GROUPS]
                         + [(QKV, 1, None), (("down_proj",), 1, None), (GATE_UP, 128, 3)])
def test_folded_projection_equals_base_plus_deltas(group, align, splits):
    """Folded (the chunks' deltas inside the base matmul, the other segments by the kernels), with the input written
    into the wider buffer by its producer or copied there, and unfolded: all equal base + every token's delta.
    align: the extension padded with zero columns to a multiple of it, or not; splits: the shrink's (the folded rows'
    split sums added by fold_inputs, the others' up front). In inference mode, as the engine runs
    (where a view records no _base: a check through it copied every input on the GPU, 130 us a layer of 8B)."""
    adapters, slots = mixed_step()
    ops = folding_ops(adapters)
    ops.fold_align, ops.num_splits, ops.presum = align, splits, (True if splits else None)
    meta = ops.metadata(slots, pad_to=256, mixed=True)
    base = base_for(group)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(slots), base.in_features, generator=g)
    with torch.inference_mode():
        want, touched = reference(adapters, slots, 0, group, x, base(x))
        layer = AdaptedLinear(base, 0, group)
        ctx = StepContext(positions=torch.zeros(len(slots)), slot_mapping=torch.zeros(len(slots)), lora=ops,
                          lora_meta=meta)
        buffer = layer.input_buffer(len(slots), x.dtype, x.device, ctx)
        assert buffer is not None and buffer.shape == x.shape and buffer.stride(0) > x.shape[1]
        wide = layer._wide_input
        buffer.copy_(x)
        wide[:, x.shape[1]:] = float("nan")
        in_place = layer(buffer, ctx)
        extension = wide[:, x.shape[1]:]
        assert not extension.isnan().any() and extension.abs().sum() > 0, "the fold wrote the producer's buffer"
        assert ops.folded(0, group, x, base, meta) is not None
        copied = layer(x, ctx)
        ops.fold_blocks = 0
        unfolded_meta = ops.metadata(slots, pad_to=256, mixed=True)
        assert unfolded_meta.fold_tiles is None
        unfolded = layer(x, StepContext(positions=ctx.positions, slot_mapping=ctx.slot_mapping, lora=ops,
                                        lora_meta=unfolded_meta))
    assert touched.any()
    for got in (in_place, copied, unfolded):
        err = (got.double() - want).norm() / (want - base(x).double()).norm()
        assert err < 1e-4, f"relative error {err:.2e}"


@needs_interpreter
def test_a_base_that_cannot_fold_gets_the_fold_segments_expanded():
    adapters, slots = mixed_step()
    ops = folding_ops(adapters)
    meta = ops.metadata(slots, pad_to=256, mixed=True)
    dense = torch.nn.Linear(64, 64, bias=False)  # no can_fold: the plain path, fold tiles shrunk and expanded
    layer = AdaptedLinear(dense, 0, ("o_proj",))
    ctx = StepContext(positions=torch.zeros(256), slot_mapping=torch.zeros(256), lora=ops, lora_meta=meta)
    assert layer.input_buffer(256, torch.float32, torch.device("cpu"), ctx) is None
    x = torch.randn(256, 64)
    with torch.no_grad():
        want, _ = reference(adapters, slots, 0, ("o_proj",), x, dense(x))
        got = layer(x, ctx)
    assert (got.double() - want).norm() / want.norm() < 1e-5


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_start_up_self_check_passes_and_sees_a_wrong_kernel(dtype, monkeypatch):
    from loraplex.kernels import lora_fold
    assert lora_fold.self_check(torch.device("cpu"), dtype) is None
    monkeypatch.setattr(lora_fold, "fold_weights", lambda w, *args: w.zero_())
    assert "fold_weights differs" in lora_fold.self_check(torch.device("cpu"), dtype)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's scale * B: the point
def test_an_overflowing_adapter_cannot_turn_another_requests_output_into_nan():
    """scale * B past the weight dtype's range would be inf in the folded columns, and every other token multiplies
    them by zero: NaN in other requests' outputs. The columns are clamped to the largest finite value instead."""
    adapters, slots = mixed_step()
    huge = adapters[1]
    for m in huge.modules.values():
        m.B.fill_(3e38)  # finite in fp32; times the scale past fp32's largest
        m.scale = 4.0
    ops = folding_ops(adapters)
    meta = ops.metadata(slots, pad_to=256, mixed=True)
    assert meta.fold_slots.tolist() == [0, 1]
    base = base_for(QKV)
    x = torch.randn(len(slots), base.in_features, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y = ops.folded(0, QKV, x, base, meta)
        ops.apply(0, QKV, x, y, meta, folded=True)
        others = [t for t, s in enumerate(slots) if s != 1]
        assert torch.isfinite(y[others]).all()
        want, _ = reference({k: v for k, v in adapters.items() if k != 1}, [s if s != 1 else -1 for s in slots], 0,
                            QKV, x, base(x))
        assert torch.allclose(y[others].double(), want[others], rtol=1e-4, atol=1e-4)
