"""How one adapter slot's ModuleDeltas are laid out in the weight pool, and the table that finds them.

Per (layer, projection) module, in the slot's region, each piece starting 64-element aligned:
  A          [k, r, in/k]   A[n] transposed, so the shrink reads input features contiguously
  B          [k, r, out/k]  as in ModuleDelta
  general_A  [hr, in]       general_A transposed (hybrid only)
  general_B  [hr, out]      (hybrid only)
The module table holds one int64 row per (slot, layer, projection); K == 0 means "no module".
"""
from __future__ import annotations

import torch

from loraplex.runtime.adapters.peft_format import ModuleDelta

from .weight_pool import aligned

# Fields of a module-table row.
K, RANK, GENERAL_RANK, A_OFFSET, B_OFFSET, GENERAL_A_OFFSET, GENERAL_B_OFFSET = range(7)
NUM_FIELDS = 8


def general_rank(m: ModuleDelta) -> int:
    """Rank of the hybrid plain-LoRA part (0 without one)."""
    return 0 if m.general_A is None else m.general_A.shape[1]


def pool_pieces(m: ModuleDelta) -> list[torch.Tensor]:
    """The module's tensors in pool order and pool layout (views where possible)."""
    pieces = [m.A.transpose(1, 2), m.B]
    if m.general_A is not None:
        pieces += [m.general_A.t(), m.general_B]
    return pieces


def module_size(m: ModuleDelta) -> int:
    return sum(aligned(t.numel()) for t in pool_pieces(m))


def write_module(m: ModuleDelta, pool: torch.Tensor, offset: int) -> list[int]:
    """Copy the module into pool[offset:]; returns its table row (offsets absolute in the pool)."""
    row = [0] * NUM_FIELDS
    row[K], row[RANK] = m.k, m.rank
    row[GENERAL_RANK] = general_rank(m)
    fields = (A_OFFSET, B_OFFSET, GENERAL_A_OFFSET, GENERAL_B_OFFSET)
    for field, piece in zip(fields, pool_pieces(m)):
        pool[offset:offset + piece.numel()].view(piece.shape).copy_(piece)
        row[field] = offset
        offset += aligned(piece.numel())
    return row


def intermediate_width(m: ModuleDelta) -> int:
    """Values per token between shrink and expand: k blocks of r, then the hybrid rank."""
    return m.k * m.rank + general_rank(m)
