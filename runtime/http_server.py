"""The HTTP API (FastAPI): OpenAI-compatible completions and chat, adapters, health and metrics.

Every error is JSON in the OpenAI shape `{"error": {"message", "type", "code"}}`: validation
errors are 400 (never FastAPI's 422 `{"detail"}`), unknown routes 404, wrong methods 405, and an
unexpected exception a JSON 500.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import openai_schemas as oa
from .adapters.peft_format import AdapterError
from .choices import Choice, Choices
from .engine import RequestError
from .adapter_admin import adapter_json
from .service import MAX_PAGE, Service
from .service_errors import ServiceError, error_of
from .tenants import Tenant
from .upload_form import UploadForm

log = logging.getLogger("loraplex.http")
OPEN_PATHS = ("/health", "/metrics")  # probes: no key needed
UPLOAD_PATH = "/v1/adapters"
UPLOAD_FORM_SLACK = 1 << 20  # the config file and the multipart framing around the weights
HTTP_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
              429: "rate_limit_error", 503: "unavailable_error"}


def error(status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind or HTTP_KINDS.get(status, "server_error"),
                                   "code": status}}, status_code=status, headers=headers)


def service_error_response(e: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return error(e.status, e.message, e.kind, headers)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_error(e: Exception) -> str:
    known = error_of(e)
    status, message, kind = (known.status, known.message, known.kind) if known else (500, "internal error", "server_error")
    return sse({"error": {"message": message, "type": kind, "code": status}})


def validation_message(e: RequestValidationError) -> str:
    """One line per problem, `field: message`; union branches (`str`, `list[int]`) left out of the path."""
    problems = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"] if p != "body" and "[" not in str(p)]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unsupported field (refused, not ignored)"
        problem = f"{'.'.join(loc)}: {message}" if loc else message
        if problem not in problems:
            problems.append(problem)
    return "; ".join(problems)


class AdmissionMiddleware:
    """Before any route runs: the caller's tenant from its key (on /v1/ paths) and the body-size
    limit, checked on Content-Length before the body is read, and again while it streams in."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    def limit(self, path: str) -> int:
        config = self.service.config
        return config.max_adapter_bytes + UPLOAD_FORM_SLACK if path == UPLOAD_PATH else config.max_body_bytes

    async def __call__(self, scope, receive, plain_send):
        if scope["type"] != "http":
            return await self.app(scope, receive, plain_send)

        async def send(message):  # every refusal, whoever answers it, counted once here
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.service.metrics.rejected(message["status"], "http")
            await plain_send(message)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/v1/"):
            try:
                scope.setdefault("state", {})["tenant"] = self.service.authenticate(headers.get("authorization"))
            except ServiceError as e:
                return await service_error_response(e)(scope, receive, send)
        limit = self.limit(path)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await error(413, f"the request body is {length} bytes, above the limit of {limit}")(scope, receive, send)
        received, refused = 0, False

        async def counted_receive():
            # A body without Content-Length (chunked) is counted as it arrives; past the limit the
            # client gets its 413 now and the route sees a disconnect (its answer is dropped).
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await error(413, f"the request body is above the limit of {limit} bytes")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)
        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise


class CatchAllMiddleware:
    """An exception no handler took becomes a JSON 500 here, and is not re-raised: re-raised, it reaches
    the server, which may then reset the keep-alive connection the answer went out on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            known = error_of(e)
            if known is None:
                log.exception("unexpected error")
            if started:  # the status line is out: nothing better to do than end the response
                return
            response = service_error_response(known) if known else error(
                500, f"internal error ({type(e).__name__}); the server logged the details", "server_error")
            await response(scope, receive, send)


# `"stream": true` answers with server-sent events: documented beside the JSON answer (OpenAPI)
STREAMED = {200: {"content": {"text/event-stream": {}},
                  "description": "JSON, or server-sent events when the request sets stream"}}


def tenant_of(request: Request) -> Tenant:
    return request.state.tenant


def paging(request: Request) -> tuple[int | None, str | None]:
    """`?limit=&after=` of a list route: limit an integer from 1 to MAX_PAGE (absent: the whole list), after an
    id (absent: from the start). Anything else is a 400 naming the field."""
    query = request.query_params
    limit, after = query.get("limit"), query.get("after")
    for name in ("limit", "after"):
        if len(query.getlist(name)) > 1:
            raise ServiceError(f"{name}: give it once")
    if limit is not None:
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_PAGE):
            raise ServiceError(f"limit: must be an integer from 1 to {MAX_PAGE}, got {limit[:40]!r}")
        limit = int(limit)
    if after is not None and not 1 <= len(after) <= 256:
        raise ServiceError("after: must be an id (1 to 256 characters)")
    return limit, after


def page_json(data: list[dict], has_more: bool) -> dict:
    """A list in the OpenAI shape, with the cursor fields of its paged lists."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(choices: Choices, request: Request) -> list[Choice]:
    """Every choice of a non-streamed request; a client that disconnects first aborts them in the engine."""
    async with aclosing(choices):
        work = asyncio.ensure_future(choices.collect())
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # the client left: aclosing aborts the engine request
                await asyncio.gather(work, return_exceptions=True)  # until the cancellation has landed
        if work.cancelled():
            raise ServiceError("the client disconnected", 499, "client_closed_request")
        return work.result()


