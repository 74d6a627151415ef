"""A gRPC client of a running loraplex server: completions, chat (unary or streamed) and adapters.

Answers are the protobuf messages of `loraplex.v1` (see protos/loraplex/v1/serving.proto); sampling
fields are keyword arguments (`max_tokens=16, temperature=0, stop=["\\n"]`, ...); a per-request mix is
`adapters={"a": 0.7, "b": 0.3}` with model "base".
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.protos.loraplex.v1 import serving_pb2 as pb
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc

from .http import ClientError, adapter_files

DEFAULT_TARGET = "127.0.0.1:50051"
UPLOAD_CHUNK_BYTES = 1 << 20  # a message per MiB of weights: every message costs both ends a pass through Python


class GrpcError(ClientError):
    """A call that ended with a status other than OK; `code` is the grpc.StatusCode."""

    def __init__(self, error: grpc.RpcError):
        super().__init__(f"gRPC {error.code().name}: {error.details()}")
        self.code = error.code()
        self.details = error.details()


def adapter_weights(adapters: dict[str, float] | None) -> list[pb.AdapterWeight]:
    """A per-request mix, {adapter id: weight}, as the requests' `adapters` field."""
    return [pb.AdapterWeight(id=adapter_id, weight=weight) for adapter_id, weight in (adapters or {}).items()]


def completion_request(model: str, prompt: str | list[int], adapters: dict[str, float] | None = None,
                       **sampling) -> pb.CompletionRequest:
    request = pb.CompletionRequest(model=model, sampling=pb.SamplingParams(**sampling),
                                   adapters=adapter_weights(adapters))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def chat_request(model: str, messages: list[dict], adapters: dict[str, float] | None = None,
                 **sampling) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                          sampling=pb.SamplingParams(**sampling), adapters=adapter_weights(adapters))


def upload_requests(directory: str | Path, adapter_id: str,
                    chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> Iterator[pb.UploadAdapterRequest]:
    """The UploadAdapter stream of a PEFT adapter directory: metadata, then the weights in chunks."""
    config, weights = adapter_files(directory)  # checked here: an error raised while grpc reads the stream only cancels the call
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    metadata = pb.UploadAdapterMetadata(id=adapter_id, config_json=config.read_bytes(),
                                        size_bytes=weights.stat().st_size, sha256=digest.hexdigest())

    def stream():
        yield pb.UploadAdapterRequest(metadata=metadata)
        with open(weights, "rb") as f:
            while chunk := f.read(chunk_bytes):
                yield pb.UploadAdapterRequest(chunk=chunk)
    return stream()


def adapter_dict(a: pb.Adapter) -> dict:
    """The HTTP API's JSON for an adapter."""
    return {"id": a.id, "object": "adapter", "version": a.version, "peft_type": a.peft_type, "rank": a.rank,
            "size_bytes": a.size_bytes, "created": a.created}


class GrpcClient:
    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, timeout: float = 300.0):
        self.channel = grpc.insecure_channel(target)
        self.completions = pb_grpc.CompletionsStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise GrpcError(e) from None

    def _stream(self, method, request, timeout: float | None = None) -> Iterator[pb.CompletionChunk]:
        """The chunks of a streaming call; closing the iterator early cancels the call."""
        call = method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise GrpcError(e) from None
        finally:
            call.cancel()  # no-op once the call has finished

    def complete(self, model: str, prompt: str | list[int], timeout: float | None = None, **sampling) -> pb.Completion:
        return self._call(self.completions.Complete, completion_request(model, prompt, **sampling), timeout)

    def complete_stream(self, model: str, prompt: str | list[int], timeout: float | None = None,
                        **sampling) -> Iterator[pb.CompletionChunk]:
        return self._stream(self.completions.CompleteStream, completion_request(model, prompt, **sampling), timeout)

    def chat(self, model: str, messages: list[dict], timeout: float | None = None, **sampling) -> pb.Completion:
        return self._call(self.completions.Chat, chat_request(model, messages, **sampling), timeout)

    def chat_stream(self, model: str, messages: list[dict], timeout: float | None = None,
                    **sampling) -> Iterator[pb.CompletionChunk]:
        return self._stream(self.completions.ChatStream, chat_request(model, messages, **sampling), timeout)

    def upload_adapter(self, directory: str | Path, adapter_id: str,
                       chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> pb.Adapter:
        return self._call(self.adapters.UploadAdapter, upload_requests(directory, adapter_id, chunk_bytes))

    def list_adapters(self) -> list[pb.Adapter]:
        return list(self._call(self.adapters.ListAdapters, pb.ListAdaptersRequest()).adapters)

    def list_adapters_page(self, limit: int, after: str | None = None) -> pb.ListAdaptersResponse:
        """Up to `limit` adapters whose ids follow `after`, with has_more, first_id and last_id."""
        return self._call(self.adapters.ListAdapters, pb.ListAdaptersRequest(limit=limit, after=after))

    def get_adapter(self, adapter_id: str) -> pb.Adapter:
        return self._call(self.adapters.GetAdapter, pb.GetAdapterRequest(id=adapter_id))

    def delete_adapter(self, adapter_id: str) -> pb.Adapter:
        return self._call(self.adapters.DeleteAdapter, pb.DeleteAdapterRequest(id=adapter_id))

    def health(self, service: str = "") -> str:
        """The health service's status name ("SERVING", ...) of the server or of one service."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
