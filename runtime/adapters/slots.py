"""Accelerator residency: adapter versions loaded into the ops' weight slots, bounded in bytes.

A server for many adapters sizes its adapter memory in bytes (`capacity_bytes`), with an optional
cap on the count (`max_adapters`). Running requests pin their slot; unpinned slots are evicted
least-recently-used when a load needs room. Loads are asynchronous: `acquire` answers LOADING
while an adapter's weights are still being copied, and the caller tries again at a later step, so
a load never stalls the running batch. Used from the engine thread only.
"""
from __future__ import annotations

from collections import OrderedDict

from .ops import AdapterOps
from .registry import AdapterRef

LOADING = -2  # `acquire`: the copy is under way, ask again later


class AdapterSlots:
    def __init__(self, ops: AdapterOps, capacity_bytes: int, max_adapters: int | None = None):
        self.ops = ops
        self.capacity = min(ops.num_slots, max_adapters or ops.num_slots)
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._slot_of: dict[tuple[str, int], int] = {}
        self._key_in: list[tuple[str, int] | None] = [None] * self.capacity
        self._bytes = [0] * self.capacity
        self._pins = [0] * self.capacity
        self._pending: dict[int, object] = {}  # slot -> event of a copy under way
        self._idle: OrderedDict[tuple[str, int], int] = OrderedDict()  # loaded, unpinned, oldest first
        self.loads = 0
        self.evictions = 0

    @property
    def pinned(self) -> int:
        """Slots that running requests hold: 0 whenever no request runs (else a pin leaked)."""
        return sum(1 for pins in self._pins if pins)

    @property
    def resident(self) -> list[tuple[str, int]]:
        return list(self._slot_of)

    def _evict(self, key: tuple[str, int]) -> int:
        slot = self._slot_of.pop(key)
        self._idle.pop(key, None)
        self._pending.pop(slot, None)
        self._key_in[slot] = None
        self.used_bytes -= self._bytes[slot]
        self._bytes[slot] = 0
        self.ops.evict(slot)
        self.evictions += 1
        return slot

    def _evict_oldest(self) -> bool:
        if not self._idle:
            return False
        self._evict(next(iter(self._idle)))
        return True

    def _start_load(self, ref: AdapterRef) -> int | None:
        need = self.ops.nbytes(ref.weights)
        if need > self.capacity_bytes:
            return None
        while self.used_bytes + need > self.capacity_bytes or None not in self._key_in:
            if not self._evict_oldest():
                return None
        slot = self._key_in.index(None)
        while (started := self.ops.load(slot, ref.weights)) is False:  # the pool is fragmented
            if not self._evict_oldest():
                return None
        self.loads += 1
        self._slot_of[ref.key], self._key_in[slot] = slot, ref.key
        self._bytes[slot] = need
        self.used_bytes += need
        if started is not True:
            self._pending[slot] = started
        self._idle[ref.key] = slot  # evictable until a request pins it, even while loading
        return slot

    def acquire(self, ref: AdapterRef) -> int | None:
        """The slot holding ref's weights, pinned; LOADING while its copy runs (call again);
        None while the adapter cannot be loaded now (every slot or byte pinned)."""
        key = ref.key
        slot = self._slot_of.get(key)
        if slot is None:
            for stale in [k for k in self._idle if k[0] == ref.id and k[1] < ref.version]:
                self._evict(stale)  # an older version of a replaced adapter: no new request will use it
            slot = self._start_load(ref)
            if slot is None:
                return None
        event = self._pending.get(slot)
        if event is not None:
            if not event.query():
                return LOADING
            del self._pending[slot]
        self._idle.pop(key, None)
        self._pins[slot] += 1
        return slot

    def release(self, ref: AdapterRef) -> None:
        slot = self._slot_of[ref.key]
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            self._idle[ref.key] = slot

    def drop(self, ref: AdapterRef) -> None:
        """Evict ref's version now (it must not be pinned)."""
        slot = self._slot_of.get(ref.key)
        if slot is not None:
            assert not self._pins[slot], "dropping a pinned adapter"
            self._evict(ref.key)

    def slot_of(self, ref: AdapterRef) -> int | None:
        return self._slot_of.get(ref.key)
