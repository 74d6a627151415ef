"""The HTTP API end to end, against real server processes on the default model."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ServerProcess, sse_events


def test_readme_server_answers_curl(tmp_path):
    """Acceptance 1: the README's `loraplex serve` on the default model answers a curl completion."""
    server = ServerProcess(adapter_dir=tmp_path / "adapters")  # default settings, as README command 1
    try:
        body = json.dumps({"model": "base", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        out = subprocess.run(["curl", "-sf", f"{server.url}/v1/completions", "-H", "content-type: application/json",
                              "-d", body], capture_output=True, text=True, timeout=120, check=True).stdout
        assert "Paris" in json.loads(out)["choices"][0]["text"]
        chat = server.client.post("/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20, "temperature": 0}).json()
        assert "Paris" in chat["choices"][0]["message"]["content"]
        assert chat["choices"][0]["finish_reason"] == "stop"
        models = [m["id"] for m in server.client.get("/v1/models").json()["data"]]
        assert models == ["base"]
    finally:
        server.stop()


def stream_completion(server, model: str, prompt: str, max_tokens: int, started: threading.Event | None = None,
                      stop_after: int | None = None) -> tuple[str, str | None]:
    """Text and finish_reason of a streamed completion; `started` is set at the first chunk."""
    text, reason, chunks = [], None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for event in sse_events(r.iter_lines()):
            if event == "[DONE]":
                break
            text.append(event["choices"][0]["text"])
            reason = event["choices"][0]["finish_reason"] or reason
            chunks += 1
            if started is not None:
                started.set()
            if stop_after is not None and chunks >= stop_after:
                break  # leaving the with-block closes the connection mid-stream
    return "".join(text), reason


def test_hot_swap_while_streaming(fp32_server, peft_adapters):
    """Acceptance 3: upload → use → replace → delete while other requests stream; every response
    equals the reference output of the version it was admitted with."""
    s, prompt, n = fp32_server, "Once upon a time", 64
    for ref, kind in (("ref-one", "lora"), ("ref-two", "gralora")):
        assert s.upload(ref, peft_adapters[kind]).status_code == 201
    expected = {kind: stream_completion(s, ref, prompt, n)[0] for ref, kind in (("ref-one", "lora"), ("ref-two", "gralora"))}
    expected["base"] = stream_completion(s, "base", prompt, n)[0]
    assert len(set(expected.values())) == 3

    results: dict[str, str] = {}

    def run(name, model, started):
        results[name] = stream_completion(s, model, prompt, n, started)[0]

    def start(name, model):
        started = threading.Event()
        t = threading.Thread(target=run, args=(name, model, started))
        t.start()
        assert started.wait(60), f"{name} never started"
        return t

    threads = [start("base-1", "base")]
    r = s.upload("hot", peft_adapters["lora"])
    assert r.status_code == 201 and r.json()["version"] == 1
    threads.append(start("hot-v1", "hot"))  # admitted with v1 ...
    r = s.upload("hot", peft_adapters["gralora"])  # ... replaced while it streams
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["peft_type"] == "GRALORA"
    assert s.client.get("/health").json()["running"] >= 2, "replace happened after the streams finished"
    threads.append(start("hot-v2", "hot"))
    threads.append(start("base-2", "base"))
    assert s.client.delete("/v1/adapters/hot").status_code == 200  # deleted while v2 streams
    r = s.client.post("/v1/completions", json={"model": "hot", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    for t in threads:
        t.join(120)
    assert results == {"base-1": expected["base"], "hot-v1": expected["lora"], "hot-v2": expected["gralora"],
                       "base-2": expected["base"]}


def _tensors(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def _bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save(tensors)


def bad_uploads(peft_dir, tmp_path):
    good_config = (peft_dir / "adapter_config.json").read_bytes()
    good_weights = (peft_dir / "adapter_model.safetensors").read_bytes()
    tensors = _tensors(peft_dir)
    first_a = next(k for k in tensors if "lora_A" in k)
    wrong_shape = dict(tensors, **{first_a: torch.randn(tensors[first_a].shape[0], 100)})
    with_nan = dict(tensors, **{first_a: tensors[first_a].clone().index_fill_(1, torch.tensor([3]), float("nan"))})
    config = json.loads(good_config)
    first_b = first_a.replace("lora_A", "lora_B")
    big_rank = {first_a: torch.randn(128, tensors[first_a].shape[1]), first_b: torch.randn(tensors[first_b].shape[0], 128)}
    buf = io.BytesIO()
    torch.save({first_a: tensors[first_a]}, buf)
    return {  # name: (id, config bytes, weights bytes, weights filename, expected status, message fragment)
        "truncated": ("bad", good_config, good_weights[: len(good_weights) // 2], "adapter_model.safetensors", 400, "truncated"),
        "random bytes": ("bad", good_config, os.urandom(4096), "adapter_model.safetensors", 400, "safetensors"),
        "pickle file": ("bad", good_config, buf.getvalue(), "adapter_model.bin", 400, "pickle"),
        "pickle renamed": ("bad", good_config, pickle.dumps({"a": 1}), "adapter_model.safetensors", 400, "pickle"),
        "wrong shapes": ("bad", good_config, _bytes(wrong_shape), "adapter_model.safetensors", 400, "shape"),
        "NaN": ("bad", good_config, _bytes(with_nan), "adapter_model.safetensors", 400, "NaN"),
        "rank above limit": ("bad", json.dumps({**config, "r": 128}).encode(), _bytes(big_rank),
                             "adapter_model.safetensors", 400, "max-lora-rank"),
        "unknown peft_type": ("bad", json.dumps({**config, "peft_type": "IA3"}).encode(), good_weights,
                              "adapter_model.safetensors", 400, "peft_type"),
        "bad config json": ("bad", b"{not json", good_weights, "adapter_model.safetensors", 400, "JSON"),
        "dot-dot id": ("../evil", good_config, good_weights, "adapter_model.safetensors", 400, "invalid adapter id"),
        "base id": ("base", good_config, good_weights, "adapter_model.safetensors", 400, "reserved"),
        "oversize": ("bad", good_config, good_weights + b"\0" * (65 << 20), "adapter_model.safetensors", 413, "limit"),
    }


def test_bad_uploads_are_rejected_and_change_nothing(fp32_server, peft_adapters, tmp_path):
    """Acceptance 4: each bad upload is a 4xx with a clear JSON message; store and serving unchanged."""
    s = fp32_server
    assert s.upload("keeper", peft_adapters["rslora"]).status_code == 201
    before_list = s.client.get("/v1/adapters").json()
    store_root = s.proc.args[s.proc.args.index("--adapter-dir") + 1]
    before_files = sorted(str(p.relative_to(store_root)) for p in __import__("pathlib").Path(store_root).rglob("*"))
    before_text = s.complete("keeper", "Hello there", 8)["choices"][0]["text"]
    for name, (aid, cfg, weights, fname, status, fragment) in bad_uploads(peft_adapters["lora"], tmp_path).items():
        r = s.client.post("/v1/adapters", data={"id": aid}, files={"config": ("adapter_config.json", cfg),
                                                                    "weights": (fname, weights)})
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        message = r.json()["error"]["message"]
        assert fragment.lower() in message.lower(), f"{name}: {message}"
        assert s.client.get("/v1/adapters").json() == before_list, name
    after_files = sorted(str(p.relative_to(store_root)) for p in __import__("pathlib").Path(store_root).rglob("*"))
    assert after_files == before_files
    assert s.complete("keeper", "Hello there", 8)["choices"][0]["text"] == before_text
    assert s.client.get("/health").status_code == 200


def test_restart_serves_previous_adapters(tmp_path, peft_adapters):
    """Acceptance 5: adapters committed before a restart are listed and served after it."""
    store = tmp_path / "adapters"
    first = ServerProcess("--dtype", "float32", adapter_dir=store)
    try:
        assert first.upload("alpha", peft_adapters["lora"]).status_code == 201
        assert first.upload("beta", peft_adapters["hybrid"]).status_code == 201
        assert first.upload("beta", peft_adapters["gralora"]).status_code == 201  # replaced: v2 is served
        before = {m: first.complete(m, "The weather today", 10)["choices"][0]["text"] for m in ("alpha", "beta")}
    finally:
        first.stop()
    second = ServerProcess("--dtype", "float32", adapter_dir=store)
    try:
        listed = {a["id"]: a for a in second.client.get("/v1/adapters").json()["data"]}
        assert set(listed) == {"alpha", "beta"} and listed["beta"]["version"] == 2
        assert listed["beta"]["peft_type"] == "GRALORA"
        after = {m: second.complete(m, "The weather today", 10)["choices"][0]["text"] for m in ("alpha", "beta")}
        assert after == before
        ids = [m["id"] for m in second.client.get("/v1/models").json()["data"]]
        assert ids == ["base", "alpha", "beta"]
    finally:
        second.stop()


def test_disconnect_frees_kv(fp32_server):
    """Acceptance 6: a client that disconnects mid-stream frees its KV blocks (engine stat)."""
    s = fp32_server
    assert s.client.get("/health").json()["kv_blocks_used"] == 0
    seen = {}

    def watch():
        deadline = time.time() + 60
        while time.time() < deadline and "used" not in seen:
            used = s.client.get("/health").json()["kv_blocks_used"]
            if used:
                seen["used"] = used
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    text, reason = stream_completion(s, "base", "Tell me a long story about a dragon", 2000, stop_after=3)
    watcher.join()
    assert reason is None and seen.get("used", 0) > 0
    deadline = time.time() + 30
    while time.time() < deadline:
        health = s.client.get("/health").json()
        if health["kv_blocks_used"] == 0 and health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["kv_blocks_used"] == 0 and health["running"] == 0, health


def test_errors_are_json(fp32_server):
    s = fp32_server
    r = s.client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = s.client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 100000})
    assert r.status_code == 400 and "limit of 4096" in r.json()["error"]["message"]
    r = s.client.post("/v1/completions", json={"model": "missing", "prompt": "x"})
    assert r.status_code == 404
    assert s.client.get("/v1/adapters/missing").status_code == 404
    assert s.client.delete("/v1/adapters/missing").status_code == 404
    metrics = s.client.get("/metrics").text
    assert "loraplex_requests_total" in metrics and "loraplex_kv_blocks_used" in metrics


def test_streaming_chat_and_stop_strings(fp32_server):
    s = fp32_server
    body = {"model": "base", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 20, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with s.client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert "Paris" in text
    assert events[-2]["usage"]["completion_tokens"] > 0
    full = s.complete("base", "The capital of France is", 12)["choices"][0]["text"]
    stopped = s.complete("base", "The capital of France is", 12, stop=["."])
    assert stopped["choices"][0]["text"] == full[: full.index(".")]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    seeded = [s.client.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 8, "temperature": 1.0,
                                                      "seed": 7}).json()["choices"][0]["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_cli_adapters_upload_list_delete(fp32_server, peft_adapters):
    import sys
    from pathlib import Path
    exe = [str(Path(sys.executable).parent / "loraplex"), "adapters"]
    url = ["--url", fp32_server.url]
    run = lambda *a: subprocess.run(exe + list(a) + url, capture_output=True, text=True, timeout=120)
    up = run("upload", str(peft_adapters["hybrid"]), "--id", "from-cli")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["peft_type"] == "GRALORA"
    assert "from-cli" in [a["id"] for a in json.loads(run("list").stdout)]
    assert fp32_server.complete("from-cli", "Hi", 4)["choices"][0]["text"]
    assert json.loads(run("delete", "from-cli").stdout)["deleted"] is True
    missing = run("delete", "from-cli")
    assert missing.returncode != 0 and "404" in missing.stderr and "not found" in missing.stderr
