"""Structured output (`response_format`): constrained and free rows with different adapters share
batches, every constrained output parses and validates against its schema, a schema xgrammar
cannot compile is a 400, json_object gives JSON, gRPC carries the same field."""
from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import jsonschema
import pytest
import torch

from conftest import make_peft_adapter
from loraplex.protos.loraplex.v1 import serving_pb2 as pb
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import EngineConfig
from loraplex.runtime.sampler import process_logits
from loraplex.runtime.sequence import SamplingParams, Sequence
from loraplex.runtime.service import Service, ServiceConfig
from loraplex.runtime.structured import GrammarError, ResponseFormat
from loraplex.runtime.tenants import OPEN_TENANT
from service_fixtures import LiveServer

COLOR_SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                                                 "count": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["color", "count"], "additionalProperties": False}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                                  "confidence": {"type": "integer", "minimum": 0, "maximum": 10}},
                 "required": ["answer", "confidence"], "additionalProperties": False}
ADAPTERS = {"a": "lora", "b": "gralora", "c": "rslora"}


def json_schema_format(schema: dict, name: str = "out") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    base = load_base_model(None, dtype="float32", device="cpu")
    service = Service(base, EngineConfig(kv_cache_tokens=8192, max_num_seqs=24, cuda_graphs=False),
                      ServiceConfig(adapter_dir=root / "store"))
    for i, (adapter_id, kind) in enumerate(ADAPTERS.items()):
        d = make_peft_adapter(kind, root / adapter_id, seed=40 + i)
        asyncio.run(service.upload_adapter(OPEN_TENANT, adapter_id, (d / "adapter_config.json").read_bytes(),
                                           (d / "adapter_model.safetensors").read_bytes()))
    service.start()
    live = LiveServer(service)
    yield live
    live.stop()


def test_grammars_compile_once_per_schema_and_report_the_library_error(server):
    grammars = server.service.engine.grammars
    before = grammars.compiles
    reordered = dict(reversed(list(COLOR_SCHEMA.items())))  # same schema, other key order
    grammars.compile(ResponseFormat.json_schema({**COLOR_SCHEMA, "title": "once"}))
    grammars.compile(ResponseFormat.json_schema({**reordered, "title": "once"}))
    assert grammars.compiles == before + 1
    with pytest.raises(GrammarError, match="cannot be compiled: Type should be a string$"):
        grammars.compile(ResponseFormat.json_schema({"type": 5}))


def test_sampler_masks_only_constrained_rows(server):
    engine = server.service.engine
    vocab = engine.base.config.vocab_size
    fmt = ResponseFormat.json_schema(COLOR_SCHEMA)
    free = Sequence([1, 2, 3], SamplingParams(temperature=0.0), None, lambda out: None)
    constrained = Sequence([1, 2, 3], SamplingParams(temperature=0.0, response_format=fmt), None, lambda out: None)
    constrained.matcher = engine.grammars.matcher(fmt)
    logits = torch.randn(2, vocab)
    processed = process_logits(logits, [free, constrained])
    assert torch.equal(processed[0], logits[0])  # the free row is untouched
    allowed = torch.isfinite(processed[1])
    assert allowed.any() and not allowed.all()
    assert engine.base.tokenizer.decode(allowed.nonzero()[:, 0].tolist()).strip().startswith("{")
    assert torch.equal(processed[1][allowed], logits[1][allowed])
    assert torch.isfinite(logits).all()  # the raw logits (reported as logprobs) are left as they were


def test_twenty_mixed_requests_share_batches_and_validate(server):
    """Constrained and free rows on the base model and three adapters, sent at once (one batch)."""
    scheduler = server.service.engine.scheduler
    schedule = scheduler.schedule
    batches: list[list] = []

    def recording_schedule():
        batch = schedule()
        batches.append([(seq.adapter.key if seq.adapter else None, seq.matcher is not None) for seq, _ in batch])
        return batch
    scheduler.schedule = recording_schedule
    models = ["base", "a", "b", "c"]
    requests = []
    for i in range(20):
        schema = (COLOR_SCHEMA, ANSWER_SCHEMA, None)[i % 3]
        kind = "chat" if i % 2 == 0 else "completions"
        body = {"model": models[i % 4], "max_tokens": 40, "temperature": 0.0 if i % 4 < 2 else 0.8, "seed": i}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "Describe an object as JSON with a color and a count."}]
        else:
            body["prompt"] = "Q: Is the sky blue? Answer in JSON.\nA:"
        if schema is not None:
            body["response_format"] = json_schema_format(schema)
        requests.append((kind, schema, body))

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post(f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}",
                                                      json=body) for kind, _, body in requests))
    try:
        responses = asyncio.run(send_all())
    finally:
        scheduler.schedule = schedule
    for (kind, schema, body), r in zip(requests, responses):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        if schema is not None:
            assert choice["finish_reason"] == "stop", (body["model"], text)
            jsonschema.validate(json.loads(text), schema)
    mixed = [b for b in batches if any(c for _, c in b) and not all(c for _, c in b) and len({a for a, _ in b}) >= 3]
    assert mixed, "no step held constrained and free rows with several adapters"


