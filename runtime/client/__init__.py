"""Python clients of a running loraplex server, importable as `loraplex.client`."""
from .grpc import DEFAULT_TARGET, GrpcClient, GrpcError, adapter_dict
from .http import DEFAULT_URL, ClientError, HttpClient

__all__ = ["DEFAULT_TARGET", "DEFAULT_URL", "ClientError", "GrpcClient", "GrpcError", "HttpClient", "adapter_dict"]
