"""Ports checked before the model loads (a taken HTTP or gRPC port is an error, never shared), open mode
on loopback only, keys never in the log, and SIGTERM draining: in-flight requests finish, new ones get 503."""
from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import ServerProcess, free_port, sse_events

def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback


EXE = str(Path(sys.executable).parent / "loraplex")


@pytest.mark.parametrize("which", ["--port", "--grpc-port"])
def test_taken_port_fails_fast_before_loading(which, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        other = "--grpc-port" if which == "--port" else "--port"
        started = time.time()
        done = subprocess.run([EXE, "serve", which, str(taken), other, str(free_port()), "--adapter-dir",
                               str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f":{taken}" in done.stderr and "another server" in done.stderr, done.stderr
    assert time.time() - started < 30 and "loading" not in done.stderr  # the model was never loaded


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_unusable_adapter_dir_is_one_line_before_loading(where, tmp_path):
    a_file = tmp_path / "store"
    a_file.write_text("not a directory")
    adapter_dir = a_file if where == "file" else a_file / "adapters"
    done = subprocess.run([EXE, "serve", "--port", str(free_port()), "--grpc-port", "0", "--adapter-dir", str(adapter_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert f"--adapter-dir {adapter_dir}:" in done.stderr and "is a file, not a directory" in done.stderr, done.stderr
    assert "loading" not in done.stderr  # said before the model loads


@pytest.mark.parametrize("grpc", [False, True])
def test_uploading_a_missing_folder_says_it_is_missing(grpc, tmp_path):
    transport = ["--grpc", "--grpc-target", f"127.0.0.1:{free_port()}"] if grpc else ["--url", f"http://127.0.0.1:{free_port()}"]
    done = subprocess.run([EXE, "adapters", "upload", str(tmp_path / "my-adapter"), "--id", "x", *transport],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "my-adapter: no such folder" in done.stderr, done.stderr


def test_grpc_port_is_not_shared(tiny_model_dir, tmp_path):
    """The gRPC server binds without SO_REUSEPORT: a second one on its port refuses to start."""
    first = ServerProcess("--model", str(tiny_model_dir), adapter_dir=tmp_path / "one")
    try:
        done = subprocess.run([EXE, "serve", "--model", str(tiny_model_dir), "--port", str(free_port()),
                               "--grpc-port", str(first.grpc_port), "--adapter-dir", str(tmp_path / "two")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and str(first.grpc_port) in done.stderr, done.stderr
    finally:
        first.stop()


def test_open_mode_binds_loopback_and_keys_stay_out_of_logs(tiny_model_dir, tmp_path):
    server = ServerProcess("--model", str(tiny_model_dir), "--log-level", "info", adapter_dir=tmp_path / "open")
    try:
        addresses = {c.laddr.ip for c in psutil.Process(server.proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert addresses and all(is_loopback(a) for a in addresses), addresses
    finally:
        server.stop()
    assert "open mode" in Path(server.log.name).read_text()

    keys = tmp_path / "keys"
    keys.write_text("admin very-secret-admin-key\nalice alice-secret-key\n")
    server = ServerProcess("--model", str(tiny_model_dir), "--api-keys", str(keys), "--log-level", "debug",
                           adapter_dir=tmp_path / "keyed")
    try:
        for key in ("very-secret-admin-key", "alice-secret-key", "wrong-secret-key"):
            server.client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2},
                               headers={"Authorization": f"Bearer {key}"})
    finally:
        server.stop()
    log = Path(server.log.name).read_text()
    assert "POST /v1/completions" in log  # requests are logged ...
    assert "secret" not in log  # ... their keys are not


def open_stream(server: ServerProcess) -> tuple[threading.Thread, list, threading.Event]:
    """A 400-token stream read in a thread: (the thread, its events so far, set at the first event)."""
    events, started = [], threading.Event()

    def stream():
        body = {"model": "base", "prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            for event in sse_events(r.iter_lines()):
                events.append(event)
                started.set()
    reader = threading.Thread(target=stream)
    reader.start()
    return reader, events, started


def test_sigterm_drains(tiny_model_dir, tmp_path):
    server = ServerProcess("--model", str(tiny_model_dir), "--shutdown-grace", "30", adapter_dir=tmp_path / "a")
    reader, events, started = open_stream(server)
    try:
        assert started.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        deadline, refused = time.time() + 10, None
        while time.time() < deadline and refused is None:
            r = server.client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
            if r.status_code == 503:
                refused = r
        assert refused is not None and refused.json()["error"]["code"] == 503
        reader.join(60)
        assert server.proc.wait(30) == 0
    finally:
        if server.proc.poll() is None:
            server.stop()
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events[-3:]


def test_client_commands_say_one_line_when_the_server_is_down(tmp_path):
    port = free_port()
    for cmd in (["adapters", "list", "--url", f"http://127.0.0.1:{port}"],
                ["adapters", "list", "--grpc", "--grpc-target", f"127.0.0.1:{port}"]):
        done = subprocess.run([EXE, *cmd], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "loraplex adapters list" in done.stderr, done.stderr


def test_train_upload_key_defaults_to_the_environment(monkeypatch):
    import argparse

    from loraplex.trainer.cli import add_arguments
    monkeypatch.setenv("LORAPLEX_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.get_default("api_key") == "from-env"


def test_sigterm_grace_over_cancels_the_rest_and_grpc_refuses(tmp_path):
    """Past --shutdown-grace the streams still running end with an error event, the process exits 0, and
    while draining a new gRPC call gets UNAVAILABLE (the default model: a 400-token stream outlasts 1 s)."""
    import grpc

    from loraplex.client import GrpcClient, GrpcError
    server = ServerProcess("--shutdown-grace", "1", adapter_dir=tmp_path / "a")
    reader, events, started = open_stream(server)
    try:
        assert started.wait(60)
        signalled = time.time()
        server.proc.send_signal(signal.SIGTERM)
        with GrpcClient(server.grpc_target, timeout=10) as client:
            with pytest.raises(GrpcError) as refused:
                client.complete("base", "hi", max_tokens=2)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
        reader.join(60)
        assert server.proc.wait(30) == 0
        assert time.time() - signalled < 20
    finally:
        if server.proc.poll() is None:
            server.stop()
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert errors and errors[0]["error"]["code"] == 503, events[-3:]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"] == "length"
                   for e in events)


def test_a_dead_engine_fails_health_and_ends_the_server(tiny_model_dir, tmp_path):
    """The engine's death is fatal and visible: /health answers 503 with status "error", requests get a
    JSON error, and the serving coroutine ends with a non-zero exit naming the cause."""
    import argparse
    import asyncio

    from loraplex.runtime.cli import _serve_http_and_grpc
    from service_fixtures import make_service
    service = make_service(tiny_model_dir, tmp_path / "a")
    port = free_port()
    args = argparse.Namespace(port=port, grpc_port=0, shutdown_grace=1.0, log_level="warning")
    outcome = {}

    def serve():
        try:
            asyncio.run(_serve_http_and_grpc(service, "127.0.0.1", args))
        except SystemExit as e:
            outcome["exit"] = e.code
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

        def broken_run(*_, **__):
            raise RuntimeError("device fell off the bus")
        service.engine.runner.run = broken_run
        r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code >= 500 and "device fell off the bus" in r.json()["error"]["message"], r.text
        health = None
        try:
            health = httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            pass  # already stopped
        if health is not None:
            assert health.status_code == 503 and health.json()["status"] == "error", health.text
        server.join(30)
        assert not server.is_alive()
        assert outcome["exit"] and "device fell off the bus" in str(outcome["exit"]), outcome
    finally:
        service.stop()
