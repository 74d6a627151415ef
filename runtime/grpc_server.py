"""The gRPC API (grpc.aio): completions and chat per adapter, token streaming, adapter upload, health and
reflection. It runs on the HTTP server's event loop and shares its Service (one engine, one store).

A call that is cancelled or runs past its deadline has its handler task cancelled by grpc; the
cancellation lands inside `Service.generate`, whose `finally` aborts the engine request at once.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
from contextlib import aclosing
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.protos.loraplex.v1 import serving_pb2 as pb
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc

from .adapters.peft_format import AdapterError
from .adapters.store import StoredAdapter, check_adapter_id
from .engine import RequestError
from .sequence import SamplingParams, StepOutput
from .service import ModelNotFound, QueueFull, Service

SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Completions", "Adapters")]
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class Rejected(Exception):
    """A call refused with a specific status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, Rejected):
        return e.code, e.message
    if isinstance(e, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, AdapterError):
        code = {404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}.get(
            e.status, grpc.StatusCode.INVALID_ARGUMENT)
        return code, e.message
    return grpc.StatusCode.INVALID_ARGUMENT, str(e)  # RequestError


def rpc_errors(method):
    """End the call with the status code and message of the service's errors."""
    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except (Rejected, ModelNotFound, QueueFull, AdapterError, RequestError) as e:
            await context.abort(*status_of(e))
    return handler


def sampling_params(sampling: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """The HTTP API's defaults and bounds (openai_schemas.SamplingFields)."""
    has = sampling.HasField
    params = SamplingParams(max_tokens=sampling.max_tokens if has("max_tokens") else default_max_tokens,
                            temperature=sampling.temperature if has("temperature") else 1.0,
                            top_p=sampling.top_p if has("top_p") else 1.0, top_k=sampling.top_k,
                            seed=sampling.seed if has("seed") else None, stop=list(sampling.stop),
                            ignore_eos=sampling.ignore_eos)
    if params.max_tokens < 1:
        raise RequestError("max_tokens must be at least 1")
    if not 0.0 <= params.temperature <= 2.0:
        raise RequestError("temperature must lie in [0, 2]")
    if not 0.0 < params.top_p <= 1.0:
        raise RequestError("top_p must lie in (0, 1]")
    if len(params.stop) > 4 or not all(params.stop):
        raise RequestError("stop takes up to 4 non-empty strings")
    return params


def usage(out: StepOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                    total_tokens=out.prompt_tokens + out.completion_tokens)


def completion_chunk(out: StepOutput) -> pb.CompletionChunk:
    chunk = pb.CompletionChunk(text=out.text, token_ids=out.token_ids)
    if out.finished:
        chunk.finish_reason = FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        chunk.usage.CopyFrom(usage(out))
    return chunk


def check_engine_error(out: StepOutput) -> None:
    if out.error:
        raise Rejected(grpc.StatusCode.INTERNAL, out.error)


def adapter_message(a: StoredAdapter) -> pb.Adapter:
    return pb.Adapter(id=a.id, version=a.version, peft_type=a.peft_type, rank=a.rank, size_bytes=a.size_bytes,
                      created=int(a.created))


class CompletionsServicer(pb_grpc.CompletionsServicer):
    def __init__(self, service: Service):
        self.service = service

    async def _generate(self, model: str, prompt_ids: list[int], sampling: pb.SamplingParams
                        ) -> AsyncIterator[StepOutput]:
        params = sampling_params(sampling, self.service.config.default_max_tokens)
        adapter = await self.service.resolve(model)
        self.service.engine.check(prompt_ids, params)
        self.service.check_capacity()
        return self.service.generate(prompt_ids, params, adapter)

    def _prompt_ids(self, request: pb.CompletionRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            return self.service.encode_prompt(request.text)
        if which == "token_ids":
            return list(request.token_ids.ids)
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is missing: set text or token_ids")

    def _chat_ids(self, request: pb.ChatRequest) -> list[int]:
        if not request.messages:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "messages is empty")
        for m in request.messages:
            if m.role not in CHAT_ROLES:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                               f"unknown role {m.role!r}: use one of {', '.join(sorted(CHAT_ROLES))}")
        return self.service.encode_chat([{"role": m.role, "content": m.content} for m in request.messages])

    @staticmethod
    async def _collect(outputs: AsyncIterator[StepOutput]) -> pb.Completion:
        text, token_ids, last = [], [], None
        async with aclosing(outputs):
            async for out in outputs:
                check_engine_error(out)
                text.append(out.text)
                token_ids += out.token_ids
                last = out
        return pb.Completion(text="".join(text), token_ids=token_ids,
                             finish_reason=FINISH_REASONS.get(last.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                             usage=usage(last))

    @staticmethod
    async def _stream(outputs: AsyncIterator[StepOutput], context: grpc.aio.ServicerContext) -> None:
        # context.write rather than an async-generator handler: a cancellation then always lands in
        # this coroutine, and aclosing closes the engine stream right here.
        async with aclosing(outputs):
            async for out in outputs:
                check_engine_error(out)
                await context.write(completion_chunk(out))

    @rpc_errors
    async def Complete(self, request, context):
        return await self._collect(await self._generate(request.model, self._prompt_ids(request), request.sampling))

    @rpc_errors
    async def CompleteStream(self, request, context):
        await self._stream(await self._generate(request.model, self._prompt_ids(request), request.sampling), context)

    @rpc_errors
    async def Chat(self, request, context):
        return await self._collect(await self._generate(request.model, self._chat_ids(request), request.sampling))

    @rpc_errors
    async def ChatStream(self, request, context):
        await self._stream(await self._generate(request.model, self._chat_ids(request), request.sampling), context)


async def receive_weights(chunks: AsyncIterator[pb.UploadAdapterRequest], size: int, sha256: str) -> bytes:
    """The weight bytes that follow the metadata, exactly `size` of them, with the declared digest."""
    data, digest = bytearray(), hashlib.sha256()
    async for message in chunks:
        if message.WhichOneof("part") != "chunk":
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "only the first message may carry metadata")
        if len(data) + len(message.chunk) > size:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"the upload sent more than the declared {size} bytes")
        data += message.chunk
        digest.update(message.chunk)
    if len(data) < size:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                       f"truncated upload: received {len(data)} of the declared {size} bytes")
    if digest.hexdigest() != sha256.lower():
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                       f"sha256 mismatch: received bytes hash to {digest.hexdigest()}, the metadata says {sha256}")
    return bytes(data)


