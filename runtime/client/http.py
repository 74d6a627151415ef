"""A small HTTP client of a running loraplex server (used by `loraplex adapters ...`)."""
from __future__ import annotations

import logging
from pathlib import Path

import httpx

from loraplex.runtime.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

DEFAULT_URL = "http://127.0.0.1:8000"


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
        with open(config, "rb") as cfg, open(weights, "rb") as w:
            files = {"config": (CONFIG_FILE, cfg, "application/json"),
                     "weights": (WEIGHTS_FILE, w, "application/octet-stream")}
            return self._check(self._send("POST", "/v1/adapters", data={"id": adapter_id}, files=files))

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
