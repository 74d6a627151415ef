"""Every HTTP error is JSON in the OpenAI shape; types are strict; unknown fields are refused by name;
an unexpected exception is a JSON 500 on a connection that stays usable; a non-streamed request whose
client leaves is aborted in the engine. gRPC: every error a status with a message."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient

from loraplex.client.grpc import completion_request
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc
from loraplex.runtime.http_server import create_app
from service_fixtures import LiveServer, make_service, slow_engine


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    service = make_service(tiny_model_dir, tmp_path_factory.mktemp("errors") / "adapters")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service), raise_server_exceptions=False)


def assert_openai_error(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    assert body["error"]["code"] == status and fragment in body["error"]["message"], body


BAD_COMPLETIONS = {  # body: message fragment
    "max_tokens true": ({"max_tokens": True}, "max_tokens"),
    "stream yes": ({"stream": "yes"}, "stream"),
    "bool prompt": ({"prompt": [True, False]}, "prompt"),
    "seed above 64 bits": ({"seed": 1 << 64}, "seed"),
    "seed below 64 bits": ({"seed": -(1 << 63) - 1}, "seed"),
    "temperature string": ({"temperature": "0.5"}, "temperature"),
    "unknown field": ({"frobnicate": 1}, "frobnicate"),
    "logprobs above 20": ({"logprobs": 21}, "logprobs"),
    "n 0": ({"n": 0}, "n"),
    "presence_penalty above 2": ({"presence_penalty": 2.5}, "presence_penalty"),
    "frequency_penalty string": ({"frequency_penalty": "1"}, "frequency_penalty"),
    "logit_bias key not a token id": ({"logit_bias": {"a": 5}}, "logit_bias"),
    "best_of": ({"best_of": 2}, "best_of"),
    "response_format unknown type": ({"response_format": {"type": "yaml"}}, "response_format"),
    "tools": ({"tools": [{"type": "function"}]}, "tools"),
    "stream_options extra": ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "x"),
    "max_tokens zero": ({"max_tokens": 0}, "max_tokens"),
}


@pytest.mark.parametrize("name", BAD_COMPLETIONS)
def test_bad_completion_fields_are_400(client, name):
    fields, fragment = BAD_COMPLETIONS[name]
    r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2, **fields})
    assert_openai_error(r, 400, fragment)


def test_lone_surrogate_is_400(client):
    for body in (b'{"model": "base", "prompt": "a\\ud800b"}',
                 b'{"model": "base", "messages": [{"role": "user", "content": "\\udfff"}]}'):
        path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 400, "surrogate")


def test_bad_chat_content_is_400(client):
    for content in ([1], [{"type": "text", "text": 5}], [{"type": "image_url", "image_url": {"url": "x"}}],
                    [{"type": "text"}], {"text": "hi"}, 7):
        r = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": content}]})
        assert_openai_error(r, 400, "content")
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi",
                                                                                  "tool_calls": []}]})
    assert_openai_error(r, 400, "tool_calls")


def test_harmless_fields_accepted(client):
    r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2, "user": "u1", "n": 1,
                                             "logprobs": None, "presence_penalty": 0})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert r.status_code == 200, r.text


def test_routes_methods_and_bad_json(client):
    assert_openai_error(client.get("/v1/nothing-here"), 404, "Not Found")
    assert_openai_error(client.get("/v1/completions"), 405, "Method Not Allowed")
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert_openai_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "not found")


def test_adapter_may_not_take_the_base_models_id(client, service):
    for reserved in ("base", service.base.name):
        r = client.post("/v1/adapters", data={"id": reserved}, files={"config": ("adapter_config.json", b"{}"),
                                                                     "weights": ("adapter_model.safetensors", b"x")})
        assert_openai_error(r, 400, "reserved")


def test_unexpected_exception_is_json_500_and_keepalive_survives(service, monkeypatch):
    live = LiveServer(service)
    try:
        def broken(prompt):
            raise ZeroDivisionError("boom")
        monkeypatch.setattr(service, "encode_prompt", broken)
        with httpx.Client(base_url=live.url, timeout=30) as c:
            r = c.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
            assert_openai_error(r, 500, "internal error")
            monkeypatch.undo()
            r = c.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})  # same connection
            assert r.status_code == 200, r.text
            assert len(c._transport._pool.connections) == 1
    finally:
        live.http.should_exit = True
        live.thread.join(15)


def test_grpc_unexpected_exception_is_internal_with_message(service, monkeypatch):
    def broken(prompt):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(service, "encode_prompt", broken)

    async def call():
        from loraplex.runtime.grpc_server import start_grpc_server
        from conftest import free_port
        port = free_port()
        server = await start_grpc_server(service, "127.0.0.1", port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await pb_grpc.CompletionsStub(channel).Complete(completion_request("base", "hi"), timeout=10)
                return e.value
        finally:
            await server.stop(None)
    error = asyncio.run(call())
    assert error.code() == grpc.StatusCode.INTERNAL and "internal error (ZeroDivisionError)" in error.details()


def test_non_streaming_disconnect_aborts_in_engine(tiny_model_dir, tmp_path, caplog):
    """...and ends quietly: no 'unexpected error' for a client that is gone (the cancelled collection
    is awaited before its result is asked for)."""
    caplog.set_level("WARNING")
    service = make_service(tiny_model_dir, tmp_path / "adapters")
    slow_engine(service, 0.05)
    live = LiveServer(service)
    try:
        body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 400, "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 20
        while service.engine.stats()["running"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert service.engine.stats()["running"] == 1
        sock.close()
        closed = time.time()
        while (service.engine.stats()["running"] or service.in_flight) and time.time() < closed + 10:
            time.sleep(0.02)
        assert service.engine.stats()["running"] == 0 and service.in_flight == 0
        assert time.time() - closed < 3, "the abort waited for the request to run to max_tokens"
        assert service.engine.stats()["kv_blocks_used"] == 0
        time.sleep(0.2)
        assert not [r for r in caplog.records if "InvalidStateError" in r.getMessage() + str(r.exc_info)]
    finally:
        live.stop()


def test_adapter_upload_is_parsed_in_memory(client, monkeypatch):
    """Starlette spools a multipart file part over 1 MB to a temporary file, one worker-thread hop per 64 KB
    chunk (seconds for an 8B adapter): an upload within the adapter limit must not roll over to disk."""
    import tempfile
    rolled = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(self))
    files = {"config": ("adapter_config.json", b"{}", "application/json"),
             "weights": ("adapter_model.safetensors", b"\0" * (3 << 20), "application/octet-stream")}
    r = client.post("/v1/adapters", data={"id": "big-and-bad"}, files=files)
    assert_openai_error(r, 400, "")
    assert not rolled
