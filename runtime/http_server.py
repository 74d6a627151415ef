"""The HTTP API (FastAPI): OpenAI-compatible completions and chat, adapters, health and metrics."""
from __future__ import annotations

import hmac
import json
from typing import AsyncIterator

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import openai_schemas as oa
from .adapters.peft_format import AdapterError
from .engine import RequestError
from .service import ModelNotFound, QueueFull, Service, adapter_json
from .sequence import StepOutput


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="loraplex", version="0.1.0")
    app.state.service = service

    if api_key:
        expected = f"Bearer {api_key}"

        @app.middleware("http")
        async def _require_key(request: Request, call_next):
            if request.url.path.startswith("/v1/"):  # /health and /metrics stay open for probes
                given = request.headers.get("authorization")
                if given is None:
                    return error(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    return error(403, "invalid API key", "permission_error")
            return await call_next(request)

    @app.exception_handler(AdapterError)
    async def _adapter_error(_, e: AdapterError):
        return error(e.status, e.message, "adapter_error" if e.status != 404 else "not_found_error")

    @app.exception_handler(ModelNotFound)
    async def _not_found(_, e: ModelNotFound):
        return error(404, str(e), "not_found_error")

    @app.exception_handler(QueueFull)
    async def _busy(_, e: QueueFull):
        return error(429, str(e), "rate_limit_error")

    @app.exception_handler(RequestError)
    async def _bad_request(_, e: RequestError):
        return error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return error(422, problems)

    async def run(req: oa.SamplingFields, prompt_ids: list[int]):
        params = req.sampling_params(service.config.default_max_tokens)
        adapter = await service.resolve(req.model)
        service.engine.check(prompt_ids, params)
        service.check_capacity()
        return service.generate(prompt_ids, params, adapter)

    async def collect(outputs: AsyncIterator[StepOutput]) -> tuple[str, StepOutput]:
        text, last = [], None
        async for out in outputs:
            text.append(out.text)
            last = out
        if last.error:
            raise RuntimeError(last.error)
        return "".join(text), last

    @app.post("/v1/completions")
    async def completions(req: oa.CompletionRequest):
        outputs = await run(req, service.encode_prompt(req.prompt))
        rid = oa.new_id("cmpl")
        if not req.stream:
            text, last = await collect(outputs)
            if req.echo and isinstance(req.prompt, str):
                text = req.prompt + text
            return oa.completion_response(rid, req.model, text, last)

        async def events():
            async for out in outputs:
                if out.error:
                    yield sse({"error": {"message": out.error, "type": "server_error", "code": 500}})
                    break
                if out.text or out.finished:
                    yield sse(oa.completion_chunk(rid, req.model, out))
                if out.finished and req.include_usage:
                    yield sse(oa.usage_chunk(rid, req.model, "text_completion", out))
            yield sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: oa.ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        outputs = await run(req, service.encode_chat(messages))
        rid = oa.new_id("chatcmpl")
        if not req.stream:
            text, last = await collect(outputs)
            return oa.chat_response(rid, req.model, text, last)

        async def events():
            yield sse(oa.chat_chunk(rid, req.model, {"role": "assistant", "content": ""}))
            async for out in outputs:
                if out.error:
                    yield sse({"error": {"message": out.error, "type": "server_error", "code": 500}})
                    break
                if out.text:
                    yield sse(oa.chat_chunk(rid, req.model, {"content": out.text}))
                if out.finished:
                    yield sse(oa.chat_chunk(rid, req.model, {}, out.finish_reason))
                    if req.include_usage:
                        yield sse(oa.usage_chunk(rid, req.model, "chat.completion.chunk", out))
            yield sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": service.models()}

    @app.post("/v1/adapters", status_code=201)
    async def upload_adapter(id: str = Form(...), config: UploadFile = File(...), weights: UploadFile = File(...)):
        limit = service.config.max_adapter_bytes
        if weights.size is not None and weights.size > limit:
            raise AdapterError(f"adapter weights are {weights.size} bytes, above the limit of {limit}", 413)
        name = (weights.filename or "").lower()
        if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
            raise AdapterError(f"{weights.filename}: pickle formats are refused (loraplex never unpickles); "
                               "upload adapter_model.safetensors", 400)
        record = await service.upload_adapter(id, await config.read(), await weights.read(limit + 1))
        return adapter_json(record)

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": [adapter_json(a) for a in service.registry.list()]}

    @app.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str):
        return adapter_json(service.registry.get(adapter_id))

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str):
        record = service.registry.delete(adapter_id)
        return {**adapter_json(record), "deleted": True}

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
