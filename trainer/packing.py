"""Padding-free batches: a micro-batch's rows laid end to end in one sequence, attention kept within each row.

`pack` turns the rows of a micro-batch into one row of their summed length: `position_ids` restart at 0 for
every row, which is what transformers reads to build a block-diagonal causal mask (sdpa, eager, flex), and
`cu_seq_lens` holds the rows' boundaries for attention that computes only each row's own scores
(packed_attention.py: varlen FlashAttention), so no token attends to another row. `targets` holds each position's
next-token label, shifted within its row (a row's last position has none), so the loss never predicts one
row's first token from the row before it. The sequence is filled up to a multiple of PACK_MULTIPLE (a
fixed set of shapes for the allocator and torch.compile) with a filler row that has no targets.

The same rows in the padded layout (`data.collate`) and packed give the same loss up to float summation
order: the set of (context, target) pairs is identical.
"""
from __future__ import annotations

import torch

from .data import IGNORE, Example, collate

PACK_MULTIPLE = 64


def row_targets(labels: list[int]) -> list[int]:
    """Next-token targets of one row: target[i] = labels[i + 1]; the last position has none."""
    return labels[1:] + [IGNORE]


def num_targets(examples: list[Example]) -> int:
    """Tokens a batch of these rows takes loss on (the causal shift drops each row's first label)."""
    return sum(1 for e in examples for t in e.labels[1:] if t != IGNORE)


def pack(examples: list[Example], pad_id: int, device, multiple: int = PACK_MULTIPLE) -> dict:
    ids, positions, targets, bounds = [], [], [], [0]
    for e in examples:
        ids += e.input_ids
        positions += range(len(e.input_ids))
        targets += row_targets(e.labels)
        bounds.append(len(ids))
    filler = -len(ids) % multiple
    ids += [pad_id] * filler
    positions += range(filler)  # its own row: a fresh position run, attended only by itself
    targets += [IGNORE] * filler
    if filler:
        bounds.append(len(ids))
    as_row = lambda values: torch.tensor([values], dtype=torch.long).to(device, non_blocking=True)
    return {"input_ids": as_row(ids), "position_ids": as_row(positions), "targets": as_row(targets),
            # each row's first position and the end, for attention that skips other rows' blocks (packed_attention)
            "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True),
            # the longest row, rounded up to a power of two: an upper bound is all varlen attention needs, and
            # few distinct values keep torch.compile from specialising on each step's longest row
            "max_length": 1 << (max(b - a for a, b in zip(bounds, bounds[1:])) - 1).bit_length(),
            "num_targets": num_targets(examples), "real_tokens": sum(len(e.input_ids) for e in examples)}


def padded(examples: list[Example], pad_id: int, device) -> dict:
    """The padded layout (data.collate: one row per example, right-padded) with the same `targets` as `pack`."""
    batch = collate(examples, pad_id, "cpu")
    targets = torch.full_like(batch.pop("labels"), IGNORE)
    for row, e in enumerate(examples):
        targets[row, :len(e.input_ids)] = torch.tensor(row_targets(e.labels))
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "targets": targets.to(device), "num_targets": num_targets(examples),
            "real_tokens": sum(len(e.input_ids) for e in examples)}

