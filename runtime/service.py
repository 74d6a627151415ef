"""What every transport (HTTP, gRPC) does with a request, without touching tensors or sockets.

One admission path for both transports: `Service.open_request` authenticates nothing (the
transport hands it the caller's Tenant), resolves the `model` name in the tenant's namespace to an
adapter version, tokenises off the event loop, checks the limits and submits to the engine; the
check of the in-flight counter and the submit happen together, under one lock. What `model` names is
AdapterResolution's (adapter_resolution.py); the adapter routes (uploads, listing, deletion, the model list)
are AdapterAdmin's (adapter_admin.py); the errors a request ends with are in service_errors.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters.peft_format import BaseShape
from .adapters.registry import AdapterRegistry
from .adapters.source import AdapterSource
from .adapters.store import AdapterStore
from .adapter_admin import AdapterAdmin
from .adapter_resolution import LOAD_THREADS, AdapterResolution
from .base_model import BaseModel, cache_dir, describe
from .engine import Engine, EngineConfig, RequestError
from .metrics import Metrics
from .outbox import Outbox
from .sequence import SamplingParams, StepOutput
from .service_errors import EngineFailure, QueueFull, RequestTimeout, ServiceError, ShuttingDown
from .tenants import OPEN_TENANT, KeyRing, Tenant, bearer_key
from .warm_up import warm_up

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
        # one timer for the whole request, set when it is first awaited: it queues the timeout as an error. (A
        # timeout scope around each token's wait was ≈ 2% of py-spy's GIL-holder samples in a 400-stream 8B trace.)
        self._deadline_timer: asyncio.TimerHandle | None = None

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        if loop.time() >= self.deadline:
            self.close()
            raise self._timeout()
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(self.deadline, self._expire)
        out = await self.queue.get()
        if isinstance(out, ServiceError):  # the deadline, or cancelled by the service (shutdown)
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

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"the request ran past the server's timeout of {self.service.config.request_timeout:g} s")

    def _expire(self) -> None:
        if not self.closed:
            self.queue.put_nowait(self._timeout())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        if not self.finished and self.request_id is not None:
            self.service.engine.abort(self.request_id)
        self.service._release(self)

    async def aclose(self) -> None:
        self.close()


class Service(AdapterResolution, AdapterAdmin):
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
        # Adapter loads (read, validate, pack) have threads of their own: in asyncio's default executor a burst
        # of first loads queued the tokenisation of every request behind it (1,000 adapters: the engine idled
        # 5.0 s of a 20 s trace against 2.1 s over 64)
        self._loading = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="loraplex-load")
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
        self._loading.shutdown(wait=False, cancel_futures=True)

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
        tokens = asyncio.ensure_future(asyncio.to_thread(encode))  # beside the adapter's resolution (maybe a load)
        try:
            adapter = await (self._resolve_mix(tenant, model, adapters) if adapters else self._resolve(tenant, model))
        except BaseException:
            if not tokens.cancel() and not tokens.cancelled():
                tokens.exception()  # done already: its outcome (an error too) is not this request's answer now
            raise
        prompt_ids = await tokens
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
        waiting = in_flight - self.engine.running  # admitted here, not started by the engine
        if waiting >= self.config.max_waiting:
            raise QueueFull(f"the engine queue is full ({waiting} requests waiting); retry later",
                            retry_after=self.config.retry_after)

    def _release(self, generation: Generation) -> None:
        with self._lock:
            self._in_flight.discard(generation)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

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

    def health(self) -> dict:
        status = "error" if not self.engine.alive else "draining" if self.draining else "ok"
        limits = {**self.config.limits(), "max_host_adapter_bytes": self.registry.max_host_bytes}
        return {"status": status, "model": describe(self.base),
                **self.engine.stats(), "in_flight": self.in_flight, "limits": limits,
                "quarantined_adapters": [dataclasses.asdict(q) for q in self.registry.store.quarantined]}

