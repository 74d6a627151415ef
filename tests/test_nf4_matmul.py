"""The fused NF4 kernel on the CPU (TRITON_INTERPRET=1) against a float64 reference on bitsandbytes'
own quantisation, and NF4Linear's CPU path against bitsandbytes' Linear4bit."""
import copy
from dataclasses import replace

from triton_interpreter import fresh_process_test, needs_interpreter  # (first: it asks for the interpreter)
import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from loraplex.kernels import nf4_matmul as nf4_module
from loraplex.kernels.nf4_dequant import nf4_dequantize
from loraplex.kernels.nf4_matmul import nf4_matmul
from loraplex.kernels.nf4_tiles import NF4Tiles, choose_tiles
from loraplex.runtime.nf4_linear import NF4Linear

BLOCKSIZE = 64  # bitsandbytes' CPU dequantise is wrong when in_features is not a multiple of the blocksize

test_in_fresh_process = fresh_process_test(__file__)


class _PoisonedTorch:
    """torch, except that torch.empty returns NaN-filled tensors: unwritten outputs show up."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, dtype=None, device=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    monkeypatch.setattr(nf4_module, "torch", _PoisonedTorch())


def quantize(out_features, in_features, compress, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(torch.bfloat16)
    return bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=compress)


def state_kwargs(state):
    if not state.nested:
        return {}
    return dict(nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                nested_blocksize=state.state2.blocksize, offset=state.offset)


def dequantized(packed, state, dtype):
    """bitsandbytes' dequantize_4bit by its definition, code[nibble] * absmax rounded to dtype (the high nibble first):
    on the CPU its own is wrong when a weight row is not a whole number of blocks, on AVX-512 hosts at blocksize 64
    too (72 x 160); test_reference_is_bitsandbytes checks the two agree where it is right."""
    p = packed.flatten()
    nibbles = torch.stack([p >> 4, p & 15], 1).flatten().long()
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    return (state.code[nibbles].reshape(-1, state.blocksize) * absmax.float()[:, None]).to(dtype).reshape(state.shape)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_bitsandbytes(compress, dtype):
    g = torch.Generator().manual_seed(int(compress))
    w = (torch.randn(72, 256, generator=g) * 0.05).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=compress)
    ours = copy.copy(state)
    ours.dtype = dtype  # dequantize_4bit rounds code * absmax to this dtype
    assert torch.equal(dequantized(packed, state, dtype), bnbf.dequantize_4bit(packed, ours, quant_type="nf4"))


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@needs_interpreter
@pytest.mark.parametrize("M", [1, 3, 16, 20])
@pytest.mark.parametrize("shape", [(192, 128), (128, 256)])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(M, shape, compress, bias):
    out_features, in_features = shape
    packed, state = quantize(out_features, in_features, compress, seed=M)
    g = torch.Generator().manual_seed(100 + M)
    x = torch.randn(M, in_features, generator=g).to(torch.bfloat16)
    b = torch.randn(out_features, generator=g).to(torch.bfloat16) if bias else None
    out = nf4_matmul(x, packed, state.absmax, state.code, BLOCKSIZE, out_features, bias=b, **state_kwargs(state))
    ref = x.double() @ dequantized(packed, state, torch.bfloat16).double().T
    if bias:
        ref += b.double()
    assert out.shape == (M, out_features) and out.dtype == torch.bfloat16
    assert not out.isnan().any()
    assert relative_error(out, ref) < 1e-2


@needs_interpreter
@pytest.mark.parametrize("tiles", [
    None,
    NF4Tiles(block_m=16, block_n=64, block_k=32, splits=3),  # pieces inside an absmax block, split-K
    NF4Tiles(block_m=32, block_n=32, block_k=256, splits=2),  # 4 absmax blocks per step
    NF4Tiles(block_m=64, block_n=128, block_k=64, splits=1),
    NF4Tiles(block_m=32, block_n=64, block_k=128, splits=2, num_warps=8),  # calibration's 64-feature / 8-warp tiles
    NF4Tiles(block_m=128, block_n=64, block_k=128, splits=1, num_warps=8),  # a wide batch's 128-feature steps
    NF4Tiles(block_m=16, block_n=64, block_k=64, splits=2, prefetch=True),  # next step's loads ahead, split-K
    NF4Tiles(block_m=16, block_n=32, block_k=32, splits=1, prefetch=True),  # two steps per absmax block
    NF4Tiles(block_m=64, block_n=64, block_k=64, splits=2, codes_as_b=True),  # x @ codes^T, split-K
    NF4Tiles(block_m=32, block_n=32, block_k=64, splits=4, sum_in_kernel=True),  # the split sums in the kernel
    NF4Tiles(block_m=64, block_n=32, block_k=128, splits=1, prefetch=False, codes_as_b=True),
])
@pytest.mark.parametrize("compress", [True, False])
def test_fp32_is_exact_on_the_format(tiles, compress):
    """fp32 x: fp32 codes and dot, so the result equals x @ dequantize_4bit(fp32).T to rounding: any slip in
    nibble order, block indexing or double-quantised absmax would show."""
    out_features, in_features, M = 96, 256, 5
    packed, state = quantize(out_features, in_features, compress, seed=7)
    x = torch.randn(M, in_features, generator=torch.Generator().manual_seed(8))
    out = nf4_matmul(x, packed, state.absmax, state.code, BLOCKSIZE, out_features, tiles=tiles, **state_kwargs(state))
    ref = x.double() @ dequantized(packed, state, torch.float32).double().T
    assert relative_error(out, ref) < 1e-5


@needs_interpreter
def test_fp16_many_rows_and_leading_dims():
    """70 rows: two 64-row tiles; x [2, 35, in] keeps its leading dims."""
    packed, state = quantize(128, 128, True, seed=3)
    x = torch.randn(2, 35, 128, generator=torch.Generator().manual_seed(4)).half()
    b = torch.randn(128).half()
    out = nf4_matmul(x, packed, state.absmax, state.code, BLOCKSIZE, 128, bias=b, **state_kwargs(state))
    ref = x.double() @ dequantized(packed, state, torch.float16).double().T + b.double()
    assert out.shape == (2, 35, 128) and out.dtype == torch.float16
    assert relative_error(out, ref) < 2e-3


@needs_interpreter
def test_split_k_is_deterministic():
    packed, state = quantize(64, 512, True, seed=5)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    tiles = NF4Tiles(block_m=16, block_n=32, block_k=64, splits=8)
    args = (x, packed, state.absmax, state.code, BLOCKSIZE, 64)
    first = nf4_matmul(*args, tiles=tiles, **state_kwargs(state))
    assert torch.equal(first, nf4_matmul(*args, tiles=tiles, **state_kwargs(state)))


@needs_interpreter
@pytest.mark.parametrize("bias", [False, True])
def test_split_sums_in_kernel_are_the_second_launchs(bias):
    """The tile's last program adds the partial sums in split order, as the second launch does: the same bits; and
    its arrival counts are zero again after each call (calls in a row give the same output)."""
    from loraplex.kernels.nf4_matmul import _arrival_counters
    packed, state = quantize(96, 512, True, seed=9)
    x = torch.randn(20, 512, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16) if bias else None
    tiles = NF4Tiles(block_m=16, block_n=32, block_k=64, splits=4, sum_in_kernel=True)  # 3 x 2 tiles of 4 splits
    args = (x, packed, state.absmax, state.code, BLOCKSIZE, 96)
    separate = nf4_matmul(*args, bias=b, tiles=replace(tiles, sum_in_kernel=False), **state_kwargs(state))
    for _ in range(2):
        assert torch.equal(nf4_matmul(*args, bias=b, tiles=tiles, **state_kwargs(state)), separate)
        assert not _arrival_counters(x.device).any()
    ref = x.double() @ dequantized(packed, state, torch.bfloat16).double().T + (b.double() if bias else 0)
    assert relative_error(separate, ref) < 1e-2


@needs_interpreter
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bitsandbytes(blocksize, compress, dtype):
    """The whole weight, as bitsandbytes' dequantize_4bit writes it: fp32 and fp16 equal, bf16 within one rounding
    step (the interpreter truncates to bf16 where the GPU rounds to nearest: tests/test_gpu_fastpath.py checks the
    GPU's); 72 x 160 weights are 180 blocks of 64, so the last program is partly masked."""
    g = torch.Generator().manual_seed(blocksize + compress)
    w = (torch.randn(72, 160 if blocksize == 64 else 256, generator=g) * 0.05).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=compress)
    out = torch.full(w.shape, float("nan"), dtype=dtype)
    nf4_dequantize(packed, state.absmax, state.code, blocksize, out, **state_kwargs(state))
    exact = dequantized(packed, state, torch.float32)
    if dtype == torch.bfloat16:
        assert ((out.float() - exact).abs() <= torch.finfo(dtype).eps * exact.abs()).all()
    else:
        assert torch.equal(out, dequantized(packed, state, dtype))


