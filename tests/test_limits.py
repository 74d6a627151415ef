"""Limits (body size before reading, prompt tokens, max_tokens, concurrency, queue depth, timeout),
all shown in /health; the refusals are 413 / 400 / 429 with Retry-After / 504, and RESOURCE_EXHAUSTED on gRPC."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import httpx
import pytest

from loraplex.client.grpc import completion_request
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc
from service_fixtures import LiveServer, make_service, slow_engine

LIMITS = dict(max_body_bytes=64 << 10, max_prompt_tokens=50, max_tokens=300, max_concurrent=2, max_waiting=1,
              request_timeout=1.5)


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    service = make_service(tiny_model_dir, tmp_path_factory.mktemp("limits") / "adapters", max_num_seqs=1, **LIMITS)
    slow_engine(service, 0.02)
    server = LiveServer(service)
    yield server
    server.stop()


def wait_idle(service, seconds=10):
    deadline = time.time() + seconds
    while (service.in_flight or service.engine.stats()["running"]) and time.time() < deadline:
        time.sleep(0.02)
    assert service.in_flight == 0 and service.engine.stats()["running"] == 0


def test_health_shows_limits(live):
    limits = httpx.get(f"{live.url}/health").json()["limits"]
    assert limits["max_body_bytes"] == 64 << 10 and limits["max_prompt_tokens"] == 50 and limits["max_tokens"] == 300
    assert limits["max_concurrent"] == 2 and limits["max_waiting"] == 1 and limits["request_timeout_s"] == 1.5
    assert {"max_upload_bytes", "max_adapters_per_tenant"} <= set(limits)


def test_huge_body_refused_before_it_is_read(live):
    """A 50 MB body is refused on its Content-Length at once; /health answers meanwhile."""
    sock = socket.create_connection(("127.0.0.1", live.port))
    try:
        started = time.time()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 52428800\r\n\r\n" + b"{\"prompt\": \"" + b"a" * 65536)
        sock.settimeout(5)
        head = b""
        while b'"code":413' not in head and time.time() - started < 5:
            head += sock.recv(65536)
        head = head.decode()
        assert head.startswith("HTTP/1.1 413") and '"code":413' in head, head
        assert time.time() - started < 2
    finally:
        sock.close()
    assert httpx.get(f"{live.url}/health", timeout=2).status_code == 200
    # without a Content-Length (chunked), the count while reading refuses it too
    body = (b"x" * 8192 for _ in range(64))
    r = httpx.post(f"{live.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_prompt_and_max_tokens_limits(live):
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "base", "prompt": "hello " * 200, "max_tokens": 2})
    assert r.status_code == 400 and "limit of 50" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 301})
    assert r.status_code == 400 and "limit of 300" in r.json()["error"]["message"]


def test_concurrency_and_queue_depth_are_429_with_retry_after(live):
    service = live.service
    wait_idle(service)
    results = []

    def long_request():
        r = httpx.post(f"{live.url}/v1/completions", timeout=30,
                       json={"model": "base", "prompt": "hi", "max_tokens": 15, "ignore_eos": True})
        results.append(r.status_code)
    first = threading.Thread(target=long_request)
    first.start()
    deadline = time.time() + 10
    while service.engine.stats()["running"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=long_request)  # waits: max_num_seqs is 1
    second.start()
    while service.in_flight < 2 and time.time() < deadline:
        time.sleep(0.01)
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["type"] == "rate_limit_error"

    async def grpc_call():
        async with grpc.aio.insecure_channel(live.grpc_target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pb_grpc.CompletionsStub(channel).Complete(completion_request("base", "hi", max_tokens=2), timeout=10)
            return e.value
    error = asyncio.run(grpc_call())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "1") in tuple(error.trailing_metadata())
    first.join(30)
    second.join(30)
    assert results == [200, 200]
    wait_idle(service)


def test_queue_depth_counts_requests_the_engine_has_not_started(live):
    """max_concurrent 2 allows two, but with one running and one waiting (max_waiting 1) the
    check refuses on the waiting count, which includes requests still in the engine inbox."""
    service = live.service
    wait_idle(service)
    service.config.max_concurrent = 10
    step = service.engine.step
    slow_engine(service, 0.05)  # the two requests outlast the third's admission, however fast the machine
    try:
        threads = [threading.Thread(target=lambda: httpx.post(
            f"{live.url}/v1/completions", timeout=30, json={"model": "base", "prompt": "hi", "max_tokens": 15,
                                                             "ignore_eos": True})) for _ in range(2)]
        for started, t in enumerate(threads, 1):  # the first is running before the second waits
            t.start()
            deadline = time.time() + 10
            while service.in_flight < started and time.time() < deadline:
                time.sleep(0.005)
            while started == 1 and service.engine.stats()["running"] < 1 and time.time() < deadline:
                time.sleep(0.005)
        r = httpx.post(f"{live.url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
        for t in threads:
            t.join(30)
    finally:
        service.engine.step = step
        service.config.max_concurrent = 2
    wait_idle(service)


def test_request_timeout_ends_and_aborts(live):
    service = live.service
    wait_idle(service)
    started = time.time()
    r = httpx.post(f"{live.url}/v1/completions", timeout=30,
                   json={"model": "base", "prompt": "hi", "max_tokens": 290, "ignore_eos": True})
    assert r.status_code == 504 and "timeout" in r.json()["error"]["message"], r.text
    assert time.time() - started < 4
    wait_idle(service, 3)
    assert service.engine.stats()["kv_blocks_used"] == 0


def test_generation_deadline_is_one_timer_that_closing_cancels():
    """A Generation's deadline is one timer for the request (not a timeout scope per token): outputs queued before
    it are delivered, the timer ends the wait with RequestTimeout and aborts the engine request, and a request that
    finishes first cancels its timer."""
    from types import SimpleNamespace
    from loraplex.runtime.sequence import StepOutput
    from loraplex.runtime.service import Generation
    from loraplex.runtime.service_errors import RequestTimeout

    aborted, released = [], []
    service = SimpleNamespace(config=SimpleNamespace(request_timeout=0.2), engine=SimpleNamespace(abort=aborted.append),
                              _release=released.append)

    def output(finished: bool) -> StepOutput:
        return StepOutput(7, "x", [1], finished, "length" if finished else None, 3, 1)

    async def run():
        loop = asyncio.get_running_loop()
        slow = Generation(service, loop.time() + 0.2)
        slow.request_id = 7
        slow.queue.put_nowait(output(False))
        assert (await slow.__anext__()).text == "x"
        timer = slow._deadline_timer
        assert timer is not None and len([h for h in loop._scheduled if not h.cancelled()]) >= 1
        with pytest.raises(RequestTimeout, match="timeout of 0.2 s"):
            await slow.__anext__()
        assert aborted == [7] and released == [slow] and slow.closed

        quick = Generation(service, loop.time() + 60)
        quick.request_id = 8
        quick.queue.put_nowait(output(True))
        assert (await quick.__anext__()).finished
        assert quick._deadline_timer.cancelled() and aborted == [7]  # finished: not aborted
        with pytest.raises(StopAsyncIteration):
            await quick.__anext__()

    asyncio.run(run())
