"""Adapter residency by bytes: LRU eviction, pins, asynchronous loads that never block the batch."""
from __future__ import annotations

import torch

from loraplex.kernels.weight_pool import WeightPool
from loraplex.runtime.adapters.ops import AdapterOps
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.adapters.slots import LOADING, AdapterSlots
from loraplex.runtime.block_manager import BlockManager
from loraplex.runtime.scheduler import Scheduler
from loraplex.runtime.sequence import SamplingParams, Sequence


class FakeEvent:
    def __init__(self):
        self.done = False

    def query(self):
        return self.done


class FakeOps(AdapterOps):
    """Slots that take `nbytes` = the adapter's `size`; loads finish when their event is set."""

    def __init__(self, num_slots=16, asynchronous=False):
        super().__init__(num_slots, {}, 1, "cpu", torch.float32)
        self.loaded, self.events, self.asynchronous = {}, {}, asynchronous

    def nbytes(self, adapter):
        return adapter.size

    def load(self, slot, adapter):
        self.loaded[slot] = adapter
        if not self.asynchronous:
            return True
        self.events[slot] = FakeEvent()
        return self.events[slot]

    def evict(self, slot):
        self.loaded.pop(slot)


class Sized:
    def __init__(self, size):
        self.size = size


def ref(name, size=100, version=1):
    return AdapterRef(name, version, Sized(size))


def test_capacity_is_bytes_and_lru_evicts_unpinned():
    slots = AdapterSlots(FakeOps(), capacity_bytes=250)
    a, b, c = ref("a"), ref("b"), ref("c")
    assert slots.acquire(a) is not None and slots.acquire(b) is not None
    slots.release(a)  # a idle, b pinned
    assert slots.acquire(c) is not None  # 300 > 250: a (idle, oldest) goes
    assert set(k[0] for k in slots.resident) == {"b", "c"} and slots.evictions == 1
    assert slots.used_bytes == 200
    assert slots.acquire(ref("d")) is None  # b and c pinned: nothing to evict
    assert slots.acquire(ref("huge", size=300)) is None  # larger than the whole memory


def test_many_small_adapters_fit_where_a_count_cap_would_not():
    slots = AdapterSlots(FakeOps(num_slots=1024), capacity_bytes=128 * 100)
    for i in range(128):
        assert slots.acquire(ref(f"x{i}")) is not None
        slots.release(ref(f"x{i}"))
    assert len(slots.resident) == 128 and slots.evictions == 0
    slots.acquire(ref("one-more"))
    assert len(slots.resident) == 128 and slots.evictions == 1 and ("x0", 1) not in slots.resident


def test_count_cap_still_applies():
    slots = AdapterSlots(FakeOps(), capacity_bytes=10_000, max_adapters=2)
    for name in "abc":
        assert slots.acquire(ref(name)) is not None
        slots.release(ref(name))
    assert len(slots.resident) == 2


def test_loading_adapter_is_not_pinned_until_its_copy_finishes():
    ops = FakeOps(asynchronous=True)
    slots = AdapterSlots(ops, capacity_bytes=1000)
    a = ref("a")
    assert slots.acquire(a) == LOADING
    assert slots.acquire(a) == LOADING and slots.loads == 1  # one copy, however often asked
    ops.events[slots.slot_of(a)].done = True
    slot = slots.acquire(a)
    assert slot >= 0 and slots._pins[slot] == 1


def test_scheduler_admits_later_requests_while_an_adapter_loads():
    ops = FakeOps(asynchronous=True)
    slots = AdapterSlots(ops, capacity_bytes=1000)
    resident = ref("resident")
    assert slots.acquire(resident) == LOADING
    ops.events[slots.slot_of(resident)].done = True
    slots.acquire(resident)
    slots.release(resident)
    sched = Scheduler(BlockManager(64, 16), slots, max_num_seqs=8, max_batched_tokens=256)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    cold = Sequence([1, 2, 3], params, ref("cold"), lambda out: None)
    warm = Sequence([4, 5], params, resident, lambda out: None)
    base = Sequence([6], params, None, lambda out: None)
    for seq in (cold, warm, base):
        sched.add(seq)
    batch = sched.schedule()
    assert [s for s, _ in batch] == [warm, base]  # cold waits for its copy, the others run
    assert list(sched.waiting) == [cold]
    ops.events[slots.slot_of(cold.adapter)].done = True
    assert [s for s, _ in sched.schedule()][-1] is cold


def test_scheduler_asks_each_loading_adapter_once_a_step_and_unpins_what_it_cannot_start():
    """Many requests queued behind loading adapters: one event query per adapter and step, no prefix lookups for
    them; a resident adapter's request that finds no KV room leaves its slot unpinned."""
    ops = FakeOps(num_slots=64, asynchronous=True)
    slots = AdapterSlots(ops, capacity_bytes=64 * 100)
    resident = ref("resident")
    assert slots.acquire(resident) == LOADING
    ops.events[slots.slot_of(resident)].done = True
    slots.acquire(resident)
    slots.release(resident)
    blocks = BlockManager(8, 16)
    sched = Scheduler(blocks, slots, max_num_seqs=64, max_batched_tokens=256)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    cold = [ref(f"cold{i}") for i in range(4)]
    queued = [Sequence([7] * 20, params, cold[i % 4], lambda out: None) for i in range(40)]
    warm = Sequence([4, 5], params, resident, lambda out: None)
    for seq in queued + [warm]:
        sched.add(seq)
    queries, lookups = [], []
    batch = sched.schedule()  # starts the four loads; only warm runs
    assert [s for s, _ in batch] == [warm] and slots.loads == 5
    for slot, event in ops.events.items():
        event.query = lambda _slot=slot: queries.append(_slot) or False
    original = blocks.cached_prefix
    blocks.cached_prefix = lambda seq: lookups.append(seq) or original(seq)
    assert [s for s, _ in sched.schedule()] == [warm]  # the 40 requests wait for 4 loads: 4 queries, no lookups
    assert len(queries) == 4 and lookups == [] and list(sched.waiting) == queued
    sched.finish(warm, "stop")
    # a resident adapter's long prompt that the KV blocks cannot hold: not admitted, its slot left unpinned
    big = Sequence([9] * 200, params, resident, lambda out: None)
    sched.waiting.appendleft(big)
    sched.schedule()
    assert big in sched.waiting and slots.pinned == 0


def test_fixed_pool_never_moves_and_reports_full():
    pool = WeightPool("cpu", torch.float32, capacity=1000)
    address = pool.buffer.data_ptr()
    a = pool.allocate(500)
    assert a == 0 and pool.allocate(600) is None
    b = pool.allocate(400)
    assert b is not None and pool.buffer.data_ptr() == address
    pool.free(a)
    assert pool.allocate(500) == 0 and pool.buffer.data_ptr() == address