@needs_interpreter
def test_dequantize_into_rows_of_a_wider_buffer():
    """The folded prefill matmul's weight (kernels/lora_fold.py): the same values into the first columns of each row,
    the extension columns untouched."""
    packed, state = quantize(72, 192, True, seed=4)
    wide = torch.full((72, 192 + 48), 7.0, dtype=torch.bfloat16)
    nf4_dequantize(packed, state.absmax, state.code, BLOCKSIZE, wide[:, :192], **state_kwargs(state))
    alone = torch.empty(72, 192, dtype=torch.bfloat16)
    nf4_dequantize(packed, state.absmax, state.code, BLOCKSIZE, alone, **state_kwargs(state))
    assert torch.equal(wide[:, :192], alone) and (wide[:, 192:] == 7).all()
    with pytest.raises(ValueError):  # rows that split an absmax block
        nf4_dequantize(packed, state.absmax, state.code, BLOCKSIZE, torch.empty(144, 120)[:, :96],
                       **state_kwargs(state))


def test_dequantize_rejects_what_it_cannot_read():
    packed, state = quantize(64, 128, True, seed=1)
    with pytest.raises(ValueError):  # an output of another size
        nf4_dequantize(packed, state.absmax, state.code, BLOCKSIZE, torch.empty(64, 64), **state_kwargs(state))
    with pytest.raises(ValueError):  # uint8 absmax without its nested statistics
        nf4_dequantize(packed, state.absmax, state.code, BLOCKSIZE, torch.empty(64, 128))


