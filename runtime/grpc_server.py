"""The gRPC API (grpc.aio): completions and chat per adapter, token streaming, adapter upload, health and
reflection. It runs on the HTTP server's event loop and shares its Service (one engine, one store,
one admission path: `Service.open_request`).

A call that is cancelled or runs past its deadline has its handler task cancelled by grpc; the
cancellation lands inside `aclosing(generation)`, which aborts the engine request at once.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import aclosing
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.protos.loraplex.v1 import serving_pb2 as pb
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc

from .adapters.incoming import IncomingWeights
from .adapters.store import StoredAdapter
from .choices import MAX_N, Choice, Choices
from .engine import RequestError
from .openai_schemas import response_format_from_json
from .sequence import SamplingParams, StepOutput, TokenLogprob
from .service import MAX_PAGE, Service
from .service_errors import error_of
from .tenants import Tenant

SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Completions", "Adapters")]
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
              413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
              429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
              500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
log = logging.getLogger("loraplex.grpc")


class Rejected(Exception):
    """A call refused with a specific status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, Rejected):
        return e.code, e.message
    known = error_of(e)
    if known is None:
        log.error("unexpected error in a gRPC call", exc_info=e)
        return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); the server logged the details"
    return GRPC_CODES.get(known.status, grpc.StatusCode.INVALID_ARGUMENT), known.message


def rpc(method):
    """Authenticate the caller (metadata `authorization: Bearer KEY`), pass its Tenant to `method`, and end
    the call with a status code and message for every error, an unexpected one included (INTERNAL)."""
    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            metadata = dict(context.invocation_metadata() or ())
            tenant = self.service.authenticate(metadata.get("authorization"))
            return await method(self, request, context, tenant)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            known = error_of(e)
            if known is not None and known.retry_after is not None:
                context.set_trailing_metadata((("retry-after", str(known.retry_after)),))
            code, message = status_of(e)
            self.service.metrics.rejected(code.name, "grpc")
            await context.abort(code, message)
    return handler


def sampling_params(sampling: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """The HTTP API's defaults and bounds (openai_schemas.SamplingFields)."""
    has = sampling.HasField
    params = SamplingParams(max_tokens=sampling.max_tokens if has("max_tokens") else default_max_tokens,
                            temperature=sampling.temperature if has("temperature") else 1.0,
                            top_p=sampling.top_p if has("top_p") else 1.0, top_k=sampling.top_k,
                            seed=sampling.seed if has("seed") else None, stop=list(sampling.stop),
                            ignore_eos=sampling.ignore_eos, presence_penalty=sampling.presence_penalty,
                            frequency_penalty=sampling.frequency_penalty,
                            repetition_penalty=sampling.repetition_penalty if has("repetition_penalty") else 1.0,
                            logit_bias=dict(sampling.logit_bias), min_tokens=sampling.min_tokens,
                            stop_token_ids=list(sampling.stop_token_ids),
                            logprobs=sampling.logprobs if has("logprobs") else None)
    if sampling.response_format_json:
        try:
            params.response_format = response_format_from_json(sampling.response_format_json)
        except ValueError as e:
            raise RequestError(str(e)) from None
    if params.max_tokens < 1:
        raise RequestError("max_tokens must be at least 1")
    if not 0.0 <= params.temperature <= 2.0:
        raise RequestError("temperature must lie in [0, 2]")
    if not 0.0 < params.top_p <= 1.0:
        raise RequestError("top_p must lie in (0, 1]")
    if len(params.stop) > 4 or not all(params.stop):
        raise RequestError("stop takes up to 4 non-empty strings")
    return params


def choice_count(sampling: pb.SamplingParams) -> int:
    n = sampling.n if sampling.HasField("n") else 1
    if not 1 <= n <= MAX_N:
        raise RequestError(f"n must lie in [1, {MAX_N}], got {n}")
    return n


def usage(*outs: StepOutput) -> pb.Usage:
    """The prompt once, the completion tokens of every choice."""
    completion = sum(out.completion_tokens for out in outs)
    return pb.Usage(prompt_tokens=outs[0].prompt_tokens, completion_tokens=completion,
                    total_tokens=outs[0].prompt_tokens + completion)


def logprob_messages(entries: list[TokenLogprob], token_text) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=e.token_id, token=token_text(e.token_id), logprob=e.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t, token=token_text(t), logprob=lp) for t, lp in e.top])
            for e in entries]


def choice_message(c: Choice, token_text) -> pb.Choice:
    return pb.Choice(index=c.index, text=c.text, token_ids=c.token_ids, logprobs=logprob_messages(c.logprobs, token_text),
                     finish_reason=FINISH_REASONS.get(c.last.finish_reason, pb.FINISH_REASON_UNSPECIFIED))


def completion_message(choices: list[Choice], token_text) -> pb.Completion:
    first = choice_message(choices[0], token_text)
    return pb.Completion(text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason,
                         logprobs=first.logprobs, usage=usage(*(c.last for c in choices)),
                         choices=[first] + [choice_message(c, token_text) for c in choices[1:]])


def completion_chunk(index: int, out: StepOutput, token_text) -> pb.CompletionChunk:
    chunk = pb.CompletionChunk(text=out.text, token_ids=out.token_ids, index=index,
                               logprobs=logprob_messages(out.logprobs or [], token_text))
    if out.finished:
        chunk.finish_reason = FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        chunk.usage.CopyFrom(usage(out))
    return chunk


def adapter_message(a: StoredAdapter) -> pb.Adapter:
    return pb.Adapter(id=a.id, version=a.version, peft_type=a.peft_type, rank=a.rank, size_bytes=a.size_bytes,
                      created=int(a.created))


