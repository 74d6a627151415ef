"""`loraplex serve-ray`: 2 CPU replicas on a local Ray instance (loopback), adapter-affinity routing through
Serve's model multiplexing, one shared adapter store, and greedy outputs equal to the single-process server's."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port

from loraplex.runtime.ray_serve import routing_id

ADAPTERS = ("lora", "rslora", "gralora", "hybrid")
PROMPTS = ("The capital of France is", "Count: one, two,", "def add(a, b):", "Water boils at", "My favourite colour is")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    port = free_port()
    exe = shutil.which("loraplex", path=str(Path(sys.executable).parent)) or shutil.which("loraplex")
    log = open(root / "serve-ray.log", "w")
    proc = subprocess.Popen([exe, "serve-ray", "--replicas", "2", "--port", str(port), "--adapter-dir",
                             str(root / "adapters"), "--dtype", "float32", "--max-gpu-adapters", "4",
                             "--max-adapter-mb", "64", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (root / "serve-ray.log").read_text()[-3000:]
            assert time.time() < deadline, "serve-ray did not become healthy"
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _upload(client: httpx.Client, adapter_id: str, directory: Path) -> httpx.Response:
    with open(directory / "adapter_config.json", "rb") as c, open(directory / "adapter_model.safetensors", "rb") as w:
        return client.post("/v1/adapters", data={"id": adapter_id},
                           files={"config": ("adapter_config.json", c), "weights": ("adapter_model.safetensors", w)})


def _complete(client: httpx.Client, model: str, prompt: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})


def test_requests_stick_to_the_replica_holding_their_adapter_and_match_one_server(ray_server, fp32_server,
                                                                                  peft_adapters):
    for kind in ADAPTERS:  # committed once, through whichever replica takes the upload
        r = _upload(ray_server, f"ray-{kind}", peft_adapters[kind])
        assert r.status_code == 201, r.text
        assert r.headers["x-loraplex-replica"]
        assert fp32_server.upload(f"ray-{kind}", peft_adapters[kind]).status_code == 201
    listed = ray_server.get("/v1/adapters")
    assert {f"ray-{k}" for k in ADAPTERS} <= {a["id"] for a in listed.json()["data"]}

    holder: dict[str, str] = {}
    replicas = set()
    for i in range(40):
        kind, prompt = ADAPTERS[i % 4], PROMPTS[(i // 4) % len(PROMPTS)]
        r = _complete(ray_server, f"ray-{kind}", prompt)
        assert r.status_code == 200, r.text
        replica = r.headers["x-loraplex-replica"]
        replicas.add(replica)
        assert holder.setdefault(kind, replica) == replica, (i, kind, holder, replica)
        assert r.json()["choices"][0]["text"] == fp32_server.complete(f"ray-{kind}", prompt, max_tokens=8)[
            "choices"][0]["text"], (kind, prompt)
    assert len(replicas) == 2, holder  # 4 adapters spread over both replicas

    base = _complete(ray_server, "base", PROMPTS[0])
    assert base.status_code == 200 and base.headers["x-loraplex-replica"] in replicas
    missing = _complete(ray_server, "no-such-adapter", PROMPTS[0])  # one request fails itself, in the OpenAI shape
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    assert missing.headers["x-loraplex-replica"] in replicas
    extra = ray_server.post("/v1/completions", json={"model": "base", "prompt": "x", "bogus": 1})
    assert extra.status_code == 400 and "bogus" in extra.json()["error"]["message"]


def test_routing_id_is_the_adapter_named_by_a_completion():
    assert routing_id("/v1/completions", b'{"model": "support-bot", "prompt": "x"}') == "support-bot"
    assert routing_id("/v1/chat/completions", b'{"model": "a", "messages": []}') == "a"
    assert routing_id("/v1/completions", b'{"model": "base"}') == ""  # every replica holds the base model
    assert routing_id("/v1/completions", b"not json") == ""  # the replica answers the 400
    assert routing_id("/v1/completions", b'["a"]') == ""
    assert routing_id("/v1/adapters", b'{"model": "a"}') == ""


def test_serve_ray_refuses_grpc_port(tmp_path):
    exe = str(Path(sys.executable).parent / "loraplex")
    done = subprocess.run([exe, "serve-ray", "--grpc-port", "50051", "--adapter-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--grpc-port is not supported" in done.stderr
