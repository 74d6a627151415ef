"""In-process servers for the transport tests: a real Service (engine, store, registry) on the tiny
random model, served by uvicorn / grpc.aio on loopback from a background thread."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import uvicorn

from conftest import free_port
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import EngineConfig
from loraplex.runtime.grpc_server import start_grpc_server
from loraplex.runtime.http_server import create_app
from loraplex.runtime.service import Service, ServiceConfig
from loraplex.runtime.tenants import KeyRing


def make_service(model_dir: Path, adapter_dir: Path, keys: KeyRing | None = None, max_num_seqs: int = 8,
                 **limits) -> Service:
    base = load_base_model(str(model_dir), dtype="float32", device="cpu")
    service = Service(base, EngineConfig(kv_cache_tokens=8192, max_num_seqs=max_num_seqs, cuda_graphs=False),
                      ServiceConfig(adapter_dir=adapter_dir, **limits), keys=keys)
    service.start()
    return service


def slow_engine(service: Service, seconds: float) -> None:
    """Each engine step takes at least `seconds`: requests stay in flight long enough to observe."""
    step = service.engine.step

    def slow_step():
        time.sleep(seconds)
        step()
    service.engine.step = slow_step


class LiveServer:
    """uvicorn (HTTP) and grpc.aio on one event loop in a thread, both on loopback."""

    def __init__(self, service: Service):
        self.service = service
        self.port, self.grpc_port = free_port(), free_port()
        self.url, self.grpc_target = f"http://127.0.0.1:{self.port}", f"127.0.0.1:{self.grpc_port}"
        self.http = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port,
                                                  log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.http.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.http.started, "in-process server did not start"

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        grpc_server = await start_grpc_server(self.service, "127.0.0.1", self.grpc_port)
        try:
            await self.http.serve()
        finally:
            await grpc_server.stop(None)

    def stop(self) -> None:
        self.http.should_exit = True
        self.thread.join(15)
        self.service.stop()
