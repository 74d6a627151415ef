"""One flat device buffer that holds the weights of every loaded adapter slot (S-LoRA style).

Each slot gets one contiguous region, allocated first-fit from a free list and returned on evict,
so adapters of any rank pack without padding. A pool made with a fixed capacity is allocated once
and never moves (what a server wants: captured CUDA graphs keep its address); `allocate` then
answers None when no free region is large enough, and the caller evicts. A pool without one grows
(at least doubling); offsets stay valid, but the address changes, and `version` counts moves.
"""
from __future__ import annotations

import torch

ALIGNMENT = 64  # elements; keeps every tensor in the pool 128-byte aligned in bf16


def aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class WeightPool:
    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.fixed = capacity is not None
        self.buffer = torch.empty(aligned(capacity) if capacity else 0, device=self.device, dtype=dtype)
        self.free_regions: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []
        # (offset, size), sorted by offset, never adjacent
        self.regions: dict[int, int] = {}  # offset -> size of each allocated region
        self.version = 0

    @property
    def capacity(self) -> int:
        return self.buffer.numel()

    @property
    def used(self) -> int:
        return sum(self.regions.values())

    def allocate(self, size: int) -> int | None:
        """Offset (in elements) of a fresh region of `size` elements; None if a fixed pool is full."""
        size = aligned(max(size, 1))
        for i, (offset, free) in enumerate(self.free_regions):
            if free >= size:
                if free == size:
                    del self.free_regions[i]
                else:
                    self.free_regions[i] = (offset + size, free - size)
                self.regions[offset] = size
                return offset
        if self.fixed:
            return None
        # A free region at the end joins the new space, so only `size - tail` more is strictly needed.
        last = self.free_regions[-1] if self.free_regions else (0, 0)
        tail = last[1] if sum(last) == self.capacity else 0
        self._grow(max(2 * self.capacity, self.capacity + size - tail))
        return self.allocate(size)

    def free(self, offset: int) -> None:
        self._release(offset, self.regions.pop(offset))

    def _release(self, offset: int, size: int) -> None:
        """Return [offset, offset+size) to the free list, merging it with free neighbours."""
        merged: list[tuple[int, int]] = []
        for off, n in sorted(self.free_regions + [(offset, size)]):
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((off, n))
        self.free_regions = merged

    def _grow(self, new: int) -> None:
        old = self.capacity
        buffer = torch.empty(new, device=self.device, dtype=self.dtype)
        buffer[:old].copy_(self.buffer)
        self.buffer = buffer
        self.version += 1
        self._release(old, new - old)

    def reserve(self, capacity: int) -> None:
        """Grow the buffer to at least `capacity` elements now (e.g. before capturing CUDA graphs)."""
        if capacity > self.capacity:
            assert not self.fixed, "a fixed pool does not grow"
            self._grow(aligned(capacity))