class AdaptersServicer(pb_grpc.AdaptersServicer):
    def __init__(self, service: Service):
        self.service = service

    @rpc_errors
    async def UploadAdapter(self, request_iterator, context):
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the metadata")
        meta = first.metadata
        check_adapter_id(meta.id)  # before receiving megabytes for an id that will be refused
        limit = self.service.config.max_adapter_bytes
        if meta.size_bytes > limit:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"adapter weights are {meta.size_bytes} bytes, above the limit of {limit}")
        if not meta.sha256:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the metadata needs the sha256 of the weights")
        weights = await receive_weights(messages, meta.size_bytes, meta.sha256)
        return adapter_message(await self.service.upload_adapter(meta.id, meta.config_json, weights))

    @rpc_errors
    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[adapter_message(a) for a in self.service.registry.list()])

    @rpc_errors
    async def GetAdapter(self, request, context):
        return adapter_message(self.service.registry.get(request.id))

    @rpc_errors
    async def DeleteAdapter(self, request, context):
        return adapter_message(self.service.registry.delete(request.id))


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checks needs the metadata `authorization: Bearer KEY`."""

    def __init__(self, api_key: str):
        self.expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(f"/{health.SERVICE_NAME}/"):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization")
        if given is None:
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED,
                             "missing API key: send the metadata 'authorization: Bearer KEY'")
        if not hmac.compare_digest(given.encode(), self.expected):
            return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED, "invalid API key")
        return handler


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends every call with `code`."""
    async def refuse(request, context):
        await context.abort(code, message)
    make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(service: Service, host: str, port: int, api_key: str | None = None) -> grpc.aio.Server:
    """Serve the gRPC API on the running event loop; health reports SERVING once it listens."""
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(api_key)] if api_key else None)
    pb_grpc.add_CompletionsServicer_to_server(CompletionsServicer(service), server)
    pb_grpc.add_AdaptersServicer_to_server(AdaptersServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    server.add_insecure_port(address(host, port))
    await server.start()
    for name in ["", *SERVICE_NAMES]:  # "": the whole server; the model was loaded before we got here
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server