def test_tile_rule_fits_every_shape():
    for M in (1, 2, 8, 16, 17, 32, 33, 64, 65, 200):
        for N, K in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (2048, 8192), (960, 576), (64, 64)):
            t = choose_tiles(M, N, K, BLOCKSIZE, 132)
            assert t.block_m == (128 if M > 64 else 64 if M > 32 else 32 if M > 16 else 16)
            assert t.num_warps == (8 if t.block_m == 128 else 4) and t.block_k >= 32 and K % t.block_k == 0
            k_tiles = K // t.block_k
            steps = -(-k_tiles // t.splits)
            assert 1 <= t.splits <= k_tiles and (t.splits - 1) * steps < k_tiles  # no split without work
            if t.splits > 1:  # fp32 partial sums stay under half of the packed weight bytes (64 rows' worth)
                assert t.splits * min(M, 64) * N * 4 <= N * K // 4


def test_rejects_inputs_it_cannot_read():
    packed, state = quantize(64, 128, True, seed=1)
    with pytest.raises(ValueError):  # in_features not a multiple of the blocksize
        nf4_matmul(torch.randn(1, 96), packed, state.absmax, state.code, BLOCKSIZE, 96)
    with pytest.raises(ValueError):  # uint8 absmax without its nested statistics
        nf4_matmul(torch.randn(1, 128), packed, state.absmax, state.code, BLOCKSIZE, 64)


def make_linear4bit(dense: torch.nn.Linear) -> bnb.nn.Linear4bit:
    """As runtime/base_model.py quantize_nf4 builds them (bf16 compute, double quant, blocksize 64)."""
    q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.to(torch.bfloat16).contiguous(), requires_grad=False,
                                 blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    if dense.bias is not None:
        q.bias = torch.nn.Parameter(dense.bias.data.to(torch.bfloat16), requires_grad=False)
    return q.to("cpu")


@pytest.mark.parametrize("training", [True, False])
def test_nf4_linear_on_the_cpu_is_bitsandbytes(training):
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 192)
    reference, ours = make_linear4bit(dense), NF4Linear.from_bnb(make_linear4bit(dense))
    reference.train(training), ours.train(training)
    assert isinstance(ours, bnb.nn.Linear4bit) and ours.weight.quant_state.nested
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())
    expected_weight = bnbf.dequantize_4bit(reference.weight.data, reference.weight.quant_state)
    assert torch.equal(ours.dequantize_weight(), expected_weight)
    for shape in ((1, 128), (5, 128), (2, 3, 128)):
        x = torch.randn(shape).to(torch.bfloat16)
        with torch.no_grad():  # in eval mode bitsandbytes repacks the weight for its CPU kernel here
            assert torch.equal(ours(x), reference(x))
    # after a CPU repack the dense weight is still there (absmax went through bf16 on the way: close)
    rel = ((ours.dequantize_weight().float() - expected_weight.float()).norm() / expected_weight.float().norm()).item()
    assert rel < 1e-2


