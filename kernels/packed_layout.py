"""How one adapter slot's ModuleDeltas are laid out in the weight pool, and the table that finds them.

Per (layer, projection) module, in the slot's region, each piece starting 64-element aligned:
  A          [k, r, in/k]     A[n] transposed, so the shrink reads input features contiguously
  B          [k, out/k, rp]   B[n] transposed: PEFT's lora_B layout, [out, r], so packing a LoRA is a plain copy
  general_A  [hr, in]         general_A transposed (hybrid only)
  general_B  [out, hrp]       general_B transposed, as PEFT stores it (hybrid only)
  rescale    [2, out]         DoRA only: g, c of runtime/adapters/dora.py
rp and hrp are the ranks rounded up to a multiple of 8 (zeros after the rank): the expand reads 16-byte vectors
along the rank. (B was stored [k, r, out/k]: the transposed fp32 -> bf16 copy from the file's layout took 3x the
time of a straight one, the larger half of packing an upload before its first load.)
The module table holds one int64 row per (slot, layer, projection); K == 0 means "no module",
DORA_OFFSET == 0 "not DoRA" (a rescale piece always follows A and B, so it never starts a region).
"""
from __future__ import annotations

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


RANK_ALIGNMENT = 8


def padded_rank(r: int) -> int:
    """The row length of a B piece in the pool: r rounded up to RANK_ALIGNMENT."""
    return -(-r // RANK_ALIGNMENT) * RANK_ALIGNMENT


def pool_pieces(m: ModuleDelta) -> list[tuple[int, torch.Tensor]]:
    """(table field of its offset, tensor) of each of the module's pieces, in pool order and pool layout; a B
    piece's last dimension is its rank, padded with zeros to padded_rank in the pool."""
    pieces = [(A_OFFSET, m.A.transpose(1, 2)), (B_OFFSET, m.B.transpose(1, 2))]
    if m.general_A is not None:
        pieces += [(GENERAL_A_OFFSET, m.general_A.t()), (GENERAL_B_OFFSET, m.general_B.t())]
    if m.is_dora:
        assert m.rescale is not None, "a DoRA module is packed after dora.prepare_dora"
        pieces.append((DORA_OFFSET, m.rescale))
    return pieces


def module_size(m: ModuleDelta) -> int:
    """Pool elements the module takes (known before a DoRA module's rescale is computed)."""
    sizes = [m.A.numel(), m.B.numel() // m.rank * padded_rank(m.rank)]
    if m.general_A is not None:
        hr = general_rank(m)
        sizes += [m.general_A.numel(), m.general_B.numel() // hr * padded_rank(hr)]
    if m.is_dora:
        sizes.append(2 * m.magnitude.numel())
    return sum(aligned(n) for n in sizes)


def write_module(m: ModuleDelta, pool: torch.Tensor, offset: int) -> list[int]:
    """Copy the module into pool[offset:] (the alignment gaps after its pieces zeroed: the pool may be
    uninitialised memory); returns its table row (offsets absolute in the pool)."""
    row = [0] * NUM_FIELDS
    row[K], row[RANK] = m.k, m.rank
    row[GENERAL_RANK] = general_rank(m)
    for field, piece in pool_pieces(m):
        if field in (B_OFFSET, GENERAL_B_OFFSET) and piece.shape[-1] % RANK_ALIGNMENT:
            rows = piece.shape[:-1]
            n = rows.numel() * padded_rank(piece.shape[-1])
            target = pool[offset:offset + n].view(*rows, padded_rank(piece.shape[-1]))
            target[..., piece.shape[-1]:].zero_()
            target[..., :piece.shape[-1]].copy_(piece)
        else:
            n = piece.numel()
            pool[offset:offset + n].view(piece.shape).copy_(piece)
        if aligned(n) > n:
            pool[offset + n:offset + aligned(n)].zero_()
        row[field] = offset
        offset += aligned(n)
    return row


def intermediate_width(m: ModuleDelta) -> int:
    """Values per token between shrink and expand: k blocks of r, then the hybrid rank."""
    return m.k * m.rank + general_rank(m)
