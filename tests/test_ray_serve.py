"""`loraplex serve-ray`: 2 CPU replicas on a local Ray instance (loopback), adapter-affinity routing through
Serve's model multiplexing, one shared adapter store, greedy outputs equal to the single-process server's,
streams that arrive as they are generated, and a hot adapter spilling over to a second replica."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, sse_events

from loraplex.runtime.ray_serve import call_asgi, routing_id, spill_ranks

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ("lora", "rslora", "gralora", "hybrid")
PROMPTS = ("The capital of France is", "Count: one, two,", "def add(a, b):", "Water boils at", "My favourite colour is")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    port = free_port()
    exe = shutil.which("loraplex", path=str(Path(sys.executable).parent)) or shutil.which("loraplex")
    log = open(root / "serve-ray.log", "w")
    # from the repository root, as a user starts it (its replicas then have the root on sys.path: issue #18)
    proc = subprocess.Popen([exe, "serve-ray", "--replicas", "2", "--replica-cpus", "1", "--port", str(port),
                             "--adapter-dir", str(root / "adapters"), "--dtype", "float32", "--max-gpu-adapters", "4",
                             "--max-adapter-mb", "64", "--max-num-seqs", "2", "--log-level", "warning"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
        assert proc.returncode == 0, "serve-ray did not stop cleanly:\n" + (root / "serve-ray.log").read_text()[-3000:]


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


def _stream(client: httpx.Client, body: dict):
    """(response, [(arrival time, text)] of the content events, end time) of one streamed completion."""
    chunks = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r, chunks, time.perf_counter()
        for event in sse_events(r.iter_lines()):
            if event != "[DONE]" and event["choices"][0]["text"]:
                chunks.append((time.perf_counter(), event["choices"][0]["text"]))
    return r, chunks, time.perf_counter()


def test_a_stream_arrives_as_it_is_generated_with_the_replica_header(ray_server):
    body = {"model": "ray-gralora", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    whole = ray_server.post("/v1/completions", json=body)
    assert whole.status_code == 200, whole.text
    begun = time.perf_counter()
    r, chunks, ended = _stream(ray_server, body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-loraplex-replica"] == whole.headers["x-loraplex-replica"]
    assert len(chunks) >= 2 and "".join(t for _, t in chunks) == whole.json()["choices"][0]["text"]
    # incremental: the tokens are read over the decode, not together at its end as a buffered answer reads them
    # (measured from the first token: a prefill slowed by a busy CPU took 2.6 s of a 3.7 s stream once)
    first, last = chunks[0][0], chunks[-1][0]
    assert last - first > 0.5 * (ended - first), ([t - begun for t, _ in chunks], ended - begun)

    # an error found before the first event is the JSON error with its status, not a 200 stream
    missing, _, _ = _stream(ray_server, {**body, "model": "no-such-adapter"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    assert missing.headers["x-loraplex-replica"]
    bad, _, _ = _stream(ray_server, {**body, "bogus": 1})
    assert bad.status_code == 400 and "bogus" in bad.json()["error"]["message"]


def test_a_hot_adapter_spills_to_another_replica_when_its_holder_is_full(ray_server):
    # the fixture serves --max-num-seqs 2: two long streams of ray-lora fill the replica holding it
    first = _complete(ray_server, "ray-lora", PROMPTS[1])
    holder = first.headers["x-loraplex-replica"]
    started, results = threading.Barrier(3, timeout=120), []

    def long_stream():
        body = {"model": "ray-lora", "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with ray_server.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            started.wait()  # in flight on its replica
            started.wait()  # the spilled request is answered
            results.append(r.headers["x-loraplex-replica"])
            r.close()  # leaving early aborts the rest in the engine

    threads = [threading.Thread(target=long_stream) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        started.wait()
        spilled = _complete(ray_server, "ray-lora", PROMPTS[1])
    finally:
        started.wait()
        for t in threads:
            t.join(60)
    assert results == [holder, holder]
    assert spilled.status_code == 200 and spilled.headers["x-loraplex-replica"] != holder
    assert spilled.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


def test_spill_ranks_holders_then_the_fewest_adapters_then_the_rest():
    held = {"a": {"x", "y"}, "b": {"y"}, "c": set(), "d": {"z"}}
    assert spill_ranks("x", held) == [["a"], ["c"], ["b", "d"]]
    assert spill_ranks("y", held) == [["a", "b"], ["c"], ["d"]]
    assert spill_ranks("new", {"a": {"x"}, "b": {"y"}}) == [[], ["a", "b"], []]  # a new adapter: the fewest first
    assert spill_ranks("x", {"a": {"x"}}) == [["a"], [], []]
    assert spill_ranks("", held) == [["a", "b", "c", "d"]]  # the base model and other routes: any replica


def test_call_asgi_yields_each_message_as_the_app_sends_it_and_tells_the_app_when_the_caller_leaves():
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def scenario():
        closed = asyncio.Event()

        async def chunks():
            try:
                yield b"a"
                await asyncio.sleep(3600)  # only a caller that leaves ends this stream
                yield b"b"
            finally:
                closed.set()

        app = Starlette(routes=[Route("/s", lambda _: StreamingResponse(chunks(), media_type="text/event-stream"))])
        messages = call_asgi(app, "GET", "/s", "", [("x-a", "1")], b"")
        start = await messages.__anext__()
        assert start["type"] == "http.response.start" and start["status"] == 200
        assert (await messages.__anext__())["body"] == b"a"
        await messages.aclose()
        await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(scenario())


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
