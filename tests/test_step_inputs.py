"""The CUDA-graph steps' staging arrays (runtime/step_inputs.py), filled by whole-array numpy operations, against the
straightforward per-row loops the runner used before (kept here as the reference): every cell equal, the cells
past a table's end left as they were."""
from __future__ import annotations

import random

import numpy as np
import pytest

from loraplex.runtime.sequence import SamplingParams, Sequence
from loraplex.runtime.step_inputs import stage_decode, stage_mixed

SIZE, SPARE, ROWS, TOKENS, WIDTH = 16, 10_000, 24, 640, 40


def reference_decode(batch, merged, rows, tables, size, spare, bucket):
    width = 0
    for i, (seq, _) in enumerate(batch):
        p, table = seq.num_computed, seq.block_table
        rows[0, i], rows[1, i] = seq.token_ids[p], p
        rows[2, i] = table[p // size] * size + p % size
        rows[3, i], rows[4, i] = p + 1, i in merged
        tables[i, :len(table)] = table
        width = max(width, len(table))
    rows[:, len(batch):bucket] = 0
    rows[2, len(batch):bucket] = spare
    return width


def reference_mixed(batch, tokens, seqs, tables, size, spare, bucket):
    T = sum(n for _, n in batch)
    tokens[:, T:bucket] = 0
    tokens[2, T:bucket] = spare
    width, start, num_logits = 0, 0, 0
    for i, (seq, n) in enumerate(batch):
        begin, table = seq.num_computed, seq.block_table
        end = start + n
        for t in range(n):
            p = begin + t
            tokens[0, start + t], tokens[1, start + t] = seq.token_ids[p], p
            tokens[2, start + t] = table[p // size] * size + p % size
        seqs[0, i], seqs[1, i] = begin + n, start
        if begin + n == len(seq):
            seqs[2, num_logits] = end - 1
            num_logits += 1
        tables[i, :len(table)] = table
        width = max(width, len(table))
        start = end
    seqs[0, len(batch):] = 0
    seqs[1, len(batch):] = T
    seqs[2, num_logits:] = 0
    return width, num_logits


def sequence(rng: random.Random, length: int, computed: int) -> Sequence:
    seq = Sequence([rng.randrange(50_000) for _ in range(length)], SamplingParams(max_tokens=4), None, lambda o: None)
    seq.block_table = rng.sample(range(5_000), -(-length // SIZE))  # blocks anywhere in the pool, any order
    seq.num_computed = computed
    return seq


def decode_batch(rng: random.Random, rows: int) -> list[tuple[Sequence, int]]:
    out = []
    for _ in range(rows):
        length = rng.randint(1, WIDTH * SIZE)
        out.append((sequence(rng, length, length - 1), 1))
    return out


def mixed_batch(rng: random.Random) -> list[tuple[Sequence, int]]:
    batch, tokens = decode_batch(rng, rng.randint(0, ROWS - 4)), 0
    tokens = len(batch)
    for _ in range(rng.randint(1, 3)):  # prompt chunks: first, middle or last of their prompt
        length = rng.randint(2, WIDTH * SIZE)
        begin = rng.randrange(length - 1)
        n = min(rng.randint(1, length - begin), TOKENS - tokens)
        if n < 1:
            break
        batch.insert(rng.randrange(len(batch) + 1), (sequence(rng, length, begin), n))
        tokens += n
    return batch


@pytest.mark.parametrize("seed", range(8))
def test_decode_staging_equals_the_row_loop(seed):
    rng = random.Random(seed)
    batch = decode_batch(rng, rng.randint(1, ROWS))
    bucket = min(ROWS, len(batch) + rng.randint(0, 7))
    merged = set(rng.sample(range(len(batch)), rng.randint(0, len(batch))))
    garbage = np.random.default_rng(seed)
    rows = garbage.integers(-9, 9, (5, ROWS)).astype(np.int64)
    tables = garbage.integers(-9, 9, (ROWS, WIDTH)).astype(np.int32)
    want_rows, want_tables = rows.copy(), tables.copy()
    want = reference_decode(batch, merged, want_rows, want_tables, SIZE, SPARE, bucket)
    assert stage_decode(batch, merged, rows, tables, SIZE, SPARE, bucket) == want
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(tables, want_tables)


@pytest.mark.parametrize("seed", range(12))
def test_mixed_staging_equals_the_row_loop(seed):
    rng = random.Random(seed)
    batch = mixed_batch(rng)
    T = sum(n for _, n in batch)
    bucket = -(-T // 128) * 128
    garbage = np.random.default_rng(seed)
    tokens = garbage.integers(-9, 9, (3, TOKENS + 128)).astype(np.int64)
    seqs = garbage.integers(-9, 9, (3, ROWS + 1)).astype(np.int32)
    tables = garbage.integers(-9, 9, (ROWS, WIDTH)).astype(np.int32)
    want_tokens, want_seqs, want_tables = tokens.copy(), seqs.copy(), tables.copy()
    want = reference_mixed(batch, want_tokens, want_seqs, want_tables, SIZE, SPARE, bucket)
    assert stage_mixed(batch, tokens, seqs, tables, SIZE, SPARE, bucket) == want
    assert want[1] == sum(seq.num_computed + n == len(seq) for seq, n in batch)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(seqs, want_seqs)
    np.testing.assert_array_equal(tables, want_tables)
