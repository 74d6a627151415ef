"""KV-cache pages: fixed-size blocks, each sequence's block table, and the prefix cache.

Prefix caching: a full block of prompt tokens, once computed, is registered under a hash that chains
the previous block's hash, the block's tokens and the adapter key (adapter id and version; the base
model has its own key), so a hash names the whole token prefix up to that block as computed by one
adapter version. A request admitted later with the same key and prefix takes a reference on those
blocks instead of computing them. Only prompt blocks are registered: decode rows may run on merged
weights (merged.py), whose K/V differ in the last bits from the unmerged prefill's.

A block is free (no content), referenced (ref count > 0), or cached and unreferenced: it keeps its
K/V until its space is needed, then the least recently freed such block is evicted. Blocks freed
together enter the LRU tail first, so a prefix's head outlives its tail.
"""
from __future__ import annotations

import functools
import hashlib
import json
from array import array
from collections import OrderedDict

import torch

from .sequence import Sequence

BASE_KEY = b"base"  # the base model's adapter key: no adapter id can encode to it (see adapter_key)


def adapter_key(seq: Sequence) -> bytes:
    """The adapter part of seq's block hashes: the base model, or one (adapter id, version)."""
    if seq.adapter is None:
        return BASE_KEY
    return _encoded_key(seq.adapter.key)


@functools.lru_cache(maxsize=4096)
def _encoded_key(key: tuple) -> bytes:
    return json.dumps(["adapter", *key]).encode()


def block_hash(previous: bytes | None, key: bytes, tokens: list[int]) -> bytes:
    h = hashlib.sha256()
    h.update(previous or b"\0" * 32)
    h.update(len(key).to_bytes(4, "little"))
    h.update(key)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # no content
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks  # the hash of a full computed prompt block
        self._cached: dict[bytes, int] = {}  # hash -> the block registered under it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recent first
        self.queried_blocks = 0  # full prompt blocks looked up at admission
        self.hit_blocks = 0  # of those, found in the cache
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and cached ones no sequence references."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by sequences."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0

    # -- prefix cache ----------------------------------------------------------------------
    def _lookup_span(self, seq: Sequence) -> int:
        """Full blocks a new sequence may take from the cache: prompt blocks before its last token,
        which must be computed to give logits."""
        return min(len(seq) - 1, seq.num_prompt_tokens) // self.block_size

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest prefix of seq's tokens (a lookup; takes nothing)."""
        if not self.prefix_caching:
            return []
        key, size, previous, blocks = adapter_key(seq), self.block_size, None, []
        for i in range(self._lookup_span(seq)):
            previous = block_hash(previous, key, seq.token_ids[i * size:(i + 1) * size])
            block = self._cached.get(previous)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_needed_with_prefix(self, prefix: list[int], num_tokens: int) -> int:
        """Blocks taken from num_free when a new sequence starts on the cached `prefix` and grows to
        num_tokens tokens: its new blocks and the prefix blocks no one references now."""
        new = max(-(-num_tokens // self.block_size) - len(prefix), 0)
        return new + sum(1 for b in prefix if self._refs[b] == 0)

    def take_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        """Start seq (no blocks yet) on the cached blocks of `prefix`: they count as computed."""
        assert not seq.block_table and seq.num_computed == 0
        if self.prefix_caching:
            self.queried_blocks += self._lookup_span(seq)
            self.hit_blocks += len(prefix)
        for block in prefix:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table = list(prefix)
        seq.num_computed = len(prefix) * self.block_size

    def cache_computed(self, seq: Sequence, num_new: int) -> None:
        """Register the prompt blocks that the step which computed seq's last num_new tokens filled."""
        if not self.prefix_caching:
            return
        size = self.block_size
        first = (seq.num_computed - num_new) // size  # blocks before it were full before this step
        last = min(seq.num_computed, seq.num_prompt_tokens) // size
        if first >= last:  # a decode row, or a chunk that filled no prompt block: every step of every row asks
            return
        key = adapter_key(seq)
        for i in range(first, last):
            block = seq.block_table[i]
            previous = self._hash[seq.block_table[i - 1]] if i > 0 else None
            if i > 0 and previous is None:  # the chain was dropped (uncache): nothing after it is named
                return
            h = block_hash(previous, key, seq.token_ids[i * size:(i + 1) * size])
            self._hash[block] = h  # also when another block holds h: the chain continues through it
            self._cached.setdefault(h, block)

    def uncache(self, seq: Sequence) -> list[int]:
        """Drop from the cache the blocks only seq references (their K/V is not to be trusted, e.g.
        NaN); blocks other sequences read stay. Returns the dropped blocks."""
        dropped = []
        for block in seq.block_table:
            if self._refs[block] != 1:
                continue
            h = self._hash[block]
            if h is not None and self._cached.get(h) == block:
                del self._cached[h]
            self._hash[block] = None
            dropped.append(block)
        return dropped

    # -- allocation ------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        want = -(-num_tokens // self.block_size)
        return max(want - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def _take_block(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash[block]]
            self._hash[block] = None
            self.evictions += 1
        self._refs[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens tokens."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_block())

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # the tail first: it becomes the least recent
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            h = self._hash[block]
            if h is not None and self._cached.get(h) == block:
                self._evictable[block] = None
            else:
                self._hash[block] = None
                self._free.append(block)
        seq.block_table = []
        seq.num_computed = 0

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """Cache slot of each of seq's positions [0, num_tokens)."""
        positions = torch.arange(num_tokens)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size
