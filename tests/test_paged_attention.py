"""The paged attention kernel on the CPU (TRITON_INTERPRET=1) against a float64 gather reference."""

from triton_interpreter import fresh_process_test, needs_interpreter  # (first: it asks for the interpreter)
import pytest
import torch

from loraplex.kernels.paged_attention import choose_splits, paged_attention

UNTOUCHED = 7.0  # rows that belong to no sequence must keep it

test_in_fresh_process = fresh_process_test(__file__)


def make_batch(seqs, heads, kv_heads, head_dim, block_size=16, dtype=torch.float32, extra_rows=0, seed=0):
    """seqs: (context length, queries) per sequence. Random K/V in shuffled blocks; every slot no
    sequence owns is NaN and block-table padding points far outside the cache, so a stray read shows."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    owner = torch.randperm(num_blocks, generator=g)
    max_blocks = max(blocks_per_seq + [1]) + 1
    block_tables = torch.full((len(seqs), max_blocks), 10 * num_blocks, dtype=torch.int32)
    k_cache = torch.full((num_blocks * block_size, kv_heads, head_dim), float("nan"))
    v_cache = k_cache.clone()
    used = 0
    for b, (ctx, _) in enumerate(seqs):
        blocks = owner[used:used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        block_tables[b, :len(blocks)] = blocks.int()
        pos = torch.arange(ctx)
        slots = blocks[pos // block_size] * block_size + pos % block_size
        k_cache[slots] = torch.randn(ctx, kv_heads, head_dim, generator=g)
        v_cache[slots] = torch.randn(ctx, kv_heads, head_dim, generator=g)
    counts = torch.tensor([n for _, n in seqs])
    query_start = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).int()
    q = torch.randn(int(counts.sum()) + extra_rows, heads, head_dim, generator=g)
    context_lens = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32)
    return (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables, context_lens, query_start)


def reference(q, k_cache, v_cache, block_tables, context_lens, query_start, block_size, scale, sliding_window=None):
    """float64: gather each sequence's context, causal (windowed) softmax; context-0 rows are zeros."""
    T, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    starts = query_start.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        n = starts[b + 1] - starts[b]
        if n == 0 or ctx == 0:
            continue
        pos = torch.arange(ctx)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].double().repeat_interleave(group, dim=1)
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - n, ctx)
        visible = pos[None, :] <= q_pos[:, None]
        if sliding_window:
            visible &= pos[None, :] > q_pos[:, None] - sliding_window
        s = torch.einsum("nhd,khd->hnk", q[starts[b]:starts[b + 1]].double(), k) * scale
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        out[starts[b]:starts[b + 1]] = torch.einsum("hnk,khd->nhd", p, v)
    return out


def run_and_check(seqs, heads=4, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, sliding_window=None,
                  num_splits=None, extra_rows=0, q_view=False, seed=0):
    q, k_cache, v_cache, block_tables, context_lens, query_start = make_batch(
        seqs, heads, kv_heads, head_dim, block_size, dtype, extra_rows, seed)
    if q_view:  # q as a strided view into a wider qkv-like buffer
        wide = torch.randn(q.shape[0], heads + 2 * kv_heads, head_dim).to(dtype)
        wide[:, :heads] = q
        q = wide[:, :heads]
    scale = head_dim ** -0.5
    out = torch.full(q.shape, UNTOUCHED, dtype=dtype)
    max_query_len = max(n for _, n in seqs)
    result = paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start, block_size, scale,
                             max_query_len=max_query_len, sliding_window=sliding_window, out=out,
                             num_splits=num_splits)
    assert result is out
    ref = reference(q, k_cache, v_cache, block_tables, context_lens, query_start, block_size, scale, sliding_window)
    owned = int(query_start[-1])
    got = out[:owned].double()
    assert not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (got - ref[:owned]).abs().max().item()
    assert err < tol, f"max abs error {err:.2e}"
    assert (out[owned:] == UNTOUCHED).all(), "a row of no sequence was written"
    return out


DECODE_CONTEXTS = [1, 15, 16, 17, 70]


@needs_interpreter
@pytest.mark.parametrize("group,kv_heads,head_dim,dtype", [
    (1, 2, 64, torch.float32), (3, 1, 64, torch.float32), (4, 2, 64, torch.bfloat16), (4, 1, 128, torch.float32),
    (3, 2, 128, torch.bfloat16)])
def test_decode_context_lengths_and_gqa(group, kv_heads, head_dim, dtype):
    run_and_check([(c, 1) for c in DECODE_CONTEXTS], heads=group * kv_heads, kv_heads=kv_heads, head_dim=head_dim,
                  dtype=dtype, num_splits=1)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_split_k(num_splits):  # 5 splits of a 1- or 2-tile context: most splits are empty
    run_and_check([(c, 1) for c in DECODE_CONTEXTS + [300]], heads=6, kv_heads=2, num_splits=num_splits)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_padding_rows(num_splits):
    """A graph bucket's padding: context 0 with one row each (zeros), and sequences with no rows."""
    seqs = [(17, 1), (0, 1), (40, 1), (0, 0), (0, 1), (5, 0)]
    out = run_and_check(seqs, num_splits=num_splits, extra_rows=2)
    assert (out[1] == 0).all() and (out[3] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_decode_block_sizes(block_size):
    run_and_check([(c, 1) for c in (1, 31, 64, 65, 150)], heads=8, kv_heads=2, block_size=block_size)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks(dtype):
    """A whole prompt, later chunks (begin > 0), a one-token sequence and an empty one in one call."""
    seqs = [(23, 23), (70, 33), (90, 5), (12, 1), (0, 0), (64, 64)]
    run_and_check(seqs, heads=6, kv_heads=2, dtype=dtype, extra_rows=3)


@needs_interpreter
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 128, 16), (4, 64, 32), (3, 64, 16)])
def test_prefill_gqa_head_dims_block_sizes(group, head_dim, block_size):
    run_and_check([(50, 50), (81, 17)], heads=group * 2, kv_heads=2, head_dim=head_dim, block_size=block_size)


@needs_interpreter
def test_mixed_decode_and_prefill_rows():
    seqs = [(40, 1), (37, 20), (0, 1), (65, 1), (30, 30), (100, 1)]
    run_and_check(seqs, heads=4, kv_heads=1, dtype=torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("decode", [True, False])
def test_sliding_window(decode):
    seqs = [(c, 1) for c in (5, 20, 21, 90)] if decode else [(90, 40), (30, 30), (70, 1)]
    run_and_check(seqs, heads=4, kv_heads=2, sliding_window=20, num_splits=3 if decode else None)


@needs_interpreter
def test_head_dim_not_a_power_of_two_and_strided_q():
    run_and_check([(33, 1), (70, 1)], heads=2, kv_heads=1, head_dim=80, q_view=True)
    run_and_check([(33, 20), (70, 1)], heads=2, kv_heads=1, head_dim=80, q_view=True)


def test_choose_splits():
    assert choose_splits(64, 8, 128, 16, 64, num_sms=132) == 1  # enough programs already
    assert choose_splits(2, 8, 128, 16, 64, num_sms=132) == 16  # 2048-token contexts: split
    assert choose_splits(2, 8, 4, 16, 64, num_sms=132) == 1  # one tile: nothing to split
