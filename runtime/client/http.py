"""A small HTTP client of a running loraplex server (used by `loraplex adapters ...`)."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator

import httpx

from loraplex.runtime.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD_PIECE_BYTES = 1 << 20  # the weights go out in pieces of this size (httpx sends a file part in 64 KiB ones:
                              # every piece costs both ends a pass through their Python code, which capped an
                              # upload near 450-650 MB/s on a 2-core VM where 1 MiB pieces reach ~2 GB/s)


class ClientError(RuntimeError):
    pass


def quiet_transport_logs(verbose: bool = False) -> None:
    """Client commands print their answer, not httpx's INFO line per request (shown with verbose)."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def adapter_files(directory: str | Path) -> tuple[Path, Path]:
    """The config and weights files of a PEFT adapter directory, or a ClientError saying what is missing."""
    d = Path(directory)
    if not d.exists():
        raise ClientError(f"{d}: no such folder (give the PEFT adapter's directory: {CONFIG_FILE} + {WEIGHTS_FILE})")
    if not d.is_dir():
        raise ClientError(f"{d}: not a folder (give the PEFT adapter's directory: {CONFIG_FILE} + {WEIGHTS_FILE})")
    if not (d / WEIGHTS_FILE).exists():
        raise ClientError(f"{d}: no {WEIGHTS_FILE} (only safetensors adapters are accepted)")
    if not (d / CONFIG_FILE).exists():
        raise ClientError(f"{d}: no {CONFIG_FILE}")
    return d / CONFIG_FILE, d / WEIGHTS_FILE


def upload_form(adapter_id: str, config: bytes, weights: BinaryIO, size: int) -> tuple[dict, Iterator[bytes]]:
    """The headers and body of `POST /v1/adapters` (multipart: id, config, weights): `size` bytes of weights read
    from `weights` as they are sent, with a Content-Length so the server knows the upload's size up front."""
    boundary = secrets.token_hex(16).encode()
    while boundary in config or boundary in adapter_id.encode():
        boundary = secrets.token_hex(16).encode()

    def part(name: str, filename: str | None = None, content_type: str | None = None) -> bytes:
        head = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"'
        if filename:
            head += b'; filename="' + filename.encode() + b'"'
        if content_type:
            head += b"\r\nContent-Type: " + content_type.encode()
        return head + b"\r\n\r\n"

    head = (part("id") + adapter_id.encode() + b"\r\n" + part("config", CONFIG_FILE, "application/json") + config +
            b"\r\n" + part("weights", WEIGHTS_FILE, "application/octet-stream"))
    tail = b"\r\n--" + boundary + b"--\r\n"

    def body() -> Iterator[bytes]:
        yield head
        left = size
        while left:
            piece = weights.read(min(UPLOAD_PIECE_BYTES, left))
            if not piece:
                raise ClientError(f"{WEIGHTS_FILE} shrank while it was sent")
            left -= len(piece)
            yield piece
        yield tail

    headers = {"Content-Type": "multipart/form-data; boundary=" + boundary.decode(),
               "Content-Length": str(len(head) + size + len(tail))}
    return headers, body()


class HttpClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 300.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ClientError(f"cannot reach the server at {self.http.base_url}: {e or type(e).__name__}") from None

    def _check(self, r: httpx.Response) -> dict:
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text
            raise ClientError(f"HTTP {r.status_code}: {message}")
        return r.json()

    def upload_adapter(self, directory: str | Path, adapter_id: str) -> dict:
        config, weights = adapter_files(directory)
        with open(weights, "rb") as w:
            headers, body = upload_form(adapter_id, config.read_bytes(), w, os.fstat(w.fileno()).st_size)
            return self._check(self._send("POST", "/v1/adapters", headers=headers, content=body))

    def list_adapters(self) -> list[dict]:
        return self._check(self._send("GET", "/v1/adapters"))["data"]

    def delete_adapter(self, adapter_id: str) -> dict:
        return self._check(self._send("DELETE", f"/v1/adapters/{adapter_id}"))

    def complete(self, model: str, prompt: str, **params) -> dict:
        return self._check(self._send("POST", "/v1/completions", json={"model": model, "prompt": prompt, **params}))

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        return self._check(self._send("POST", "/v1/chat/completions", json={"model": model, "messages": messages, **params}))

    def health(self) -> dict:
        return self._check(self._send("GET", "/health"))
