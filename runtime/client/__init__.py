"""Python clients of a running loraplex server, importable as `loraplex.client`."""
from .http import DEFAULT_URL, ClientError, HttpClient

__all__ = ["DEFAULT_URL", "ClientError", "HttpClient"]
