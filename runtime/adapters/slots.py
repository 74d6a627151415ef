"""Accelerator residency: a bounded number of adapter versions loaded into the ops' weight slots.

Running requests pin their slot; unpinned slots are evicted least-recently-used when a request
needs one for an adapter that is not resident. Used from the engine thread only.
"""
from __future__ import annotations

from collections import OrderedDict

from .ops import AdapterOps
from .registry import AdapterRef


class AdapterSlots:
    def __init__(self, ops: AdapterOps):
        self.ops = ops
        self.capacity = ops.num_slots
        self._slot_of: dict[tuple[str, int], int] = {}
        self._key_in: list[tuple[str, int] | None] = [None] * self.capacity
        self._pins = [0] * self.capacity
        self._idle: OrderedDict[tuple[str, int], int] = OrderedDict()  # unpinned resident, oldest first
        self.loads = 0
        self.evictions = 0

    @property
    def resident(self) -> list[tuple[str, int]]:
        return list(self._slot_of)

    def _evict(self, key: tuple[str, int]) -> int:
        slot = self._slot_of.pop(key)
        self._idle.pop(key, None)
        self._key_in[slot] = None
        self.ops.evict(slot)
        self.evictions += 1
        return slot

    def acquire(self, ref: AdapterRef) -> int | None:
        """The slot holding ref's weights, loading them if needed; None while every slot is pinned."""
        key = ref.key
        slot = self._slot_of.get(key)
        if slot is None:
            for stale in [k for k in self._idle if k[0] == ref.id and k[1] < ref.version]:
                self._evict(stale)  # an older version of a replaced adapter: no new request will use it
            free = [s for s in range(self.capacity) if self._key_in[s] is None]
            if free:
                slot = free[0]
            elif self._idle:
                slot = self._evict(next(iter(self._idle)))
            else:
                return None
            self.ops.load(slot, ref.weights)
            self.loads += 1
            self._slot_of[key], self._key_in[slot] = slot, key
        self._idle.pop(key, None)
        self._pins[slot] += 1
        return slot

    def release(self, ref: AdapterRef) -> None:
        slot = self._slot_of[ref.key]
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            self._idle[ref.key] = slot