def candidate_tiles(M, *args):
    """kernels/nf4_tiles.candidate_tiles' tilings in the gather decode, then its codes-as-B tiles (33-64 rows). It
    gives the rule's tiles in the gather decode, then every tiling with the permute decode, above PRESCALE_ROWS rows
    those again with the codes scaled before the dot, then the codes-as-B tiles (permute decode, scaled)."""
    from loraplex.kernels.nf4_tiles import PRESCALE_ROWS, candidate_tiles as every
    tiles = every(M, *args)
    assert not tiles[0].permute and not tiles[0].prescale
    permute = [t for t in tiles[1:] if t.permute and not t.prescale]
    n = len(permute)
    assert tiles[1:1 + n] == permute and replace(tiles[0], permute=True) == permute[0]
    scaled = [replace(t, prescale=True) for t in permute] if M > PRESCALE_ROWS else []
    assert tiles[1 + n:1 + n + len(scaled)] == scaled
    extras = tiles[1 + n + len(scaled):]
    assert all(t.codes_as_b and t.permute and t.prescale for t in extras) and (not extras or 32 < M <= 64)
    return [replace(t, permute=False) for t in permute] + extras


def test_candidate_tiles_start_with_the_rule_then_smaller_row_steps_then_prefetch():
    rule8 = choose_tiles(8, 4096, 4096, BLOCKSIZE, 132)
    unsplit8 = [replace(rule8, splits=1)] if rule8.splits > 1 else []  # (last: the split-K tiles without it)
    assert candidate_tiles(8, 4096, 4096, BLOCKSIZE, 132) == [rule8, replace(rule8, prefetch=True)] + unsplit8
    for M, rule_m, others in ((32, 32, [16]), (64, 64, [16, 32])):
        tiles = candidate_tiles(M, 28672, 4096, BLOCKSIZE, 132)
        assert tiles[0] == choose_tiles(M, 28672, 4096, BLOCKSIZE, 132) and tiles[0].block_m == rule_m
        plain = tiles[:1 + len(others)]
        ahead = [t for t in tiles[1 + len(others):] if t.prefetch and t.block_n == plain[0].block_n and not t.codes_as_b]
        assert [t.block_m for t in plain[1:]] == others and not any(t.prefetch for t in plain)
        assert [t.block_m for t in ahead] == [rule_m] + others  # every step again, one absmax block per step
        assert all(t.prefetch and t.block_k <= BLOCKSIZE for t in ahead)
        for t in tiles:  # the partial sums stay under a quarter of the packed weight bytes (codes-as-B: a half)
            if t.codes_as_b:
                assert t.splits * M * 28672 * 4 <= 28672 * 4096 // 2
                continue
            assert t.splits * M * 28672 * 4 <= 28672 * 4096 // 4 or t.splits == 1
    # a rule whose splits cut the K loop unevenly (48 rows: 5 splits of 64 steps) is timed against the largest
    # even split under it
    rule48 = choose_tiles(48, 4096, 4096, BLOCKSIZE, 132)
    assert (4096 // rule48.block_k) % rule48.splits and replace(rule48, splits=4) in candidate_tiles(
        48, 4096, 4096, BLOCKSIZE, 132)
    # from 32 rows also 8 warps a program, and 64 output features a program with the splits that count gives
    for M in (32, 48, 64):
        rule, tiles = choose_tiles(M, 4096, 4096, BLOCKSIZE, 132), candidate_tiles(M, 4096, 4096, BLOCKSIZE, 132)
        assert replace(rule, num_warps=8) in tiles
        narrow = [t for t in tiles if t.block_n == 64 and not t.prefetch and not t.codes_as_b]
        assert narrow[0].block_m == rule.block_m and narrow[0].splits <= rule.splits
        # from 64 rows a program (33 rows on) also x @ codes^T: 128 and 64 features a program, loads ahead or not,
        # split-K by powers of two with the partial sums under the packed weight's bytes
        codes_as_b = [t for t in tiles if t.codes_as_b]
        if M <= 32:
            assert codes_as_b == []
        else:
            assert {(t.block_n, t.block_k, t.prefetch) for t in codes_as_b} == {
                (128, 64, False), (128, 64, True), (128, 128, False), (64, 64, False), (64, 64, True), (64, 128, False)}
            assert all(t.block_m == 64 and t.permute and t.prescale and t.splits & (t.splits - 1) == 0
                       and t.splits * M * 4096 * 4 <= 4096 * 4096 // 2 for t in codes_as_b)
            # the fastest at 48 and 64 rows of o_proj (H100, bench/results/nf4_sum_ab.json)
            assert NF4Tiles(64, 128 if M == 48 else 64, 64, 8, 4, 3, prefetch=M == 64, permute=True, prescale=True,
                            codes_as_b=True) in codes_as_b
        # and with one absmax block a step, the next step's loads issued ahead
        [ahead] = [t for t in tiles if t.block_n == 64 and t.prefetch and not t.codes_as_b]
        assert ahead.block_m == rule.block_m and ahead.block_k == min(rule.block_k, BLOCKSIZE)
        assert narrow[0].splits * M * 4096 * 4 <= 4096 * 4096 // 4 or narrow[0].splits == 1
        k_tiles = 4096 // rule.block_k  # and again with an even split where its own cuts the K loop unevenly
        if k_tiles % narrow[0].splits:
            assert len(narrow) == 2 and k_tiles % narrow[1].splits == 0 and narrow[1].splits < narrow[0].splits
        else:
            assert len(narrow) == 1
    assert all(t.block_n == 128 and t.num_warps == 4 for t in candidate_tiles(16, 4096, 4096, BLOCKSIZE, 132))
    wide = candidate_tiles(128, 28672, 4096, BLOCKSIZE, 132)  # above 64 rows: the rule, 64-row tiles, longer steps,
    rule = wide[0]                                            # a deeper pipeline
    assert rule == choose_tiles(128, 28672, 4096, BLOCKSIZE, 132) and rule.block_m == 128
    assert {(t.block_m, t.block_k, t.num_stages) for t in wide[1:4]} == {
        (64, 64, 3), (128, 2 * rule.block_k, rule.num_stages), (128, rule.block_k, rule.num_stages + 1)}
    assert wide[4] == replace(rule, codes_as_b=True)  # x's 128 rows as the wgmma's M
    # and each of those five with split-K again without it (its partial sums cost up to half the matmul's time)
    assert wide[5:] == [replace(t, splits=1) for t in wide[:5] if t.splits > 1] and wide[5:]


def test_prefetch_needs_one_absmax_block_per_step():
    packed, state = quantize(64, 256, True, seed=1)
    with pytest.raises(ValueError, match="prefetch"):
        nf4_matmul(torch.randn(1, 256), packed, state.absmax, state.code, BLOCKSIZE, 64,
                   tiles=NF4Tiles(block_m=16, block_n=64, block_k=128, splits=1, prefetch=True), **state_kwargs(state))


@needs_interpreter
def test_wide_batches_take_128_or_64_rows_per_program_and_give_the_same_product():
    """Above 64 rows (large decode batches, short prefill chunks) the calibration times the 128-row tile
    against several 64-row m-tiles, longer loop steps and a deeper pipeline; all equal the format, rows past
    the last full tile included."""
    packed, state = quantize(64, 256, True, seed=11)
    x = torch.randn(130, 256, generator=torch.Generator().manual_seed(12))
    ref = x.double() @ dequantized(packed, state, torch.float32).double().T
    tiles = candidate_tiles(130, 64, 256, BLOCKSIZE, 2)
    assert [(t.block_m, t.num_warps, t.codes_as_b) for t in tiles] == [
        (128, 8, False), (64, 4, False), (128, 8, False), (128, 8, False), (128, 8, True)]
    for t in tiles:
        out = nf4_matmul(x, packed, state.absmax, state.code, BLOCKSIZE, 64, tiles=t, **state_kwargs(state))
        assert relative_error(out, ref) < 1e-5, t


@needs_interpreter
def test_every_candidate_tiling_gives_the_same_product():
    """Calibration may pick any candidate (several m-tiles for 40 rows included): all equal the format."""
    packed, state = quantize(64, 256, True, seed=9)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(10))
    ref = x.double() @ dequantized(packed, state, torch.float32).double().T
    tiles = candidate_tiles(40, 64, 256, BLOCKSIZE, 2)
    assert len(tiles) == 17 and sum(t.prefetch for t in tiles) == 6 and sum(t.block_n == 64 for t in tiles) == 5
    assert [t.codes_as_b for t in tiles].count(True) == 6  # (1 split: the partial sums would outweigh the weight)
    assert sum(t.codes_as_b and t.block_k == 128 for t in tiles) == 2  # (twice the rule's input step)
    assert [t.splits for t in tiles[6:8]] == [2, 4] and tiles[7] == replace(tiles[0], splits=4)  # more split-K
    for t in tiles:
        out = nf4_matmul(x, packed, state.absmax, state.code, BLOCKSIZE, 64, tiles=t, **state_kwargs(state))
        assert relative_error(out, ref) < 1e-5, t


def test_tile_label_names_every_field_the_calibration_chooses():
    from loraplex.runtime.nf4_calibration import tile_label
    assert tile_label(NF4Tiles(64, 64, 64, 4, 4, 3, prefetch=True, permute=True, prescale=True)) == \
        "64x64x64 s4 w4 st3 +pf +perm +ps"
    assert tile_label(NF4Tiles(16, 128, 64, 1)) == "16x128x64 s1 w4 st2"
    assert tile_label(NF4Tiles(64, 128, 64, 2, codes_as_b=True, sum_in_kernel=True)) == "64x128x64 s2 w4 st2 +xb +sk"
