"""What every transport (HTTP, gRPC) does with a request, without touching tensors or sockets.

One admission path for both transports: `Service.open_request` authenticates nothing (the
transport hands it the caller's Tenant), resolves the `model` name in the tenant's namespace to an
adapter version, tokenises off the event loop, checks the limits and submits to the engine; the
check of the in-flight counter and the submit happen together, under one lock.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import logging
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters.incoming import IncomingWeights
from .adapters.peft_format import AdapterError, BaseShape, refuse_pickle
from .adapters.registry import AdapterRef, AdapterRegistry
from .adapters.source import AdapterSource
from .adapters.store import AdapterStore, Staged, StoredAdapter, check_adapter_id
from .base_model import BaseModel, cache_dir, describe
from .engine import Engine, EngineConfig, EngineDead, RequestError
from .metrics import Metrics
from .outbox import Outbox
from .sequence import SamplingParams, StepOutput
from .tenants import OPEN_TENANT, KeyRing, Tenant, bearer_key
from .warm_up import warm_up

BASE_MODEL_ID = "base"
MAX_PAGE = 1000  # the largest `limit` of a list route
log = logging.getLogger("loraplex.service")


@dataclass
class ServiceConfig:
    adapter_dir: Path | None = None
    adapter_sources: tuple[Path, ...] = ()  # --adapter-source: folders of PEFT adapters loaded on first use
    max_lora_rank: int = 64
    max_adapter_bytes: int = 512 << 20  # largest upload (weights)
    max_host_adapters: int | None = None  # optional cap on parsed adapters cached in host memory
    max_host_adapter_bytes: int | None = None  # host memory for parsed adapter weights (None: registry default)
    default_max_tokens: int = 256
    max_waiting: int = 512  # admitted requests the engine has not started yet
    max_concurrent: int = 1024  # admitted requests not finished (running + waiting)
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_body_bytes: int = 4 << 20  # request bodies other than uploads
    max_adapters_per_tenant: int = 256
    request_timeout: float = 600.0  # seconds from admission to the last token
    retry_after: int = 1  # seconds, in the Retry-After of a 429 / 503

    def limits(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "max_prompt_tokens": self.max_prompt_tokens,
                "max_tokens": self.max_tokens, "max_concurrent": self.max_concurrent,
                "max_waiting": self.max_waiting, "max_upload_bytes": self.max_adapter_bytes,
                "max_adapters_per_tenant": self.max_adapters_per_tenant,
                "max_host_adapter_bytes": self.max_host_adapter_bytes, "request_timeout_s": self.request_timeout}


class ServiceError(Exception):
    """A request refused or ended by the service: an HTTP status (mapped to a gRPC code) and a message."""
    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, status: int | None = None, kind: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.kind = kind or self.kind
        self.retry_after = retry_after


class ModelNotFound(ServiceError):
    status, kind = 404, "not_found_error"


class QueueFull(ServiceError):
    """Too many requests in flight or waiting for the engine (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""
    status, kind = 429, "rate_limit_error"


class ShuttingDown(ServiceError):
    status, kind = 503, "unavailable_error"


class RequestTimeout(ServiceError):
    status, kind = 504, "timeout_error"


class EngineFailure(ServiceError):
    status, kind = 500, "server_error"


def error_of(e: Exception) -> ServiceError | None:
    """The ServiceError a known exception stands for; None for an unexpected one (a bug: 500)."""
    if isinstance(e, ServiceError):
        return e
    if isinstance(e, AdapterError):
        return ServiceError(e.message, e.status, "not_found_error" if e.status == 404 else "adapter_error")
    if isinstance(e, EngineDead):
        return EngineFailure(str(e), 503, "unavailable_error")
    if isinstance(e, RequestError):
        return ServiceError(str(e))
    return None


class Generation:
    """One admitted request's engine outputs, iterated asynchronously. Closing it before the last
    output (client gone, timeout, shutdown) aborts the engine request; it is released exactly once."""

    def __init__(self, service: Service, deadline: float):
        self.service = service
        self.deadline = deadline
        self.queue: asyncio.Queue[StepOutput | ServiceError] = asyncio.Queue()
        self.request_id: int | None = None
        self.finished = False
        self.closed = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            # once per token of every stream: an output already queued is taken at once, and the wait for the
            # next one is a timeout scope, not wait_for's extra task (12 vs 0.2 us a token on a 2-core host)
            try:
                out = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if sys.version_info < (3, 11):  # no asyncio.timeout
                    out = await asyncio.wait_for(self.queue.get(), remaining)
                else:
                    async with asyncio.timeout(remaining):
                        out = await self.queue.get()
        except TimeoutError:
            self.close()
            raise RequestTimeout(f"the request ran past the server's timeout of "
                                 f"{self.service.config.request_timeout:g} s") from None
        if isinstance(out, ServiceError):  # cancelled by the service (shutdown)
            self.close()
            raise out
        if out.error:
            self.close()
            raise EngineFailure(out.error)
        if out.finished:
            self.finished = True
            self.close()
        return out

    def cancel(self, error: ServiceError) -> None:
        self.queue.put_nowait(error)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.finished and self.request_id is not None:
            self.service.engine.abort(self.request_id)
        self.service._release(self)

    async def aclose(self) -> None:
        self.close()


class Service:
    def __init__(self, base: BaseModel, engine_config: EngineConfig | None = None,
                 config: ServiceConfig | None = None, keys: KeyRing | None = None):
        self.base = base
        self.config = config = config or ServiceConfig()
        self.keys = keys  # None: open mode
        store = AdapterStore(config.adapter_dir or cache_dir() / "adapters")
        shape = BaseShape(base.num_layers, base.projection_shapes)
        self.engine = Engine(base, engine_config)
        self.registry = AdapterRegistry(store, shape, max_rank=config.max_lora_rank,
                                        max_bytes=config.max_adapter_bytes, max_host_bytes=config.max_host_adapter_bytes,
                                        max_host_adapters=config.max_host_adapters,
                                        packed_bytes=self.engine.ops.host_bytes)
        self.sources = [AdapterSource(p) for p in config.adapter_sources]  # every tenant's
        self._tenant_sources: dict[str, list[AdapterSource]] = {}  # a tenant's own, from the key file
        self.metrics = Metrics(self.engine.stats)
        self.engine.on_finish = self.metrics.on_finish  # the engine's one metrics hook
        self._lock = threading.Lock()  # the in-flight set and the submit that grows it
        self._upload_lock = threading.Lock()  # the per-tenant count and the commit that grows it
        self._outboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Outbox
        self._preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-pack")  # _prepare_soon
        self._in_flight: set[Generation] = set()
        self.draining = False

    def start(self) -> None:
        """Warm the engine up (CUDA: compile and capture what serving uses), then start its loop."""
        hook, self.engine.on_finish = self.engine.on_finish, None  # warm-up requests are not traffic
        try:
            self.engine.warm_up_seconds = warm_up(self.engine)
        finally:
            self.engine.on_finish = hook
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self._preparing.shutdown(wait=False, cancel_futures=True)

    # -- callers ----------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization` value (HTTP header or gRPC metadata); the key is never logged."""
        if self.keys is None:
            return OPEN_TENANT
        key = bearer_key(authorization)
        if key is None:
            raise ServiceError("missing API key: send 'Authorization: Bearer <key>'", 401, "authentication_error")
        tenant = self.keys.tenant_for(key)
        if tenant is None:
            raise ServiceError("invalid API key", 403, "permission_error")
        return tenant

    # -- requests ---------------------------------------------------------------------------
    async def open_request(self, tenant: Tenant, model: str, encode: Callable[[], list[int]],
                           params: SamplingParams, adapters: list[tuple[str, float]] | None = None) -> Generation:
        """Admit one request: resolve its adapter (or its mix of `adapters`, (id, weight) pairs, on the
        base model), tokenise (`encode`, off the event loop), check the limits and submit. The caller
        iterates the Generation and closes it (aclosing)."""
        self._check_open()
        if params.max_tokens > self.config.max_tokens:
            raise ServiceError(f"max_tokens is {params.max_tokens}, above the server's limit of {self.config.max_tokens}")
        adapter = await (self._resolve_mix(tenant, model, adapters) if adapters else self._resolve(tenant, model))
        prompt_ids = await asyncio.to_thread(encode)
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise ServiceError(f"the prompt is {len(prompt_ids)} tokens, above the server's limit of "
                               f"{self.config.max_prompt_tokens}")
        await asyncio.to_thread(self.engine.check, prompt_ids, params)  # compiles a response_format grammar
        loop = asyncio.get_running_loop()
        generation = Generation(self, loop.time() + self.config.request_timeout)
        with self._lock:
            self._check_open()
            self._check_capacity()
            outbox = self._outboxes.get(loop) or self._outboxes.setdefault(loop, Outbox(loop))
            emit = functools.partial(outbox.put, generation.queue)
            generation.request_id = self.engine.submit(prompt_ids, params, adapter, emit)
            self._in_flight.add(generation)
        return generation

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica",
                               retry_after=self.config.retry_after)

    def _check_capacity(self) -> None:
        in_flight = len(self._in_flight)
        if in_flight >= self.config.max_concurrent:
            raise QueueFull(f"the server is at its limit of {self.config.max_concurrent} concurrent requests; "
                            "retry later", retry_after=self.config.retry_after)
        waiting = in_flight - self.engine.stats()["running"]  # admitted here, not started by the engine
        if waiting >= self.config.max_waiting:
            raise QueueFull(f"the engine queue is full ({waiting} requests waiting); retry later",
                            retry_after=self.config.retry_after)

    def _release(self, generation: Generation) -> None:
        with self._lock:
            self._in_flight.discard(generation)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def _resolve(self, tenant: Tenant, model: str) -> AdapterRef | None:
        if model in (BASE_MODEL_ID, self.base.name):
            return None
        try:
            if self._has_sources(tenant):  # another request loads it: wait here, not in a worker thread
                for pending in self.registry.loading(model) + self.registry.loading(tenant.stored_id(model)):
                    try:  # (it may be another namespace's adapter of that id: its outcome is not ours to report)
                        await asyncio.wrap_future(pending)
                    except Exception:  # noqa: BLE001 - resolved again below, in this tenant's namespace
                        pass
            return await asyncio.to_thread(self._resolve_and_prepare, tenant, model)
        except AdapterError as e:
            if e.status == 404 or (e.status == 400 and not self._has_sources(tenant)):
                raise ModelNotFound(f"model {model!r} not found: use {BASE_MODEL_ID!r} or an uploaded adapter id")
            raise

    def _resolve_and_prepare(self, tenant: Tenant, adapter_id: str) -> AdapterRef:
        ref = self._resolve_id(tenant, adapter_id)
        self.engine.prepare_adapter(ref)  # pack for loading here, not on the engine thread
        return ref

    def _own_sources(self, tenant: Tenant) -> list[AdapterSource]:
        """The adapter sources the key file gives this tenant alone."""
        dirs = self.keys.sources_of(tenant) if self.keys is not None else ()
        if not dirs:
            return []
        found = self._tenant_sources.get(tenant.name)
        if found is None:
            found = self._tenant_sources[tenant.name] = [AdapterSource(d) for d in dirs]
        return found

    def _has_sources(self, tenant: Tenant) -> bool:
        return bool(self.sources) or bool(self._own_sources(tenant))

    def _resolve_id(self, tenant: Tenant, adapter_id: str) -> AdapterRef:
        """The tenant's stored adapter `adapter_id`, else the folder of that name in the first adapter source
        holding one (the tenant's own from the key file, then the --adapter-source ones), loaded on this first
        use. AdapterError: 404 when none has it; 400 for an id that could leave a source directory or a
        source folder that is not a valid adapter (naming it)."""
        try:
            check_adapter_id(adapter_id)
            return self.registry.resolve(tenant.stored_id(adapter_id))
        except AdapterError as e:
            if e.status not in (400, 404) or not self._has_sources(tenant):
                raise
        # a tenant's own source adapter is cached (and counted in metrics) under its stored-id form
        for source, ref_id in ([(s, tenant.stored_id(adapter_id)) for s in self._own_sources(tenant)] +
                               [(s, adapter_id) for s in self.sources]):
            ref = self.registry.resolve_source(adapter_id, source, ref_id)
            if ref is not None:
                return ref
        raise AdapterError(f"adapter {adapter_id!r} not found", 404)

    async def _resolve_mix(self, tenant: Tenant, model: str, adapters: list[tuple[str, float]]) -> AdapterRef:
        """A weighted mix of the tenant's adapters, each resolved in its namespace like a `model`."""
        if model not in (BASE_MODEL_ID, self.base.name):
            raise ServiceError(f"with adapters, model must be {BASE_MODEL_ID!r} (the mix is applied to the base "
                               f"model), got {model!r}")
        ids = [adapter_id for adapter_id, _ in adapters]
        if len(set(ids)) != len(ids):
            raise ServiceError(f"an adapter appears twice in the mix ({', '.join(ids)}): give each id once")
        for adapter_id in ids:
            try:
                check_adapter_id(adapter_id)
            except AdapterError:
                raise ModelNotFound(f"adapter {adapter_id!r} of the mix not found") from None
        return await asyncio.to_thread(self._mix_and_prepare, tenant, adapters)

    def _mix_and_prepare(self, tenant: Tenant, adapters: list[tuple[str, float]]) -> AdapterRef:
        members = []
        for adapter_id, weight in adapters:
            try:
                members.append((self._resolve_id(tenant, adapter_id), weight))
            except AdapterError as e:
                if e.status == 404 or (e.status == 400 and not self._has_sources(tenant)):
                    raise ModelNotFound(f"adapter {adapter_id!r} of the mix not found") from None
                raise
        ref = self.registry.mix(members)
        self.engine.prepare_adapter(ref)
        return ref

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        return self.base.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        tok = self.base.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RequestError("the base model's tokenizer has no chat template")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    # -- shutdown ---------------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Stop admitting, let the requests in flight finish within `grace` seconds, then end the rest."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight:
            log.warning("shutdown grace of %g s over: cancelling %d requests", grace, len(self._in_flight))
        for generation in list(self._in_flight):
            generation.cancel(ShuttingDown("the server shut down before the request finished"))
        while self._in_flight and loop.time() < deadline + 5:  # their transports close them
            await asyncio.sleep(0.05)

    # -- adapters (in the caller's namespace) ---------------------------------------------
    def _own(self, tenant: Tenant, record: StoredAdapter) -> StoredAdapter | None:
        own_id = tenant.own_id(record.id)
        return None if own_id is None else dataclasses.replace(record, id=own_id)

    def _check_own_id(self, adapter_id: str) -> None:
        check_adapter_id(adapter_id)
        if adapter_id in (BASE_MODEL_ID, self.base.name):
            raise AdapterError(f"adapter id {adapter_id!r} is reserved for the base model", 400)

    def _not_found(self, adapter_id: str) -> AdapterError:
        return AdapterError(f"adapter {adapter_id!r} not found", 404)

    async def upload_adapter(self, tenant: Tenant, adapter_id: str, config_raw: bytes,
                             weights_raw: bytes) -> StoredAdapter:
        try:
            self._check_own_id(adapter_id)
            refuse_pickle(weights_raw)
            record = await asyncio.to_thread(self._upload, tenant, adapter_id, config_raw, weights_raw)
        except AdapterError:
            self.metrics.uploads.labels("rejected").inc()
            raise
        self.metrics.uploads.labels("ok").inc()
        self._prepare_soon(record)
        return self._own(tenant, record)

    # A streamed upload: open_upload() when its weights start, IncomingWeights.write() as they arrive, then
    # upload_received() once the request is read, or refuse_upload() when the transport refuses it first.
    def check_upload_id(self, tenant: Tenant, adapter_id: str) -> None:
        """The checks an upload's id gets before its weights are read (no disk access: it runs on the event
        loop): valid, not the base model's, not too long for the tenant. Its count is checked at the commit."""
        self._check_own_id(adapter_id)
        self._stored_upload_id(tenant, adapter_id)

    def open_upload(self, capacity: int | None = None, config_raw: bytes | None = None,
                    weights_sha256: bool = False) -> IncomingWeights:
        """Where a streamed upload's weights go as they arrive (a temporary directory of the store)."""
        return IncomingWeights(self.registry.store, self.registry.max_bytes, capacity, config_raw, weights_sha256)

    async def refuse_upload(self, incoming: IncomingWeights | None) -> None:
        """A streamed upload refused before upload_received (its body, its form, the client gone): nothing stays."""
        if incoming is not None:
            await incoming.discard()
        self.metrics.uploads.labels("rejected").inc()

    async def upload_received(self, tenant: Tenant, adapter_id: str, config_raw: bytes,
                              incoming: IncomingWeights) -> StoredAdapter:
        """Commit a streamed upload whose bytes are all in: its files are synced, then it is validated (off the
        event loop) and published; refused, its temporary directory is gone before this returns."""
        received = time.perf_counter()
        try:
            self._check_own_id(adapter_id)
            staged = await incoming.finish(config_raw)
            synced = time.perf_counter()
            record = await asyncio.to_thread(self._upload, tenant, adapter_id, config_raw, incoming.data, staged, True)
            log.info("upload %s: %.1f MB received in %.0f ms, then synced in %.0f ms, validated and committed in %.0f ms",
                     record.id, incoming.size / 1e6, 1e3 * (received - incoming.opened), 1e3 * (synced - received),
                     1e3 * (time.perf_counter() - synced))
        except BaseException as e:
            await incoming.discard()
            if isinstance(e, AdapterError):
                self.metrics.uploads.labels("rejected").inc()
            raise
        finally:
            incoming.release()
        self.metrics.uploads.labels("ok").inc()
        self._prepare_soon(record)
        return self._own(tenant, record)

    def _prepare_soon(self, record: StoredAdapter) -> None:
        """Pack a new upload for loading (pinned host memory in the kernels' layout) on a worker thread, after
        the upload is answered: its first request then pays only the transfer and its prefill (issue #20)."""
        weights = self.registry.cached(record)
        if weights is None:  # not cached (host memory full): packed at first use, as before
            return

        def prepare():
            try:
                self.engine.prepare_adapter(AdapterRef(record.id, record.version, weights))
            except Exception as e:  # noqa: BLE001 - the first request packs it again and reports a failure
                log.warning("packing adapter %s v%d after its upload failed: %s", record.id, record.version, e)
        self._preparing.submit(prepare)

    def _stored_upload_id(self, tenant: Tenant, adapter_id: str) -> str:
        stored_id = tenant.stored_id(adapter_id)
        try:
            check_adapter_id(stored_id)
        except AdapterError:
            raise AdapterError(f"adapter id {adapter_id!r} is too long for tenant {tenant.name!r}", 400) from None
        return stored_id

    def _check_adapter_count(self, tenant: Tenant) -> None:
        owned = len(self.list_adapters(tenant))
        if owned >= self.config.max_adapters_per_tenant:
            raise AdapterError(f"tenant {tenant.name!r} already has {owned} adapters, the limit; "
                               "delete one first", 403)

    def _upload(self, tenant: Tenant, adapter_id: str, config_raw: bytes, weights_raw,
                staged: Staged | None = None, owned: bool = False) -> StoredAdapter:
        try:
            stored_id = self._stored_upload_id(tenant, adapter_id)
            with self._upload_lock:
                if not tenant.admin and self.registry.store.get(stored_id) is None:
                    self._check_adapter_count(tenant)
                return self.registry.upload(stored_id, config_raw, weights_raw, staged, owned)
        except BaseException:
            if staged is not None:
                self.registry.store.discard(staged)
            raise

    def list_adapters(self, tenant: Tenant) -> list[StoredAdapter]:
        return [own for record in self.registry.list() if (own := self._own(tenant, record)) is not None]

    def get_adapter(self, tenant: Tenant, adapter_id: str) -> StoredAdapter:
        self._check_own_id(adapter_id)
        try:
            return self._own(tenant, self.registry.get(tenant.stored_id(adapter_id)))
        except AdapterError as e:
            raise self._not_found(adapter_id) if e.status in (400, 404) else e

    def delete_adapter(self, tenant: Tenant, adapter_id: str) -> StoredAdapter:
        self._check_own_id(adapter_id)
        try:
            record = self.registry.delete(tenant.stored_id(adapter_id))
        except AdapterError as e:
            raise self._not_found(adapter_id) if e.status in (400, 404) else e
        self.metrics.forget_adapter(record.id, record.version)
        return self._own(tenant, record)

    def _own_ids(self, tenant: Tenant) -> list[str]:
        """The ids of the tenant's stored adapters, sorted (one directory read; no adapter file opened)."""
        return [own for stored in self.registry.store.ids() if (own := tenant.own_id(stored)) is not None]

    def list_adapters_page(self, tenant: Tenant, limit: int | None = None,
                           after: str | None = None) -> tuple[list[StoredAdapter], bool]:
        """Up to `limit` of the tenant's adapters with ids after `after`, by id; and whether more follow."""
        ids = self._own_ids(tenant)
        page, more = [], False
        for adapter_id in ids[0 if after is None else bisect.bisect_right(ids, after):]:
            record = self.registry.store.get(tenant.stored_id(adapter_id))
            if record is None:  # deleted meanwhile
                continue
            if limit is not None and len(page) == limit:
                more = True
                break
            page.append(self._own(tenant, record))
        return page, more

    def models_page(self, tenant: Tenant, limit: int | None = None, after: str | None = None) -> tuple[list[dict], bool]:
        """The base model first, then the tenant's stored adapters and every --adapter-source adapter (a stored
        adapter hides a source one of its id), by id: up to `limit` entries after `after`; and whether more follow.
        Source adapters are listed from their folders' names, without reading them."""
        stored = self._own_ids(tenant)
        own = set(stored)
        sources = {i for source in self._own_sources(tenant) + self.sources for i in source.ids()
                   if i not in own and i != self.base.name}
        entries = [(0, BASE_MODEL_ID, "base")] + sorted([(1, i, "store") for i in stored] +
                                                         [(1, i, "source") for i in sources])
        start = 0
        if after is not None:
            start = bisect.bisect_right(entries, (0, BASE_MODEL_ID, "~") if after == BASE_MODEL_ID else (1, after, "~"))
        page, more = [], False
        common = {"object": "model", "owned_by": "loraplex", "root": self.base.name}
        for _, entry_id, kind in entries[start:]:
            if kind == "base":
                entry = {"id": BASE_MODEL_ID, **common}
            elif kind == "source":
                entry = {"id": entry_id, **common, "parent": BASE_MODEL_ID, "source": "adapter-source"}
            else:
                record = self.registry.store.get(tenant.stored_id(entry_id))
                if record is None:
                    continue
                entry = {"id": entry_id, **common, "parent": BASE_MODEL_ID, "version": record.version}
            if limit is not None and len(page) == limit:
                more = True
                break
            page.append(entry)
        return page, more

    def models(self, tenant: Tenant) -> list[dict]:
        return self.models_page(tenant)[0]

    def health(self) -> dict:
        status = "error" if not self.engine.alive else "draining" if self.draining else "ok"
        limits = {**self.config.limits(), "max_host_adapter_bytes": self.registry.max_host_bytes}
        return {"status": status, "model": describe(self.base),
                **self.engine.stats(), "in_flight": self.in_flight, "limits": limits,
                "quarantined_adapters": [dataclasses.asdict(q) for q in self.registry.store.quarantined]}


def adapter_json(a: StoredAdapter) -> dict:
    return {"id": a.id, "object": "adapter", "version": a.version, "peft_type": a.peft_type, "rank": a.rank,
            "size_bytes": a.size_bytes, "created": int(a.created)}
