"""The body of `POST /v1/adapters`, read as it streams in: a multipart form with the fields `id` (text),
`config` (adapter_config.json) and `weights` (adapter_model.safetensors), each given once, in any order;
any other field is refused by name.

The weights part goes straight into the Service's IncomingWeights (memory, the store's temporary directory
and the digest, adapters/incoming.py): no spooled copy, and a refusal — the id, a pickle, a bad
safetensors header, the size limit — comes as soon as the bytes that earn it are in, not after the body.
Once their safetensors header is in, the rest of the weights pass the multipart reader unsearched
(multipart_reader.py). Starlette's form parser spooled a file part to a temporary file through one
worker-thread hop per chunk, then the route read it back whole. Transport only: what the fields must hold
is the Service's to check.
"""
from __future__ import annotations

from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from .adapters.incoming import IncomingWeights
from .adapters.peft_format import MAX_CONFIG_BYTES, CONFIG_FILE, WEIGHTS_FILE
from .multipart_reader import MultipartError, MultipartReader
from .service import Service
from .service_errors import ServiceError
from .tenants import Tenant

FIELDS = ("id", "config", "weights")
MAX_ID_BYTES = 1024  # far above any valid id: a longer one is refused by name, unread
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class UploadForm:
    """One upload's form while it is read; `incoming` holds the weights once their part has begun."""

    def __init__(self, service: Service, tenant: Tenant, request: Request):
        self.service = service
        self.tenant = tenant
        self.request = request
        self.values: dict[str, bytearray] = {}  # id and config as they arrive
        self.done: set[str] = set()  # fields whose part has ended
        self.incoming: IncomingWeights | None = None
        self._part: str | None = None  # field of the part being read
        self._reader: MultipartReader | None = None

    async def read(self) -> tuple[str, bytes]:
        """Read the whole body; returns the id and the config (the weights are in `incoming`). Raises ServiceError
        or AdapterError; the caller discards `incoming` then."""
        content_type, options = parse_options_header(self.request.headers.get("content-type", ""))
        if content_type != b"multipart/form-data" or not options.get(b"boundary"):
            raise ServiceError("the body must be multipart/form-data with the fields id, config and weights")
        try:
            self._reader = MultipartReader(options[b"boundary"])
            async for chunk in self.request.stream():
                for event in self._reader.feed(chunk):
                    if event[0] == "data":
                        await self._part_data(event[1])
                    elif event[0] == "part":
                        self._begin_part(event[1])
                    else:
                        self._end_part()
            self._reader.finish()
        except MultipartError as e:
            if self._part == "weights" and self._reader.data_ahead:
                raise ServiceError(f"{WEIGHTS_FILE} is truncated: its safetensors header describes "
                                   f"{self.incoming.expected_size} bytes, the body ended after {self.incoming.size}",
                                   400, "adapter_error") from None
            raise ServiceError(f"malformed multipart body: {e}") from None
        except ClientDisconnect:
            raise ServiceError("the client disconnected", 499, "client_closed_request") from None
        for name in FIELDS:
            if name not in self.done:
                raise ServiceError(f"{name}: Field required")
        return self._text_id(), bytes(self.values["config"])

    def _begin_part(self, headers: dict[bytes, bytes]) -> None:
        disposition = headers.get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in FIELDS:  # never silently ignored
            raise ServiceError(f"{name or '(unnamed)'}: unknown form field of an adapter upload; the fields are "
                               f"{', '.join(FIELDS)}")
        self._part = name
        if name in self.done or name in self.values or (name == "weights" and self.incoming is not None):
            raise ServiceError(f"{name}: give it once")
        if name == "weights":
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            if filename.lower().endswith(PICKLE_SUFFIXES):
                raise ServiceError(f"{filename}: pickle formats are refused (loraplex never unpickles); "
                                   "upload adapter_model.safetensors", 400, "adapter_error")
            length = self.request.headers.get("content-length", "")
            self.incoming = self.service.open_upload(int(length) if length.isdigit() else None)
        else:
            self.values[name] = bytearray()

    async def _part_data(self, data: memoryview) -> None:
        if self._part == "weights":
            await self.incoming.write(data)
            if not self._reader.data_ahead and self.incoming.expected_size is not None:  # the rest: unsearched
                self._reader.data_ahead = max(self.incoming.expected_size - self.incoming.size, 0)
        elif self._part is not None:
            value = self.values[self._part]
            value += data
            if self._part == "id" and len(value) > MAX_ID_BYTES:
                raise ServiceError(f"id: invalid adapter id of more than {MAX_ID_BYTES} bytes")
            if self._part == "config" and len(value) > MAX_CONFIG_BYTES:
                raise ServiceError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes", 413, "adapter_error")

    def _end_part(self) -> None:
        if self._part is None:
            return
        self.done.add(self._part)
        if self._part == "id":  # refuse a bad id, or a tenant at its limit, before megabytes of weights
            self.service.check_upload_id(self.tenant, self._text_id())
        self._part = None

    def _text_id(self) -> str:
        try:
            return self.values["id"].decode("utf-8")
        except UnicodeDecodeError:
            raise ServiceError("id: invalid adapter id (not UTF-8)") from None
