"""Which tokens run in the next step: continuous batching with chunked prefill.

Every step first continues the running sequences (one decode token each, or the next chunk of a
prompt still being prefilled), then admits waiting requests into the remaining token budget, so
new prompts start at the next step instead of waiting for the batch to drain. While any running
sequence is decoding, prefill tokens per step are capped by `prefill_budget` (set by the engine), so
a long prompt is prefilled in chunks between decode steps instead of stalling every stream; decode
rows are scheduled before any prefill chunk. A request is
admitted only when its adapter has an accelerator slot and its tokens have KV blocks; when decode
runs out of blocks the most recently admitted sequence is preempted (freed, recomputed later).
A sequence is admitted on the longest prefix of its prompt that the block manager has cached for its
adapter version and prefills only the rest.
"""
from __future__ import annotations

import time

from collections import deque

from .adapters.segments import NO_ADAPTER
from .adapters.slots import LOADING, AdapterSlots
from .block_manager import BlockManager
from .sequence import Sequence, SeqStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, slots: AdapterSlots | None, *, max_num_seqs: int,
                 max_batched_tokens: int):
        self.blocks = blocks
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.prefill_budget: int | None = None  # prefill tokens per step while decode rows run (None: no cap)
        # A step with prompt tokens may take up to the next multiple of this many tokens in all (decode rows
        # + chunks) beyond prefill_budget: its CUDA graph computes that many anyway (model_runner.py)
        self.token_quantum = 1
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.adapter is not None and seq.adapter_slot != NO_ADAPTER:
            self.slots.release(seq.adapter)
        seq.adapter_slot = NO_ADAPTER

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its tokens to compute this step) pairs."""
        budget = self.max_batched_tokens
        decoding = sum(len(seq) - seq.num_computed == 1 for seq in self.running)
        prefill_budget = budget if self.prefill_budget is None or not decoding else self.prefill_budget
        if decoding and prefill_budget < budget:
            q = self.token_quantum
            prefill_budget = min(-(-(decoding + prefill_budget) // q) * q - decoding, budget - decoding)
        batch: list[tuple[Sequence, int]] = []
        # decode rows first (stable sort keeps admission order), then chunks of prompts being prefilled
        room = self.blocks.block_size
        for seq in sorted(self.running, key=lambda s: len(s) - s.num_computed > 1):
            if seq.status is not SeqStatus.RUNNING:  # preempted below to make room
                continue
            left = len(seq) - seq.num_computed
            if left == 1 and budget > 0 and seq.num_computed < len(seq.block_table) * room:
                batch.append((seq, 1))  # a decode row whose last block has room: nothing to allocate
                budget -= 1
                continue
            n = min(left, budget) if left == 1 else min(left, budget, prefill_budget)
            if n <= 0:
                continue
            while not self.blocks.can_allocate(seq, seq.num_computed + n) and self.running[-1] is not seq:
                victim = self.running[-1]
                batch = [(s, m) for s, m in batch if s is not victim]
                self._preempt(victim)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                self._preempt(seq)
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            batch.append((seq, n))
            budget -= n
            if left > 1:
                prefill_budget -= n

        skipped: list[Sequence] = []  # waiting for their adapter's load (or for room to load it)
        # adapter versions found loading (or without room) this step: asked once per step, not once per request
        # (400 waiting requests over 156 loading adapters: 3.5 ms a step of prefix lookups and event queries)
        not_ready: set[tuple] = set()
        while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            slot = NO_ADAPTER
            if seq.adapter is not None:
                slot = None if seq.adapter.key in not_ready else self.slots.acquire(seq.adapter)
                if slot is None or slot == LOADING:
                    not_ready.add(seq.adapter.key)  # later requests with resident adapters go first
                    skipped.append(self.waiting.popleft())
                    continue
            prefix = self.blocks.cached_prefix(seq)  # a waiting sequence holds no blocks: it starts at 0
            start = len(prefix) * self.blocks.block_size
            n = min(len(seq) - start, budget, prefill_budget)
            # keep a block of headroom per running sequence so admission does not force preemption
            if self.blocks.blocks_needed_with_prefix(prefix, start + n) + len(self.running) > self.blocks.num_free:
                if slot != NO_ADAPTER:
                    self.slots.release(seq.adapter)  # (acquire pinned it)
                break
            self.waiting.popleft()
            seq.adapter_slot = slot
            seq.status = SeqStatus.RUNNING
            if seq.admitted_at is None:  # not again after a preemption
                seq.admitted_at = time.monotonic()
            self.blocks.take_prefix(seq, prefix)
            self.blocks.allocate(seq, seq.num_computed + n)
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
            prefill_budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch
