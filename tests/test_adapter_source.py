"""`serve --adapter-source DIR`: adapters loaded by name on first use, never from outside DIR, once per
version however many requests race for them; and `?limit=&after=` paging of the list routes."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest

from loraplex.runtime.adapter_resolution import LOAD_THREADS
from service_fixtures import LiveServer, make_service

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


BUSY = LOAD_THREADS + 4  # first loads at once: more than the loading threads


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny-adapter")
    get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def layout(tiny_adapter, tmp_path_factory):
    """DIR with good, bad and escaping folders; an adapter outside DIR that no request may reach."""
    root = tmp_path_factory.mktemp("source-root")
    source, outside = root / "source", root / "outside"
    source.mkdir()
    shutil.copytree(tiny_adapter, outside)  # a valid adapter: reaching it would serve (200), not refuse
    for name in ("good", "race", "slow-other", *(f"busy-{i}" for i in range(BUSY))):
        shutil.copytree(tiny_adapter, source / name)
    (source / "bad").mkdir()
    (source / "bad" / CONFIG).write_bytes((tiny_adapter / CONFIG).read_bytes())
    (source / "bad" / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    (source / "empty").mkdir()
    os.symlink(outside, source / "escape")  # the folder itself links out
    (source / "file-escape").mkdir()  # the folder is inside, its weights link out
    (source / "file-escape" / CONFIG).write_bytes((tiny_adapter / CONFIG).read_bytes())
    os.symlink(outside / WEIGHTS, source / "file-escape" / WEIGHTS)
    os.symlink(source / "good", source / "inner-link")  # a link that stays inside DIR is fine
    return source, outside


@pytest.fixture(scope="module")
def live(tiny_model_dir, layout, tmp_path_factory):
    service = make_service(tiny_model_dir, tmp_path_factory.mktemp("source-store") / "adapters",
                           adapter_sources=(layout[0],))
    server = LiveServer(service)
    yield server
    server.stop()


def complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 6,
                                                "temperature": 0})


def upload(client: httpx.Client, adapter_id: str, directory) -> httpx.Response:
    return client.post("/v1/adapters", data={"id": adapter_id}, files={
        "config": (CONFIG, (directory / CONFIG).read_bytes()),
        "weights": (WEIGHTS, (directory / WEIGHTS).read_bytes())})


def test_source_adapter_serves_like_an_upload_without_a_copy(live, tiny_adapter):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = complete(client, "good")
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["text"]
        assert upload(client, "good-uploaded", tiny_adapter).status_code == 201
        assert complete(client, "good-uploaded").json()["choices"][0]["text"] == served
        assert complete(client, "base").json()["choices"][0]["text"] != served  # the adapter did something
        assert complete(client, "inner-link").json()["choices"][0]["text"] == served
        assert not (live.service.registry.store.root / "good").exists()  # not copied into the store
        assert "good" not in [a["id"] for a in client.get("/v1/adapters").json()["data"]]
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids[0] == "base" and {"good", "race", "bad", "inner-link", "good-uploaded"} <= set(ids)
        assert "escape" not in ids  # a link out of DIR is not even listed
        assert complete(client, "no-such-folder").status_code == 404


def test_bad_folder_is_a_400_naming_it(live, layout):
    source = layout[0]
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for name in ("bad", "empty"):
            r = complete(client, name)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert str(source / name) in error["message"] and error["code"] == 400 and error["type"]


@pytest.mark.parametrize("model", ["../outside", "..", "/abs/outside", "source/../../outside", "x/..", "a/b",
                                   "..outside"])
def test_path_traversal_refused(live, layout, model):
    model = model.replace("/abs/outside", str(layout[1]))
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = complete(client, model)
    assert r.status_code == 400, r.text
    assert "invalid adapter id" in r.json()["error"]["message"]


@pytest.mark.parametrize("name", ["escape", "file-escape"])
def test_symlink_escape_refused(live, layout, name):
    loads = live.service.registry.source_loads
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = complete(client, name)
    assert r.status_code == 400, r.text
    assert "outside the source directory" in r.json()["error"]["message"]
    assert str(layout[1]) not in r.json()["error"]["message"]
    assert live.service.registry.source_loads == loads


def test_racing_requests_load_once_and_others_do_not_wait(live, monkeypatch):
    registry = live.service.registry
    validate = registry.validate

    def slow_validate(config_raw, weights_raw, owned=False):
        time.sleep(3.0)  # the first request is still loading when the others arrive
        return validate(config_raw, weights_raw, owned)
    monkeypatch.setattr(registry, "validate", slow_validate)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        assert complete(client, "good").status_code == 200  # already cached: no load
    loads = registry.source_loads
    results: dict[str, tuple[int, float]] = {}

    def request(key: str, model: str):
        start = time.monotonic()
        with httpx.Client(base_url=live.url, timeout=60) as client:
            results[key] = (complete(client, model).status_code, time.monotonic() - start)
    # more waiters than the event loop's worker threads (min(32, cores + 4)): they must wait without one
    racers = min(32, (os.cpu_count() or 1) + 4) + 2
    threads = [threading.Thread(target=request, args=(f"race{i}", "race")) for i in range(racers)]
    threads[0].start()
    time.sleep(0.3)  # the first request is loading
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)
    request("other", "good")  # another adapter: does not wait for race's load
    for t in threads:
        t.join(60)
    assert all(results[f"race{i}"][0] == 200 for i in range(racers)), results
    assert registry.source_loads == loads + 1, "racing requests loaded the same adapter more than once"
    assert results["other"][0] == 200 and results["other"][1] < 1.5, results


def test_requests_that_load_nothing_never_queue_behind_loads(live, monkeypatch):
    """More first loads than loading threads are under way: a request for an adapter already in memory and
    a base request are answered meanwhile (they neither wait for a loading thread nor for their tokens)."""
    with httpx.Client(base_url=live.url, timeout=60) as client:
        assert complete(client, "good").status_code == 200  # in memory and packed from here on
    registry = live.service.registry
    validate = registry.validate

    def slow_validate(config_raw, weights_raw, owned=False):
        time.sleep(2.5)
        return validate(config_raw, weights_raw, owned)
    monkeypatch.setattr(registry, "validate", slow_validate)
    results: dict[str, tuple[int, float]] = {}

    def request(key: str, model: str):
        start = time.monotonic()
        with httpx.Client(base_url=live.url, timeout=60) as client:
            results[key] = (complete(client, model).status_code, time.monotonic() - start)
    loads = [threading.Thread(target=request, args=(f"busy-{i}", f"busy-{i}")) for i in range(BUSY)]
    for t in loads:
        t.start()
    time.sleep(0.5)  # every loading thread is busy, and more loads wait for one
    request("ready", "good")
    request("base", "base")
    for t in loads:
        t.join(60)
    assert all(results[f"busy-{i}"][0] == 200 for i in range(BUSY)), results
    assert results["ready"][0] == 200 and results["ready"][1] < 1.5, results
    assert results["base"][0] == 200 and results["base"][1] < 1.5, results


def test_paging_validation(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for route in ("/v1/models", "/v1/adapters"):
            for bad in ("0", "1001", "-1", "1.5", "ten", ""):
                r = client.get(route, params={"limit": bad})
                assert r.status_code == 400 and r.json()["error"]["message"].startswith("limit:"), (route, bad, r.text)
            r = client.get(route, params={"after": ""})
            assert r.status_code == 400 and r.json()["error"]["message"].startswith("after:")
            r = client.get(route, params={"limit": "1000"})
            assert r.status_code == 200 and r.json()["has_more"] is False


N_STORE = N_SOURCE = 5000


@pytest.fixture(scope="module")
def crowded(tiny_model_dir, tmp_path_factory):
    """A server whose store holds N_STORE adapters and whose source holds N_SOURCE folders, made on disk
    directly (the listing reads names, CURRENT files and the version folders' file sizes, never the weights)
    rather than through 10,000 uploads."""
    root = tmp_path_factory.mktemp("crowded")
    source = root / "source"
    source.mkdir()
    service = make_service(tiny_model_dir, root / "adapters", adapter_sources=(source,))
    store = service.registry.store.root
    for i in range(N_STORE + N_SOURCE):
        adapter_id = f"a{i:05d}"
        if i % 2:
            (source / adapter_id).mkdir()
        else:
            (store / adapter_id / "v1").mkdir(parents=True)
            (store / adapter_id / "v1" / "adapter_config.json").write_text("{}")
            (store / adapter_id / "v1" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
            record = {"id": adapter_id, "version": 1, "peft_type": "LORA", "rank": 4, "size_bytes": 8,
                      "created": 0.0, "sha256": "0" * 64}
            (store / adapter_id / "CURRENT").write_text(json.dumps(record))
    server = LiveServer(service)
    yield server
    server.stop()


def all_pages(client: httpx.Client, route: str, limit: int) -> list[str]:
    ids, after, pages = [], None, 0
    while True:
        r = client.get(route, params={"limit": limit, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) <= limit
        pages += 1
        ids += [m["id"] for m in body["data"]]
        if not body["has_more"]:
            return ids
        assert len(body["data"]) == limit and body["last_id"] == body["data"][-1]["id"]
        after = body["last_id"]
        assert pages < 100


def test_10000_adapters_listed_by_pages_without_gap_or_repeat(crowded):
    expected = [f"a{i:05d}" for i in range(N_STORE + N_SOURCE)]
    with httpx.Client(base_url=crowded.url, timeout=60) as client:
        models = all_pages(client, "/v1/models", 999)
        assert models == ["base"] + expected
        adapters = all_pages(client, "/v1/adapters", 1000)
        assert adapters == expected[0::2]  # the store's only
        start = time.perf_counter()
        first = client.get("/v1/models", params={"limit": 100}).json()
        assert time.perf_counter() - start < 2.0
        assert first["first_id"] == "base" and first["has_more"] and len(first["data"]) == 100
        whole = client.get("/v1/models").json()  # no limit: the whole list, as before paging
        assert [m["id"] for m in whole["data"]] == ["base"] + expected and whole["has_more"] is False


TENANT_KEYS = {"alice": "alice-key-123", "bob": "bob-key-456"}


@pytest.fixture(scope="module")
def tenants(tiny_model_dir, tiny_adapter, tmp_path_factory):
    """alice has a source of her own in the key file; bob has none; both see the --adapter-source one."""
    root = tmp_path_factory.mktemp("tenant-sources")
    alice_dir, shared_dir = root / "alice", root / "shared"
    shutil.copytree(tiny_adapter, alice_dir / "only-alice")
    shutil.copytree(tiny_adapter, shared_dir / "shared-one")
    keys = root / "keys"
    keys.write_text(f"alice {TENANT_KEYS['alice']} source={alice_dir}\nbob {TENANT_KEYS['bob']}\n")
    from loraplex.runtime.tenants import KeyRing
    service = make_service(tiny_model_dir, root / "adapters", keys=KeyRing.from_file(keys),
                           adapter_sources=(shared_dir,))
    server = LiveServer(service)
    yield server
    server.stop()


def test_a_tenant_source_is_seen_by_that_tenant_alone(tenants):
    def client(name):
        return httpx.Client(base_url=tenants.url, timeout=60, headers={"Authorization": f"Bearer {TENANT_KEYS[name]}"})
    with client("alice") as alice, client("bob") as bob:
        assert complete(alice, "only-alice").status_code == 200
        assert complete(bob, "only-alice").status_code == 404
        assert complete(bob, "shared-one").status_code == 200 and complete(alice, "shared-one").status_code == 200
        alice_ids = [m["id"] for m in alice.get("/v1/models").json()["data"]]
        bob_ids = [m["id"] for m in bob.get("/v1/models").json()["data"]]
        assert "only-alice" in alice_ids and "shared-one" in alice_ids
        assert "only-alice" not in bob_ids and "shared-one" in bob_ids


def test_key_file_sources_are_checked(tmp_path):
    from loraplex.runtime.tenants import KeyFileError, KeyRing
    path = tmp_path / "keys"
    path.write_text(f"alice {TENANT_KEYS['alice']} source={tmp_path / 'missing'}\n")
    with pytest.raises(KeyFileError, match="not a directory"):
        KeyRing.from_file(path)
    path.write_text(f"alice {TENANT_KEYS['alice']} source={tmp_path}\nbob {TENANT_KEYS['bob']}\n")
    ring = KeyRing.from_file(path)
    assert ring.sources_of(ring.tenant_for(TENANT_KEYS["alice"])) == (tmp_path,)
    assert ring.sources_of(ring.tenant_for(TENANT_KEYS["bob"])) == ()


def test_serve_refuses_a_missing_source_before_loading_the_model(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port
    exe = shutil.which("loraplex", path=str(Path(sys.executable).parent)) or shutil.which("loraplex")
    (tmp_path / "a-file").write_text("")
    for bad in (tmp_path / "missing", tmp_path / "a-file"):
        start = time.monotonic()
        done = subprocess.run([exe, "serve", "--port", str(free_port()), "--grpc-port", "0", "--adapter-dir",
                               str(tmp_path / "adapters"), "--adapter-source", str(tmp_path), "--adapter-source",
                               str(bad)], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and f"--adapter-source {bad}: not a directory" in done.stderr, done.stderr[-2000:]
        assert time.monotonic() - start < 60


def test_grpc_serves_source_adapters_and_refuses_escapes(live):
    import grpc

    from loraplex.client import GrpcClient, GrpcError
    with GrpcClient(live.grpc_target) as client, httpx.Client(base_url=live.url, timeout=60) as http:
        served = client.complete("good", "hello there", max_tokens=6, temperature=0).choices[0].text
        assert served == complete(http, "good").json()["choices"][0]["text"]
        for model in ("escape", "../outside", "bad"):
            with pytest.raises(GrpcError) as e:
                client.complete(model, "hi", max_tokens=2)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, (model, e.value)
