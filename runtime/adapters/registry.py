"""Adapter versions and the host-memory cache: what a new request resolves an adapter id to.

A request resolves its adapter once, at admission, into an `AdapterRef` that holds that version's
weights. Replacing or deleting the adapter afterwards changes what *new* requests get; requests
already admitted keep computing with the version they hold.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .peft_format import AdapterError, AdapterWeights, BaseShape, parse_adapter
from .store import AdapterStore, StoredAdapter


@dataclass(frozen=True, eq=False)
class AdapterRef:
    id: str
    version: int
    weights: AdapterWeights

    @property
    def key(self) -> tuple[str, int]:
        return (self.id, self.version)


class AdapterRegistry:
    def __init__(self, store: AdapterStore, base: BaseShape, *, max_rank: int = 64,
                 max_bytes: int = 512 << 20, max_host_adapters: int = 64):
        self.store = store
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.max_host_adapters = max_host_adapters
        self._host: OrderedDict[tuple[str, int], AdapterWeights] = OrderedDict()
        self._lock = threading.Lock()

    def _cache(self, key: tuple[str, int], weights: AdapterWeights) -> None:
        with self._lock:
            self._host[key] = weights
            self._host.move_to_end(key)
            while len(self._host) > self.max_host_adapters:
                self._host.popitem(last=False)

    def validate(self, config_raw: bytes, weights_raw: bytes) -> AdapterWeights:
        if len(weights_raw) > self.max_bytes:
            raise AdapterError(f"adapter weights are {len(weights_raw)} bytes, above the limit of {self.max_bytes}", 413)
        return parse_adapter(config_raw, weights_raw, self.base, self.max_rank)

    def upload(self, adapter_id: str, config_raw: bytes, weights_raw: bytes) -> StoredAdapter:
        """Validate, then commit to disk; on any error nothing is written and nothing changes."""
        self.store.get(adapter_id)  # checks the id before any parsing work
        weights = self.validate(config_raw, weights_raw)
        record = self.store.commit(adapter_id, config_raw, weights_raw, weights.peft_type, weights.rank)
        self._cache(record_key(record), weights)
        return record

    def delete(self, adapter_id: str) -> StoredAdapter:
        record = self.store.delete(adapter_id)
        if record is None:
            raise AdapterError(f"adapter {adapter_id!r} not found", 404)
        return record

    def list(self) -> list[StoredAdapter]:
        return self.store.list()

    def get(self, adapter_id: str) -> StoredAdapter:
        record = self.store.get(adapter_id)
        if record is None:
            raise AdapterError(f"adapter {adapter_id!r} not found", 404)
        return record

    def resolve(self, adapter_id: str) -> AdapterRef:
        """The current version of an adapter, with its weights in host memory (loaded from disk if needed)."""
        for _ in range(3):  # a concurrent replace can remove the version between get and read
            record = self.get(adapter_id)
            key = record_key(record)
            with self._lock:
                weights = self._host.get(key)
                if weights is not None:
                    self._host.move_to_end(key)
            if weights is None:
                try:
                    config_raw, weights_raw = self.store.read(record.id, record.version)
                except FileNotFoundError:
                    continue
                weights = parse_adapter(config_raw, weights_raw, self.base, max(self.max_rank, record.rank))
                self._cache(key, weights)
            return AdapterRef(record.id, record.version, weights)
        raise AdapterError(f"adapter {adapter_id!r} not found", 404)


def record_key(record: StoredAdapter) -> tuple[str, int]:
    return (record.id, record.version)