class CompletionsServicer(pb_grpc.CompletionsServicer):
    def __init__(self, service: Service):
        self.service = service
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda t: service.base.tokenizer.decode([t]))

    async def _open(self, tenant: Tenant, request, encode) -> Choices:
        params = sampling_params(request.sampling, self.service.config.default_max_tokens)
        mix = [(a.id, a.weight) for a in request.adapters] or None
        return await Choices.open(self.service, tenant, request.model, encode, params, choice_count(request.sampling),
                                  mix)

    def _prompt(self, request: pb.CompletionRequest):
        which = request.WhichOneof("prompt")
        if which == "text":
            text = request.text
            return lambda: self.service.encode_prompt(text)
        if which == "token_ids":
            ids = list(request.token_ids.ids)
            return lambda: ids
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is missing: set text or token_ids")

    def _chat(self, request: pb.ChatRequest):
        if not request.messages:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "messages is empty")
        for m in request.messages:
            if m.role not in CHAT_ROLES:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                               f"unknown role {m.role!r}: use one of {', '.join(sorted(CHAT_ROLES))}")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        return lambda: self.service.encode_chat(messages)

    async def _collect(self, choices: Choices) -> pb.Completion:
        async with aclosing(choices):
            return completion_message(await choices.collect(), self.token_text)

    async def _stream(self, choices: Choices, context: grpc.aio.ServicerContext) -> None:
        # context.write rather than an async-generator handler: a cancellation then always lands in
        # this coroutine, and aclosing closes the engine streams right here.
        async with aclosing(choices):
            async for index, out in choices.outputs():
                await context.write(completion_chunk(index, out, self.token_text))

    @rpc
    async def Complete(self, request, context, tenant):
        return await self._collect(await self._open(tenant, request, self._prompt(request)))

    @rpc
    async def CompleteStream(self, request, context, tenant):
        await self._stream(await self._open(tenant, request, self._prompt(request)), context)

    @rpc
    async def Chat(self, request, context, tenant):
        return await self._collect(await self._open(tenant, request, self._chat(request)))

    @rpc
    async def ChatStream(self, request, context, tenant):
        await self._stream(await self._open(tenant, request, self._chat(request)), context)


async def receive_weights(chunks: AsyncIterator[pb.UploadAdapterRequest], incoming: IncomingWeights, size: int,
                          sha256: str) -> None:
    """The weight bytes that follow the metadata, into `incoming` as they arrive: exactly `size` of them, with the
    declared digest. A bad header or a pickle is refused at its first chunk."""
    received = 0
    async for message in chunks:
        if message.WhichOneof("part") != "chunk":
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "only the first message may carry metadata")
        if received + len(message.chunk) > size:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"the upload sent more than the declared {size} bytes")
        received += len(message.chunk)
        await incoming.write(message.chunk)
    if received < size:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                       f"truncated upload: received {received} of the declared {size} bytes")
    await incoming.drain()
    if incoming.weights_sha256 != sha256.lower():
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"sha256 mismatch: received bytes hash to "
                       f"{incoming.weights_sha256}, the metadata says {sha256}")


class AdaptersServicer(pb_grpc.AdaptersServicer):
    def __init__(self, service: Service):
        self.service = service

    @rpc
    async def UploadAdapter(self, request_iterator, context, tenant):
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the metadata")
        meta = first.metadata
        self.service.check_upload_id(tenant, meta.id)  # before receiving megabytes for an id that will be refused
        limit = self.service.config.max_adapter_bytes
        if meta.size_bytes > limit:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"adapter weights are {meta.size_bytes} bytes, above the limit of {limit}")
        if not meta.sha256:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the metadata needs the sha256 of the weights")
        incoming = self.service.open_upload(meta.size_bytes, weights_sha256=True)
        try:
            await receive_weights(messages, incoming, meta.size_bytes, meta.sha256)
        except BaseException:
            await self.service.refuse_upload(incoming)
            raise
        return adapter_message(await self.service.upload_received(tenant, meta.id, meta.config_json, incoming))

    @rpc
    async def ListAdapters(self, request, context, tenant):
        limit = request.limit if request.HasField("limit") else None
        after = request.after if request.HasField("after") else None
        if limit is not None and not 1 <= limit <= MAX_PAGE:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"limit: must be an integer from 1 to {MAX_PAGE}, got {limit}")
        if after is not None and not 1 <= len(after) <= 256:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "after: must be an id (1 to 256 characters)")
        records, more = await asyncio.to_thread(self.service.list_adapters_page, tenant, limit, after)
        return pb.ListAdaptersResponse(adapters=[adapter_message(a) for a in records], has_more=more,
                                       first_id=records[0].id if records else "",
                                       last_id=records[-1].id if records else "")

    @rpc
    async def GetAdapter(self, request, context, tenant):
        return adapter_message(self.service.get_adapter(tenant, request.id))

    @rpc
    async def DeleteAdapter(self, request, context, tenant):
        return adapter_message(self.service.delete_adapter(tenant, request.id))


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(service: Service, host: str, port: int) -> grpc.aio.Server:
    """Serve the gRPC API on the running event loop; health reports SERVING once it listens.
    The port is bound without SO_REUSEPORT: a port another server holds is an error, not shared."""
    options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", service.config.max_body_bytes)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_CompletionsServicer_to_server(CompletionsServicer(service), server)
    pb_grpc.add_AdaptersServicer_to_server(AdaptersServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        bound = server.add_insecure_port(address(host, port))
    except RuntimeError as e:
        raise OSError(f"cannot listen for gRPC on {address(host, port)}: {e}") from None
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address(host, port)}: the port is taken")
    await server.start()
    for name in ["", *SERVICE_NAMES]:  # "": the whole server; the model was loaded before we got here
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server
