"""Tenants and keys: parsing, constant-time lookup, and isolation of each tenant's adapters on HTTP and gRPC."""
from __future__ import annotations

import asyncio
import hashlib

import grpc
import httpx
import pytest

from loraplex.client import GrpcClient, GrpcError
from loraplex.runtime.tenants import KeyFileError, KeyRing, bearer_key
from service_fixtures import LiveServer, make_service

KEYS = {"alice": "alice-key-123", "bob": "bob-key-456", "admin": "root-key-789"}


def test_key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# tenants\nalice {KEYS['alice']}\nbob sha256:{hashlib.sha256(KEYS['bob'].encode()).hexdigest()}\n"
                    f"admin {KEYS['admin']}  # the operator\n")
    ring = KeyRing.from_file(path)
    assert ring.tenant_for(KEYS["alice"]).name == "alice" and ring.tenant_for(KEYS["bob"]).name == "bob"
    assert ring.tenant_for(KEYS["admin"]).admin and not ring.tenant_for(KEYS["alice"]).admin
    assert ring.tenant_for("nope") is None
    assert bearer_key("bearer abc") == bearer_key("Bearer abc") == bearer_key("BEARER  abc") == "abc"
    assert bearer_key("Basic abc") is None and bearer_key(None) is None
    for text, fragment in ((f"alice {KEYS['alice']} extra\n", "expected"), ("al.ice k\n", "tenant name"),
                           ("a k\nb k\n", "already"), ("# nothing\n", "no 'TENANT KEY'")):
        path.write_text(text)
        with pytest.raises(KeyFileError) as e:
            KeyRing.from_file(path)
        assert fragment in str(e.value) and KEYS["alice"] not in str(e.value)


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    ring = KeyRing([(name, hashlib.sha256(key.encode()).digest()) for name, key in KEYS.items()])
    service = make_service(tiny_model_dir, tmp_path_factory.mktemp("tenants") / "adapters", keys=ring,
                           max_adapters_per_tenant=2)
    server = LiveServer(service)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny-adapter")
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(out)
    return out


def http(live, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=live.url, timeout=30, headers={"Authorization": f"bearer {KEYS[tenant]}"})


def upload(client: httpx.Client, adapter_id: str, directory) -> httpx.Response:
    return client.post("/v1/adapters", data={"id": adapter_id}, files={
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes())})


def test_http_isolation(live, tiny_adapter):
    alice, bob, admin = http(live, "alice"), http(live, "bob"), http(live, "admin")
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.get(f"{live.url}/health").status_code == 200 and httpx.get(f"{live.url}/metrics").status_code == 200

    r = upload(alice, "shared-name", tiny_adapter)
    assert r.status_code == 201 and r.json()["id"] == "shared-name", r.text
    body = {"model": "shared-name", "prompt": "hi", "max_tokens": 2}
    assert alice.post("/v1/completions", json=body).status_code == 200
    # bob: as if absent, on every route
    assert bob.post("/v1/completions", json=body).status_code == 404
    assert bob.post("/v1/chat/completions", json={**{k: v for k, v in body.items() if k != "prompt"},
                                                  "messages": [{"role": "user", "content": "hi"}]}).status_code == 404
    assert bob.get("/v1/adapters/shared-name").status_code == 404
    assert bob.delete("/v1/adapters/shared-name").status_code == 404
    assert bob.get("/v1/adapters").json()["data"] == []
    assert [m["id"] for m in bob.get("/v1/models").json()["data"]] == ["base"]
    r = upload(bob, "shared-name", tiny_adapter)  # bob's own adapter of that name: alice's is not replaced
    assert r.status_code == 201 and r.json()["version"] == 1
    assert alice.get("/v1/adapters/shared-name").json()["version"] == 1
    assert upload(alice, "shared-name", tiny_adapter).json()["version"] == 2
    assert bob.get("/v1/adapters/shared-name").json()["version"] == 1
    # the admin sees and manages everyone's
    ids = sorted(a["id"] for a in admin.get("/v1/adapters").json()["data"])
    assert ids == ["alice.shared-name", "bob.shared-name"]
    assert admin.post("/v1/completions", json={**body, "model": "bob.shared-name"}).status_code == 200
    assert admin.delete("/v1/adapters/bob.shared-name").status_code == 200
    assert bob.get("/v1/adapters").json()["data"] == []
    # adapters per tenant
    assert upload(bob, "one", tiny_adapter).status_code == 201
    assert upload(bob, "two", tiny_adapter).status_code == 201
    r = upload(bob, "three", tiny_adapter)
    assert r.status_code == 403 and "limit" in r.json()["error"]["message"]
    for name in ("one", "two"):
        assert bob.delete(f"/v1/adapters/{name}").status_code == 200


def test_grpc_isolation(live, tiny_adapter):
    with GrpcClient(live.grpc_target, api_key=KEYS["alice"]) as alice, \
            GrpcClient(live.grpc_target, api_key=KEYS["bob"]) as bob, \
            GrpcClient(live.grpc_target, api_key=KEYS["admin"]) as admin, GrpcClient(live.grpc_target) as nobody:
        assert nobody.health() == "SERVING"
        with pytest.raises(GrpcError) as e:
            nobody.list_adapters()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert alice.upload_adapter(tiny_adapter, "g-own").id == "g-own"
        assert alice.complete("g-own", "hi", max_tokens=2).usage.completion_tokens == 2
        for call in (lambda: bob.complete("g-own", "hi", max_tokens=2), lambda: list(bob.complete_stream("g-own", "hi")),
                     lambda: bob.chat("g-own", [{"role": "user", "content": "hi"}]),
                     lambda: bob.get_adapter("g-own"), lambda: bob.delete_adapter("g-own")):
            with pytest.raises(GrpcError) as e:
                call()
            assert e.value.code == grpc.StatusCode.NOT_FOUND, e.value
        assert "g-own" not in [a.id for a in bob.list_adapters()]
        assert "alice.g-own" in [a.id for a in admin.list_adapters()]
        assert admin.delete_adapter("alice.g-own").id == "alice.g-own"
        assert "g-own" not in [a.id for a in alice.list_adapters()]
