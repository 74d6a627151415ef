"""Per-step token→adapter-slot metadata, built once per step and shared by every layer (vLLM-style).

Tokens that use an adapter are grouped by slot: `token_order` lists their packed indices sorted by
slot, and segment i covers token_order[starts[i] : starts[i] + lengths[i]], all using `slots[i]`.
Tokens without an adapter (slot -1) appear in no segment, so no work is done for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NO_ADAPTER = -1


@dataclass
class Segments:
    num_tokens: int
    token_order: torch.Tensor  # [N] int64 packed token indices, grouped by slot (device)
    starts: torch.Tensor  # [S] int32 (device)
    lengths: torch.Tensor  # [S] int32 (device)
    slots: torch.Tensor  # [S] int32 (device)
    host: list[tuple[int, int, int]]  # (start, length, slot) per segment, for host-side loops
    max_length: int

    @property
    def empty(self) -> bool:
        return not self.host


def build_segments(token_slots: list[int], device: torch.device | str = "cpu") -> Segments:
    by_slot: dict[int, list[int]] = {}
    for i, slot in enumerate(token_slots):
        if slot != NO_ADAPTER:
            by_slot.setdefault(slot, []).append(i)
    order, host = [], []
    for slot in sorted(by_slot):
        host.append((len(order), len(by_slot[slot]), slot))
        order.extend(by_slot[slot])
    as_tensor = lambda v, dt: torch.tensor(v, dtype=dt).to(device, non_blocking=True)
    return Segments(
        num_tokens=len(token_slots),
        token_order=as_tensor(order, torch.int64),
        starts=as_tensor([h[0] for h in host], torch.int32),
        lengths=as_tensor([h[1] for h in host], torch.int32),
        slots=as_tensor([h[2] for h in host], torch.int32),
        host=host,
        max_length=max((h[1] for h in host), default=0),
    )
