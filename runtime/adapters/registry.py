"""Adapter versions and the host-memory cache: what a new request resolves an adapter id to.

A request resolves its adapter once, at admission, into an `AdapterRef` that holds that version's
weights. Replacing or deleting the adapter afterwards changes what *new* requests get; requests
already admitted keep computing with the version they hold.

Host memory for the parsed (fp32) weights is bounded in bytes (`max_host_bytes`, by default a quarter
of the machine's memory, at least 4 GiB): every request
holding a version shares one copy, which counts until the last holder drops it (a held copy is
pinned); unpinned copies stay cached, least-recently-used first out, while they fit. A resolve that
cannot fit even after evicting every unpinned copy is refused (429, retry later); an upload whose
weights alone exceed the budget is refused (413) before anything is written.

A per-request mix of adapters (`mix`) becomes one virtual adapter, keyed by its members' ids,
versions and weights, whose modules concatenate the members' factors: the engine and the kernels
see an ordinary LoRA of rank r1 + r2 + ..., cached and pinned like any other version.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..gc_timer import freeze_new
from .peft_format import (MAX_ABS_SCALE, AdapterError, AdapterWeights, BaseShape, ModuleDelta, parse_adapter,
                          refuse_pickle)
from .source import AdapterSource
from .store import AdapterStore, Staged, StoredAdapter

MIN_DEFAULT_HOST_BYTES = 4 << 30
# One adapter parsed or packed at a time in the process. Both are mostly Python (≈ 10 ms for an 8B q/v adapter on
# the CPU, more under contention), which the GIL runs one thread at a time anyway; but every thread waiting to run
# Python is one more the engine thread may queue behind for the GIL after each GPU wait and torch call. py-spy of the
# 1,000-adapter trace (8B, 16 loading threads, 156 first loads) found the loading threads holding the GIL in a third
# of its samples, and the prefill steps took 2 s more than over 64 adapters. A CPU model of it
# (bench/loader_contention.py: 96 parses + packs on 16 threads beside a step of 150 torch calls and a 4 ms GPU
# wait): a step took 72.9 ms on average with the loads free, 10.8 with this gate (5.2 without loads), and the 96
# loads 3.70 s free, 2.89 gated.
ADAPTER_HOST_WORK = threading.Lock()
# writes uploads' files to disk while the request thread validates them (file I/O releases the GIL)
_STAGING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loraplex-stage")


def default_max_host_bytes() -> int:
    """A quarter of the machine's physical memory, at least 4 GiB: a full batch of distinct adapters
    must fit (64 rank-16 Llama-3.1-8B adapters on all projections take 10.7 GB as fp32)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 0
    return max(MIN_DEFAULT_HOST_BYTES, physical // 4)
MIN_MIX, MAX_MIX = 2, 8  # members of one mix


@dataclass(frozen=True, eq=False)
class AdapterRef:
    id: str
    version: int  # 0 for a mix
    weights: AdapterWeights
    mix: tuple[tuple[str, int, float], ...] = ()  # a mix's members: (id, version, weight)

    @property
    def key(self) -> tuple:
        return ("mix", self.mix) if self.mix else (self.id, self.version)


class AdapterRegistry:
    def __init__(self, store: AdapterStore, base: BaseShape, *, max_rank: int = 64,
                 max_bytes: int = 512 << 20, max_host_bytes: int | None = None,
                 max_host_adapters: int | None = None, packed_bytes: Callable[[AdapterWeights], int] | None = None):
        self.store = store
        self.base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes  # upload size (the safetensors file)
        self.max_host_bytes = default_max_host_bytes() if max_host_bytes is None else max_host_bytes
        self.max_host_adapters = max_host_adapters  # optional cap on the count of cached copies
        # host bytes the engine's load-ready copy of an adapter takes beside its parsed weights (the kernels'
        # pinned pool layout, packed on first use or right after an upload): charged with the copy, so the
        # budget bounds what the host really holds
        self.packed_bytes = packed_bytes or (lambda weights: 0)
        self._host: OrderedDict[tuple[str, int], AdapterWeights] = OrderedDict()  # cached, oldest first
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # every copy in memory
        self._pins: dict[tuple[str, int], int] = {}  # AdapterRefs alive per version
        self.host_bytes_used = 0  # bytes of every copy in memory: cached or held by requests
        self.host_evictions = 0
        self.source_loads = 0  # on-demand adapters read and validated from an --adapter-source
        self._loading: dict[tuple[str, int], Future] = {}  # source versions being loaded: one load each
        self._lock = threading.RLock()  # re-entered by a copy's finalizer when an eviction frees it

    def _freed(self, nbytes: int) -> None:
        with self._lock:
            self.host_bytes_used -= nbytes

    def _pin(self, ref: AdapterRef) -> AdapterRef:
        """Count ref as a holder of its version's copy until ref itself is gone (its request ended)."""
        with self._lock:
            self._pins[ref.key] = self._pins.get(ref.key, 0) + 1
        weakref.finalize(ref, self._unpin, ref.key)
        return ref

    def _unpin(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]

    def _pinned(self, key: tuple[str, int]) -> bool:
        return key in self._pins

    def _cache(self, key: tuple[str, int], weights: AdapterWeights) -> AdapterWeights:
        """Keep `weights` in memory under the byte budget; returns the one shared copy of `key`."""
        with self._lock:
            shared = self._live.get(key)
            new = shared is None
            if new:
                shared = weights
                self._live[key] = shared
                charged = shared.nbytes + self.packed_bytes(shared)
                self.host_bytes_used += charged
                weakref.finalize(shared, self._freed, charged)
            self._host[key] = shared
            self._host.move_to_end(key)
            for old in [k for k in self._host if k != key]:
                over_count = self.max_host_adapters is not None and len(self._host) > self.max_host_adapters
                if self.host_bytes_used <= self.max_host_bytes and not over_count:
                    break
                if over_count or not self._pinned(old):
                    del self._host[old]  # an unpinned copy is freed now; a pinned one when its holder ends
                    self.host_evictions += 1
            if new and self.host_bytes_used > self.max_host_bytes:
                del self._host[key]
                raise AdapterError(f"host memory for adapters is full ({self.host_bytes_used} of "
                                   f"{self.max_host_bytes} bytes held by requests in flight); retry later", 429)
            return shared

    def _parse(self, config_raw: bytes, weights_raw, max_rank: int, owned: bool) -> AdapterWeights:
        with ADAPTER_HOST_WORK:  # one adapter parsed or packed at a time (see its comment)
            return parse_adapter(config_raw, weights_raw, self.base, max_rank, owned)

    def validate(self, config_raw: bytes, weights_raw, owned: bool = False) -> AdapterWeights:
        """The parsed adapter (`owned`: it may keep views of weights_raw, see parse_adapter)."""
        if len(weights_raw) > self.max_bytes:
            raise AdapterError(f"adapter weights are {len(weights_raw)} bytes, above the limit of {self.max_bytes}", 413)
        weights = self._parse(config_raw, weights_raw, self.max_rank, owned)
        if weights.nbytes > self.max_host_bytes:
            raise AdapterError(f"adapter weights take {weights.nbytes} bytes in host memory, above the server's "
                               f"adapter host memory of {self.max_host_bytes} bytes", 413)
        return weights

    def upload(self, adapter_id: str, config_raw: bytes, weights_raw, staged: Staged | Future | None = None,
               owned: bool = False,
               on_validated: Callable[[AdapterWeights], None] | None = None) -> StoredAdapter:
        """Validate, then commit to disk; on any error nothing is published and nothing changes.
        `staged`: the files already written and synced in a temporary directory of the store (a streamed upload,
        adapters/incoming.py), or a Future of them (still syncing while this validates), removed here if the
        upload is refused. Without it the files are written and synced on a worker thread while the weights are
        validated. `owned`: the cached adapter may keep views of weights_raw (IncomingWeights.data).
        `on_validated(weights)`: called once the weights pass, before the commit (work that may start early)."""
        try:
            self.store.get(adapter_id)  # checks the id before any parsing work
            if len(weights_raw) > self.max_bytes:  # (validate says so too; refuse before writing anything)
                raise AdapterError(f"adapter weights are {len(weights_raw)} bytes, above the limit of {self.max_bytes}", 413)
        except BaseException:
            self.discard_staged(staged)
            raise
        if staged is None:
            staged = _STAGING.submit(self.store.stage, config_raw, weights_raw)
        try:
            weights = self.validate(config_raw, weights_raw, owned)
        except BaseException:
            self.discard_staged(staged)
            raise
        if on_validated is not None:
            on_validated(weights)
        record = self.store.commit(adapter_id, config_raw, weights_raw, weights.peft_type, weights.rank,
                                   staged=staged.result() if isinstance(staged, Future) else staged)
        self._forget_superseded(record.id, record.version)
        try:
            self._cache(record_key(record), weights)
        except AdapterError:  # committed; loaded from disk when first used and memory allows
            pass
        freeze_new()  # the server's: the cached weights live until deleted, keep them out of GC scans
        return record

    def discard_staged(self, staged: Staged | Future | None) -> None:
        """Remove an upload's temporary directory (a Future's once it is written: the files may still be going)."""
        if isinstance(staged, Future):
            staged.add_done_callback(lambda f: f.exception() is None and self.store.discard(f.result()))
        elif staged is not None:
            self.store.discard(staged)

    def delete(self, adapter_id: str) -> StoredAdapter:
        record = self.store.delete(adapter_id)
        if record is None:
            raise AdapterError(f"adapter {adapter_id!r} not found", 404)
        self._forget_superseded(record.id, None)
        return record

    def _forget_superseded(self, adapter_id: str, current: int | None) -> None:
        """Drop cached copies of adapter_id's other versions (and mixes using them): no new request can
        resolve them. Requests still holding one keep it alive until they end."""
        def stale(key) -> bool:
            members = key[1] if key[0] == "mix" else (key,)
            return any(m[0] == adapter_id and m[1] != current for m in members)
        with self._lock:
            for key in [k for k in self._host if stale(k)]:
                del self._host[key]

    def list(self) -> list[StoredAdapter]:
        return self.store.list()

    def get(self, adapter_id: str) -> StoredAdapter:
        record = self.store.get(adapter_id)
        if record is None:
            raise AdapterError(f"adapter {adapter_id!r} not found", 404)
        return record

    def resolve(self, adapter_id: str, cached_only: bool = False) -> AdapterRef | None:
        """The current version of an adapter, with its weights in host memory (loaded from disk if needed;
        `cached_only`: None instead of a read)."""
        for _ in range(3):  # a concurrent replace can remove the version between get and read
            record = self.get(adapter_id)
            key = record_key(record)
            weights = self._live.get(key)  # cached, or held by requests in flight: shared, never copied again
            if weights is None and cached_only:
                return None
            if weights is None:
                try:
                    config_raw, weights_raw = self.store.read(record.id, record.version)
                except FileNotFoundError:
                    continue
                weights = self._parse(config_raw, weights_raw, max(self.max_rank, record.rank), owned=True)
            return self._pin(AdapterRef(record.id, record.version, self._cache(key, weights)))
        raise AdapterError(f"adapter {adapter_id!r} not found", 404)

    def cached(self, record: StoredAdapter) -> AdapterWeights | None:
        """The host copy of this version when the cache holds it now (nothing is read or loaded)."""
        with self._lock:
            return self._live.get(record_key(record))

    def loading(self, adapter_id: str) -> list[Future]:
        """The loads of `adapter_id` from a source now in flight: a caller on an event loop awaits them
        (asyncio.wrap_future) rather than holding a worker thread while another request loads it."""
        with self._lock:
            return [future for (loading_id, _), future in self._loading.items() if loading_id == adapter_id]

    def resolve_source(self, adapter_id: str, source: AdapterSource, ref_id: str | None = None,
                       cached_only: bool = False) -> AdapterRef | None:
        """An on-demand adapter of `source` (None when it has no folder `adapter_id`), validated exactly like an
        upload and cached under the same byte budget. Requests racing for one version load it once: the
        first reads and validates, the others wait for that result (its error too); requests for other
        adapters never wait on this load. A bad folder is an AdapterError naming it. `ref_id`: the id the
        AdapterRef (cache, metrics) carries, when not `adapter_id` (a tenant's own source: its stored-id form).
        `cached_only`: None unless the folder's current version is in memory (nothing read, no load waited for)."""
        folder = source.folder(adapter_id)
        if folder is None:
            return None
        version = source.version(folder)
        ref_id = ref_id or adapter_id
        key = (ref_id, version)
        with self._lock:
            weights = self._live.get(key)
            if weights is None and cached_only:
                return None
            loading = None if weights is not None else self._loading.get(key)
            owner = weights is None and loading is None
            if owner:
                loading = self._loading[key] = Future()
        if weights is None and not owner:
            weights = loading.result()
        if weights is not None:
            return self._pin(AdapterRef(ref_id, version, self._cache(key, weights)))
        try:  # this request loads it; it stays in _loading until cached, so no second load can start
            config_raw, weights_raw = source.read(folder, self.max_bytes)
            try:
                refuse_pickle(weights_raw)
                weights = self.validate(config_raw, weights_raw, owned=True)
            except AdapterError as e:
                raise AdapterError(f"adapter source folder {folder}: {e.message}",
                                   e.status if e.status in (413, 429) else 400) from None
            with self._lock:
                self.source_loads += 1
            ref = self._pin(AdapterRef(ref_id, version, self._cache(key, weights)))
            loading.set_result(weights)
            return ref
        except BaseException as e:
            loading.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._loading[key]

    def mix(self, members: list[tuple[AdapterRef, float]]) -> AdapterRef:
        """One virtual adapter computing sum_i weight_i * delta_i of resolved members (PEFT's
        add_weighted_adapter(combination_type="cat")), shared by every request with the same mix."""
        if not MIN_MIX <= len(members) <= MAX_MIX:
            raise AdapterError(f"a mix takes {MIN_MIX} to {MAX_MIX} adapters, got {len(members)}", 400)
        if not all(math.isfinite(weight) for _, weight in members):
            raise AdapterError(f"mix weights must be finite numbers, got {[weight for _, weight in members]}", 400)
        mix = tuple((ref.id, ref.version, float(weight)) for ref, weight in members)
        key = ("mix", mix)  # AdapterRef.key of this mix
        weights = self._live.get(key)
        if weights is None:
            weights = mix_weights([(ref.weights, weight) for ref, weight in members], self.max_rank)
        mix_id = "+".join(ref.id for ref, _ in members)
        return self._pin(AdapterRef(mix_id, 0, self._cache(key, weights), mix))


def lora_form(m: ModuleDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain LoRA factors (A [in, R], B [R, out], without the scale) of a module: GraLoRA with k
    blocks of rank r (+ hybrid_r) is exactly a block-sparse LoRA of rank k*r (+ hybrid_r).

    Block n of the input feeds columns n*r..(n+1)*r of A through A[n]; piece j (r/k wide) of that
    rank-r result feeds output block j through rows n*r/k.. of B[j] (see ModuleDelta)."""
    k, in_k, r = m.A.shape
    out_k, rk = m.B.shape[2], r // k
    A = torch.zeros(k * in_k, k * r, dtype=m.A.dtype)
    B = torch.zeros(k * r, k * out_k, dtype=m.B.dtype)
    for n in range(k):
        A[n * in_k:(n + 1) * in_k, n * r:(n + 1) * r] = m.A[n]
        for j in range(k):
            B[n * r + j * rk:n * r + (j + 1) * rk, j * out_k:(j + 1) * out_k] = m.B[j][n * rk:(n + 1) * rk]
    if m.general_A is not None:
        A, B = torch.cat([A, m.general_A], dim=1), torch.cat([B, m.general_B], dim=0)
    return A, B


def mix_weights(members: list[tuple[AdapterWeights, float]], max_rank: int) -> AdapterWeights:
    """Concatenate the members' factors per module, weight * scale folded into A as PEFT's "cat" does;
    the mixed module's own scale is 1 (PEFT's lora_alpha = r of the result)."""
    parts: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for weights, weight in members:
        for key, m in weights.modules.items():
            if m.is_dora:  # its magnitude rescales base + delta per channel: no meaning inside a sum of deltas
                raise AdapterError("a DoRA adapter cannot be part of a mix (use it on its own)", 400)
            A, B = lora_form(m)
            folded = weight * m.scale
            if abs(folded) > MAX_ABS_SCALE:
                raise AdapterError(f"a mix weight of {weight!r} makes a scale of {folded:g}, above the "
                                   f"server's bound of {MAX_ABS_SCALE:g}", 400)
            parts.setdefault(key, []).append((A.float() * folded, B.float()))  # fp32: no second rounding
    modules = {}
    for key, factors in sorted(parts.items()):
        A = torch.cat([a for a, _ in factors], dim=1)
        B = torch.cat([b for _, b in factors], dim=0)
        modules[key] = ModuleDelta(1, A.unsqueeze(0).contiguous(), B.unsqueeze(0).contiguous(), 1.0)
    rank = max(m.rank for m in modules.values())
    if rank > max_rank:
        raise AdapterError(f"the mix has rank {rank} (the members' ranks added, a GraLoRA member counting "
                           f"k*r + hybrid_r), above the server's --max-lora-rank {max_rank}", 400)
    return AdapterWeights(peft_type="LORA", rank=rank, config={"mix": [w for _, w in members]}, modules=modules)


def record_key(record: StoredAdapter) -> tuple[str, int]:
    return (record.id, record.version)