# POST /v1/adapters reads its multipart body itself (upload_form.py); its documented form is this one
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["id", "config", "weights"], "properties": {
        "id": {"type": "string", "title": "Id"},
        "config": {"type": "string", "contentMediaType": "application/octet-stream", "title": "Config"},
        "weights": {"type": "string", "contentMediaType": "application/octet-stream", "title": "Weights"}}}}}}}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="loraplex", version="0.1.0")
    app.state.service = service
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(AdmissionMiddleware, service=service)  # outermost: refuses before anything is read

    @app.exception_handler(ServiceError)
    async def _service_error(_, e: ServiceError):
        return service_error_response(e)

    @app.exception_handler(AdapterError)
    @app.exception_handler(RequestError)
    async def _known_error(_, e: Exception):
        return service_error_response(error_of(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return error(400, validation_message(e))

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(token_id: int) -> str:
        return service.base.tokenizer.decode([token_id])

    async def open_choices(request: Request, req: oa.SamplingFields, encode) -> Choices:
        params = req.sampling_params(service.config.default_max_tokens)
        mix = [(a.id, a.weight) for a in req.adapters] if req.adapters else None
        return await Choices.open(service, tenant_of(request), req.model, encode, params, req.n, mix)

    def stream(choices: Choices, events) -> StreamingResponse:
        async def guarded():
            async with aclosing(choices):  # also when the client leaves mid-stream
                try:
                    async for event in events():
                        yield event
                except Exception as e:  # headers are sent: report in-band, then end the stream
                    if error_of(e) is None:
                        log.exception("unexpected error while streaming")
                    yield sse_error(e)
            yield sse("[DONE]")
        return StreamingResponse(guarded(), media_type="text/event-stream")

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(request: Request, req: oa.CompletionRequest):
        choices = await open_choices(request, req, lambda: service.encode_prompt(req.prompt))
        rid = oa.new_id("cmpl")
        wants_logprobs = req.logprobs is not None
        if not req.stream:
            prefix = req.prompt if req.echo and isinstance(req.prompt, str) else ""
            return oa.completion_response(rid, req.model, await collect(choices, request), token_text,
                                          wants_logprobs, prefix)

        async def events():
            offsets, lasts = [0] * req.n, {}
            async for index, out in choices.outputs():
                if out.text or out.finished or out.logprobs:
                    logprobs = None
                    if wants_logprobs:
                        logprobs = oa.completion_logprobs(out.logprobs or [], token_text, offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    yield sse(oa.completion_chunk(rid, req.model, index, out, logprobs))
                if out.finished:
                    lasts[index] = out
            if req.include_usage:
                yield sse(oa.usage_chunk(rid, req.model, "text_completion", list(lasts.values())))
        return stream(choices, events)

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat(request: Request, req: oa.ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        choices = await open_choices(request, req, lambda: service.encode_chat(messages))
        rid = oa.new_id("chatcmpl")
        wants_logprobs = bool(req.logprobs)
        if not req.stream:
            return oa.chat_response(rid, req.model, await collect(choices, request), token_text, wants_logprobs)

        async def events():
            for index in range(req.n):
                yield sse(oa.chat_chunk(rid, req.model, index, {"role": "assistant", "content": ""}))
            lasts = {}
            async for index, out in choices.outputs():
                # a token's logprobs travel with the chunk of its text (or alone while its text is held back)
                if out.text or (wants_logprobs and out.logprobs):
                    logprobs = oa.chat_logprobs(out.logprobs or [], token_text) if wants_logprobs else None
                    yield sse(oa.chat_chunk(rid, req.model, index, {"content": out.text}, logprobs=logprobs))
                if out.finished:
                    lasts[index] = out
                    yield sse(oa.chat_chunk(rid, req.model, index, {}, out.finish_reason))
            if req.include_usage:
                yield sse(oa.usage_chunk(rid, req.model, "chat.completion.chunk", list(lasts.values())))
        return stream(choices, events)

    @app.get("/v1/models")
    async def models(request: Request):
        limit, after = paging(request)
        data, more = await asyncio.to_thread(service.models_page, tenant_of(request), limit, after)
        return page_json(data, more)

    @app.post("/v1/adapters", status_code=201, openapi_extra=UPLOAD_BODY)
    async def upload_adapter(request: Request):
        form = UploadForm(service, tenant_of(request), request)
        try:
            adapter_id, config_raw = await form.read()
        except BaseException:
            await service.refuse_upload(form.incoming)
            raise
        return adapter_json(await service.upload_received(tenant_of(request), adapter_id, config_raw, form.incoming))

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        limit, after = paging(request)
        records, more = await asyncio.to_thread(service.list_adapters_page, tenant_of(request), limit, after)
        return page_json([adapter_json(a) for a in records], more)

    @app.get("/v1/adapters/{adapter_id}")
    async def get_adapter(request: Request, adapter_id: str):
        return adapter_json(service.get_adapter(tenant_of(request), adapter_id))

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(request: Request, adapter_id: str):
        record = service.delete_adapter(tenant_of(request), adapter_id)
        return {**adapter_json(record), "deleted": True}

    @app.get("/health")
    async def health():
        state = service.health()
        return JSONResponse(state, status_code=503) if state["status"] == "error" else state

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
