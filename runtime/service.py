"""What every transport (HTTP, gRPC) does with a request, without touching tensors or sockets:
resolve the `model` name to an adapter version, tokenize, stream engine outputs, manage adapters.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from .adapters.peft_format import AdapterError, BaseShape
from .adapters.registry import AdapterRef, AdapterRegistry
from .adapters.store import AdapterStore, StoredAdapter
from .base_model import BaseModel, cache_dir, describe
from .engine import Engine, EngineConfig, RequestError
from .metrics import Metrics
from .sequence import SamplingParams, StepOutput

BASE_MODEL_ID = "base"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # protocol-2+ pickles, torch.save zip archives


@dataclass
class ServiceConfig:
    adapter_dir: Path | None = None
    max_lora_rank: int = 64
    max_adapter_bytes: int = 512 << 20
    max_host_adapters: int = 64
    default_max_tokens: int = 256
    max_waiting: int = 512  # requests waiting for admission beyond which new ones are refused


class ModelNotFound(LookupError):
    pass


class QueueFull(RuntimeError):
    """The engine already has `max_waiting` requests waiting for admission (HTTP 429)."""


class Service:
    def __init__(self, base: BaseModel, engine_config: EngineConfig | None = None,
                 config: ServiceConfig | None = None):
        self.base = base
        self.config = config = config or ServiceConfig()
        store = AdapterStore(config.adapter_dir or cache_dir() / "adapters")
        shape = BaseShape(base.num_layers, base.projection_shapes)
        self.registry = AdapterRegistry(store, shape, max_rank=config.max_lora_rank,
                                        max_bytes=config.max_adapter_bytes, max_host_adapters=config.max_host_adapters)
        self.engine = Engine(base, engine_config)
        self.metrics = Metrics(self.engine.stats)
        self.engine.on_finish = self.metrics.on_finish  # the engine's one metrics hook

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    # -- requests ---------------------------------------------------------------------------
    async def resolve(self, model: str) -> AdapterRef | None:
        if model in (BASE_MODEL_ID, self.base.name):
            return None
        try:
            return await asyncio.to_thread(self._resolve_and_prepare, model)
        except AdapterError as e:
            if e.status == 404:
                raise ModelNotFound(f"model {model!r} not found: use {BASE_MODEL_ID!r} or an uploaded adapter id")
            raise

    def _resolve_and_prepare(self, model: str) -> AdapterRef:
        ref = self.registry.resolve(model)
        self.engine.prepare_adapter(ref)  # pack for loading here, not on the engine thread
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

    def check_capacity(self) -> None:
        waiting = self.engine.stats()["waiting"]
        if waiting >= self.config.max_waiting:
            raise QueueFull(f"the engine queue is full ({waiting} requests waiting); retry later")

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       adapter: AdapterRef | None) -> AsyncIterator[StepOutput]:
        """Engine outputs for one request; closing the iterator early (client gone) aborts it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        request_id = self.engine.submit(prompt_ids, params, adapter,
                                        lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(request_id)

    # -- adapters ---------------------------------------------------------------------------
    async def upload_adapter(self, adapter_id: str, config_raw: bytes, weights_raw: bytes) -> StoredAdapter:
        if weights_raw.startswith(_PICKLE_MAGIC):
            raise AdapterError("the weights look like a pickle (.bin/.pt): loraplex never unpickles; "
                               "upload adapter_model.safetensors", 400)
        try:
            record = await asyncio.to_thread(self.registry.upload, adapter_id, config_raw, weights_raw)
        except AdapterError:
            self.metrics.uploads.labels("rejected").inc()
            raise
        self.metrics.uploads.labels("ok").inc()
        return record

    def models(self) -> list[dict]:
        base = {"id": BASE_MODEL_ID, "object": "model", "owned_by": "loraplex", "root": self.base.name}
        return [base] + [{"id": a.id, "object": "model", "owned_by": "loraplex", "root": self.base.name,
                          "parent": BASE_MODEL_ID, "version": a.version} for a in self.registry.list()]

    def health(self) -> dict:
        return {"status": "ok", "model": describe(self.base), **self.engine.stats()}


def adapter_json(a: StoredAdapter) -> dict:
    return {"id": a.id, "object": "adapter", "version": a.version, "peft_type": a.peft_type, "rank": a.rank,
            "size_bytes": a.size_bytes, "created": int(a.created)}
