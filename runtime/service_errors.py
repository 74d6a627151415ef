"""The errors a request can end with, as the Service reports them to both transports (HTTP status, gRPC code)."""
from __future__ import annotations

from .adapters.peft_format import AdapterError
from .engine import EngineDead, RequestError


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
