"""How one adapter slot's ModuleDeltas are laid out in the weight pool, and the table that finds them.

Per (layer, projection) module, in the slot's region, each piece starting 64-element aligned:
  A          [k, r, in/k]   A[n] transposed, so the shrink reads input features contiguously
  B          [k, r, out/k]  as in ModuleDelta
  general_A  [hr, in]       general_A transposed (hybrid only)
  general_B  [hr, out]      (hybrid only)
  rescale    [2, out]       DoRA only: g, c of runtime/adapters/dora.py
The module table holds one int64 row per (slot, layer, projection); K == 0 means "no module",
DORA_OFFSET == 0 "not DoRA" (a rescale piece always follows A and B, so it never starts a region).
"""
from __future__ import annotations

import itertools

import torch

from loraplex.runtime.adapters.peft_format import ModuleDelta

from .weight_pool import aligned

# Fields of a module-table row.
K, RANK, GENERAL_RANK, A_OFFSET, B_OFFSET, GENERAL_A_OFFSET, GENERAL_B_OFFSET, DORA_OFFSET = range(8)
NUM_FIELDS = 8
OFFSET_FIELDS = (A_OFFSET, B_OFFSET, GENERAL_A_OFFSET, GENERAL_B_OFFSET)  # move with the slot's region (DORA_OFFSET
                                                                        # too, when not 0)


def general_rank(m: ModuleDelta) -> int:
    """Rank of the hybrid plain-LoRA part (0 without one)."""
    return 0 if m.general_A is None else m.general_A.shape[1]


def pool_pieces(m: ModuleDelta) -> list[tuple[int, torch.Tensor]]:
    """(table field of its offset, tensor) of each of the module's pieces, in pool order and pool layout."""
    pieces = [(A_OFFSET, m.A.transpose(1, 2)), (B_OFFSET, m.B)]
    if m.general_A is not None:
        pieces += [(GENERAL_A_OFFSET, m.general_A.t()), (GENERAL_B_OFFSET, m.general_B)]
    if m.is_dora:
        assert m.rescale is not None, "a DoRA module is packed after dora.prepare_dora"
        pieces.append((DORA_OFFSET, m.rescale))
    return pieces


def module_size(m: ModuleDelta) -> int:
    """Pool elements the module takes (known before a DoRA module's rescale is computed)."""
    sizes = [m.A.numel(), m.B.numel()]
    if m.general_A is not None:
        sizes += [m.general_A.numel(), m.general_B.numel()]
    if m.is_dora:
        sizes.append(2 * m.magnitude.numel())
    return sum(aligned(n) for n in sizes)


def module_offsets(modules) -> tuple[list[int], int]:
    """Where each module starts in a packed copy of `modules` (ModuleDeltas, in order), and the copy's size."""
    ends = list(itertools.accumulate(module_size(m) for m in modules))
    return [0, *ends[:-1]], (ends[-1] if ends else 0)


def module_copies(m: ModuleDelta, pool: torch.Tensor, offset: int) -> tuple[list[int], list, list, list]:
    """What packing the module into pool[offset:] takes: its table row (offsets absolute in the pool), the
    destination views, the pieces that go there, and the alignment gaps after them, to be zeroed (the pool may be
    uninitialised memory). The copies are left to the caller: one batched call for a whole adapter."""
    row = [0] * NUM_FIELDS
    row[K], row[RANK] = m.k, m.rank
    row[GENERAL_RANK] = general_rank(m)
    targets, pieces, gaps = [], [], []
    for field, piece in pool_pieces(m):
        n = piece.numel()
        targets.append(pool[offset:offset + n].view(piece.shape))
        pieces.append(piece)
        if aligned(n) > n:
            gaps.append(pool[offset + n:offset + aligned(n)])
        row[field] = offset
        offset += aligned(n)
    return row, targets, pieces, gaps


SERIAL_ELEMENTS = 32768  # PyTorch's grain size: a copy of fewer elements runs on the calling thread (no OpenMP team)


def serial_chunks(target: torch.Tensor, piece: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, piece), same shape, cut along their leading dimensions into views of at most SERIAL_ELEMENTS."""
    if piece.numel() <= SERIAL_ELEMENTS:
        return [(target, piece)]
    dim = next(d for d in range(piece.dim()) if piece.shape[d] > 1)
    step = max(1, SERIAL_ELEMENTS // (piece.numel() // piece.shape[dim]))
    return [chunk for t, p in zip(target.split(step, dim), piece.split(step, dim)) for chunk in serial_chunks(t, p)]


def copy_shares(targets: list, pieces: list, n: int) -> list[tuple[list, list]]:
    """The copies of `pieces` into `targets` as serial chunks, dealt into at most n runs of about equal size: each
    run one torch._foreach_copy_ on one thread, without PyTorch's intra-op threads. Those cost a pack of many small
    pieces a parallel region per piece: 128 bf16 pieces from 20 request threads took 47 ms a pack on the 2-core
    VM against 5.4 with one intra-op thread (on the H100 host a q/v rank-16 8B pack waited 36-230 ms)."""
    chunks = [chunk for target, piece in zip(targets, pieces) for chunk in serial_chunks(target, piece)]
    return equal_shares([t for t, _ in chunks], [p for _, p in chunks], n)


def equal_shares(targets: list, pieces: list, n: int) -> list[tuple[list, list]]:
    """(targets, pieces) cut into at most n runs of about equal size, in order (for one batched copy per thread)."""
    total, done, runs = sum(p.numel() for p in pieces), 0, [([], []) for _ in range(n)]
    for target, piece in zip(targets, pieces):
        run = runs[min(n - 1, done * n // max(total, 1))]
        run[0].append(target)
        run[1].append(piece)
        done += piece.numel()
    return [run for run in runs if run[0]]


def write_module(m: ModuleDelta, pool: torch.Tensor, offset: int) -> list[int]:
    """Copy the module into pool[offset:]; returns its table row."""
    row, targets, pieces, gaps = module_copies(m, pool, offset)
    for target, piece in zip(targets, pieces):
        target.copy_(piece)
    for gap in gaps:
        gap.zero_()
    return row


def intermediate_width(m: ModuleDelta) -> int:
    """Values per token between shrink and expand: k blocks of r, then the hybrid rank."""
    return m.k * m.rank + general_rank(m)