def test_invalid_schema_unknown_type_and_text(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        def complete(response_format):
            return client.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 4,
                                                        "temperature": 0.0, "response_format": response_format})
        r = complete(json_schema_format({"type": "object", "properties": {"x": {"type": "bogus"}}}))
        assert r.status_code == 400
        assert "cannot be compiled" in r.json()["error"]["message"]
        r = complete(json_schema_format({"type": "string", "pattern": "(("}))
        assert r.status_code == 400 and "parenthesis is not closed" in r.json()["error"]["message"]
        r = complete({"type": "yaml"})
        assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
        r = complete({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}})
        assert r.status_code == 400 and "extra" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 4, "min_tokens": 2,
                                                 "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"]
        r = complete({"type": "text"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert server.service.engine.alive


def test_json_object_gives_json(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "a", "max_tokens": 48, "temperature": 0.7, "seed": 5, "n": 2,
            "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": "Give a JSON object with a name and an age."}]})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:  # each choice has a matcher of its own
        assert choice["finish_reason"] == "stop", choice
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_a_token_the_grammar_refuses_ends_that_request_alone(server, monkeypatch):
    """Should a constrained row ever sample a token its matcher refuses, that request ends with an
    error and the free row beside it finishes normally."""
    import loraplex.runtime.engine as engine_module
    sample = engine_module.sample_on_device
    brace = server.service.base.tokenizer.encode("}")[0]  # never allowed before the object opens

    def sample_breaking_grammar(logits, seqs, *rest):
        return torch.tensor([brace if seq.matcher is not None and seq.num_completion_tokens == 0 else token
                             for seq, token in zip(seqs, sample(logits, seqs, *rest).tolist())])
    monkeypatch.setattr(engine_module, "sample_on_device", sample_breaking_grammar)

    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"model": "a", "prompt": "Hello", "max_tokens": 8, "temperature": 0.0}
            return await asyncio.gather(
                client.post("/v1/completions", json={**body, "response_format": {"type": "json_object"}}),
                client.post("/v1/completions", json=body))
    constrained, free = asyncio.run(both())
    assert constrained.status_code == 500
    assert "grammar" in constrained.json()["error"]["message"]
    assert free.status_code == 200 and free.json()["choices"][0]["finish_reason"] == "length"
    assert server.service.engine.alive


def test_grpc_constrained_request(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.CompletionsStub(channel)
        sampling = pb.SamplingParams(max_tokens=40, temperature=0.0,
                                     response_format_json=json.dumps(json_schema_format(ANSWER_SCHEMA)))
        reply = stub.Complete(pb.CompletionRequest(model="b", text="Q: Is the sky blue? Answer in JSON.\nA:",
                                                   sampling=sampling), timeout=120)
        assert reply.finish_reason == pb.FINISH_REASON_STOP
        jsonschema.validate(json.loads(reply.text), ANSWER_SCHEMA)
        bad = pb.SamplingParams(max_tokens=4, response_format_json='{"type": "json_schema"}')
        with pytest.raises(grpc.RpcError) as e:
            stub.Complete(pb.CompletionRequest(model="base", text="Hi", sampling=bad), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "response_format_json" in e.value.details()


def test_grammar_compiles_off_the_engine_and_event_loop_threads(server, monkeypatch):
    """The compile itself (a cache miss) runs in a worker thread; submit only finds it in the cache."""
    import threading
    grammars = server.service.engine.grammars
    grammars.compile(ResponseFormat("json_object"))  # builds the library's compiler
    compile_threads = []
    compile_json_schema = grammars._compiler.compile_json_schema

    def recording_compile(*args, **kwargs):
        compile_threads.append(threading.current_thread())
        return compile_json_schema(*args, **kwargs)
    monkeypatch.setattr(grammars._compiler, "compile_json_schema", recording_compile)
    schema = {**ANSWER_SCHEMA, "title": "threads"}  # not compiled before
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": "base", "prompt": "Is it?", "max_tokens": 24,
                                                 "temperature": 0.0, "response_format": json_schema_format(schema)})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)
    assert len(compile_threads) == 1
    assert compile_threads[0] is not server.thread and compile_threads[0].name != "loraplex-engine"


def test_the_engine_fills_the_grammar_bitmask_before_sampling(server, monkeypatch):
    """The step's bitmask is filled right after the forward is launched (CPU work that overlaps the GPU)
    and handed to the sampler, which then does not fill it again."""
    import loraplex.runtime.engine as engine_module
    sample, seen = engine_module.sample_on_device, []

    def recording_sample(logits, seqs, bitmask=None):
        seen.append((sum(s.matcher is not None for s in seqs), None if bitmask is None else bitmask.shape[0]))
        return sample(logits, seqs, bitmask)
    monkeypatch.setattr(engine_module, "sample_on_device", recording_sample)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": "a", "prompt": "Hello", "max_tokens": 4,
                                                  "temperature": 0.0, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    constrained = [(n, rows) for n, rows in seen if n]
    assert constrained and all(rows == n for n, rows in constrained)
