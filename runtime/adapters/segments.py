"""Per-step token→adapter-slot metadata, built once per step and shared by every layer (vLLM-style).

Tokens that use an adapter are grouped by slot: `token_order` lists their packed indices sorted by
slot, and segment i covers token_order[starts[i] : starts[i] + lengths[i]], all using `slots[i]`.
Tokens without an adapter (slot -1) appear in no segment, so no work is done for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    """Segments of a step whose token i uses adapter slot token_slots[i] (NO_ADAPTER: none). Whole-array numpy: a
    per-token Python loop took 0.2 ms a 2,048-token step on the CI CPU (bench/engine_host.py)."""
    slots = np.asarray(token_slots, dtype=np.int64)
    adapted = np.flatnonzero(slots != NO_ADAPTER)
    order = adapted[np.argsort(slots[adapted], kind="stable")]  # by slot, then token
    used, lengths = np.unique(slots[order], return_counts=True)
    starts = np.cumsum(lengths) - lengths
    host = list(zip(starts.tolist(), lengths.tolist(), used.tolist()))
    as_tensor = lambda v, dt: torch.from_numpy(v.astype(dt)).to(device, non_blocking=True)  # noqa: E731
    return Segments(
        num_tokens=len(token_slots),
        token_order=as_tensor(order, np.int64),
        starts=as_tensor(starts, np.int32),
        lengths=as_tensor(lengths, np.int32),
        slots=as_tensor(used, np.int32),
        host=host,
        max_length=int(lengths.max(initial=0)),
    )
