"""A CUDA-graph step's host inputs: the batch written into the (pinned) staging arrays the runner copies to the
fixed device buffers its graphs read (model_runner.py). Plain numpy, no device: the host work every graph step pays
before its replay, serially with the GPU (bench/engine_host.py times it).

Each sequence costs a few list operations; the per-token values (positions, KV slots) and the block tables are
written by whole-array numpy operations: a Python loop writing each row's table and slots took 0.7 ms a mixed step
of 201 rows on the CI CPU (3.5 us a row), the larger part of the runner's host time of such a step.
"""
from __future__ import annotations

from itertools import chain

import numpy as np

from .adapters.segments import NO_ADAPTER
from .sequence import Sequence


def token_slots(batch: list[tuple[Sequence, int]], merged: set[int] | None = None) -> list[int]:
    """The adapter slot of every token of the step (NO_ADAPTER for base rows and the decode rows in `merged`, which
    the merged weights compute)."""
    slots = []
    for i, (seq, n) in enumerate(batch):
        slots.extend([NO_ADAPTER if merged and i in merged else seq.adapter_slot] * n)
    return slots


def _tables(batch: list[tuple[Sequence, int]], tables: np.ndarray) -> int:
    """Every sequence's block table into its row of `tables` (what lies past a table's end is left as it was);
    returns the widest table."""
    lengths = np.fromiter((len(seq.block_table) for seq, _ in batch), dtype=np.int64, count=len(batch))
    total = int(lengths.sum())
    if total:
        rows = np.repeat(np.arange(len(batch)), lengths)
        cols = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        tables[rows, cols] = np.fromiter(chain.from_iterable(seq.block_table for seq, _ in batch), dtype=tables.dtype,
                                         count=total)
    return int(lengths.max(initial=0))


def stage_decode(batch: list[tuple[Sequence, int]], merged: set[int], rows: np.ndarray, tables: np.ndarray,
                 block_size: int, spare_slot: int, bucket: int) -> int:
    """A decode step of len(batch) rows padded to `bucket`: rows[0..4, i] = the row's input token, its position, its
    KV slot, its context length and whether merged weights compute it; tables[i] = its block table. Padding rows
    write their K/V into the spare slot. Returns the widest block table."""
    B = len(batch)
    positions = np.fromiter((seq.num_computed for seq, _ in batch), dtype=np.int64, count=B)
    rows[0, :B] = [seq.token_ids[seq.num_computed] for seq, _ in batch]
    rows[1, :B] = positions
    width = _tables(batch, tables)
    rows[2, :B] = tables[np.arange(B), positions // block_size] * block_size + positions % block_size
    rows[3, :B] = positions + 1
    rows[4, :B] = 0
    if merged:
        rows[4, list(merged)] = 1
    rows[:, B:bucket] = 0
    rows[2, B:bucket] = spare_slot
    return width


def stage_mixed(batch: list[tuple[Sequence, int]], tokens: np.ndarray, seqs: np.ndarray, tables: np.ndarray,
                block_size: int, spare_slot: int, bucket: int) -> tuple[int, int]:
    """A mixed step (prefill chunks beside decode rows) of T tokens padded to `bucket`: tokens[0..2, t] = input id,
    position, KV slot of every token, sequence after sequence; seqs[0, i] = sequence i's context length after the
    step, seqs[1, i] = its first token's row (query start; padding sequences start at T with no context), seqs[2, j]
    = the token row of the j-th logits row (sequences whose context is complete after the step, in batch order);
    tables[i] = sequence i's block table. Returns (widest block table, number of logits rows)."""
    B = len(batch)
    counts = np.fromiter((n for _, n in batch), dtype=np.int64, count=B)
    begins = np.fromiter((seq.num_computed for seq, _ in batch), dtype=np.int64, count=B)
    T = int(counts.sum())
    starts = np.cumsum(counts) - counts
    token_seq = np.repeat(np.arange(B), counts)
    positions = np.arange(T) - np.repeat(starts - begins, counts)
    tokens[0, :T] = np.fromiter(chain.from_iterable(seq.token_ids[seq.num_computed:seq.num_computed + n]
                                                    for seq, n in batch), dtype=tokens.dtype, count=T)
    tokens[1, :T] = positions
    width = _tables(batch, tables)
    tokens[2, :T] = tables[token_seq, positions // block_size] * block_size + positions % block_size
    tokens[:, T:bucket] = 0
    tokens[2, T:bucket] = spare_slot  # padding tokens write their K/V into the spare block
    ends = begins + counts
    complete = np.flatnonzero(ends == np.fromiter((len(seq) for seq, _ in batch), dtype=np.int64, count=B))
    seqs[0, :B], seqs[1, :B] = ends, starts
    seqs[0, B:] = 0  # padding sequences: no context, no query rows
    seqs[1, B:] = T
    seqs[2, :len(complete)] = (starts + counts - 1)[complete]
    seqs[2, len(complete):] = 0
    return width, len(complete)
