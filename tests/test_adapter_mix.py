"""Per-request adapter mixes: a weighted mix equals PEFT's add_weighted_adapter(combination_type="cat"),
GraLoRA members enter as their exact LoRA form, tenant rules and bounds hold on HTTP and gRPC."""
from __future__ import annotations

import asyncio
import hashlib
import math

import httpx
import pytest
import torch

from loraplex.runtime.adapters.ops import module_delta
from loraplex.runtime.adapters.peft_format import ModuleDelta
from loraplex.runtime.adapters.peft_format import AdapterError, AdapterWeights
from loraplex.runtime.adapters.registry import lora_form, mix_weights
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import EngineConfig
from loraplex.runtime.service import Service, ServiceConfig
from loraplex.runtime.tenants import KeyRing, Tenant

from conftest import make_peft_adapter, peft_reference
from service_fixtures import LiveServer

KEYS = {"alice": "key-alice", "bob": "key-bob"}
ALICE = Tenant("alice")
PROMPT = "The capital of France is"
MIX = [("a", 0.7), ("b", 0.3)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mix-peft")
    # LoRA r8 alpha16 on all projections + rsLoRA r16 (rank/alpha patterns) on three: different scales and targets
    return {"a": make_peft_adapter("lora", root / "a", seed=11), "b": make_peft_adapter("rslora", root / "b", seed=12),
            "h": make_peft_adapter("hybrid", root / "h", seed=13)}


def make_service(adapter_dir, max_lora_rank: int = 64) -> Service:
    base = load_base_model(None, dtype="float32", device="cpu")
    ring = KeyRing([(name, hashlib.sha256(key.encode()).digest()) for name, key in KEYS.items()])
    return Service(base, EngineConfig(kv_cache_tokens=2048, max_num_seqs=4, cuda_graphs=False),
                   ServiceConfig(adapter_dir=adapter_dir, max_lora_rank=max_lora_rank), keys=ring)


@pytest.fixture(scope="module")
def service(tmp_path_factory, adapters) -> Service:
    """Alice's adapters a, b, h on the default model in fp32; the engine thread is not started (score())."""
    service = make_service(tmp_path_factory.mktemp("mix-store") / "adapters")
    for adapter_id, d in adapters.items():
        asyncio.run(service.upload_adapter(ALICE, adapter_id, (d / "adapter_config.json").read_bytes(),
                                           (d / "adapter_model.safetensors").read_bytes()))
    return service


@pytest.fixture(scope="module")
def peft_cat(adapters):
    """The PEFT reference: a and b loaded, mixed 0.7/0.3 by add_weighted_adapter(combination_type="cat")."""
    return peft_cat_model(adapters, MIX)


def peft_cat_model(adapters: dict, mix: list[tuple[str, float]]):
    from peft import PeftModel
    model = PeftModel.from_pretrained(peft_reference(None), adapters[mix[0][0]], adapter_name=mix[0][0])
    for adapter_id, _ in mix[1:]:
        model.load_adapter(adapters[adapter_id], adapter_name=adapter_id)
    model.add_weighted_adapter([i for i, _ in mix], [w for _, w in mix], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_mix_logits_equal_peft_cat(service, peft_cat):
    mix = asyncio.run(service._resolve_mix(ALICE, "base", MIX))
    single = service.registry.resolve("alice.a")
    ids = service.base.tokenizer(PROMPT)["input_ids"]
    got_mix, got_single, got_base = service.engine.score([(ids, mix), (ids, single), (ids, None)])  # one batch
    assert mix.weights.rank == 8 + 16  # r1 + r2
    with torch.no_grad():
        expected = peft_cat(torch.tensor([ids])).logits[0]
    assert rel_err(got_mix, expected) <= 1e-4
    assert rel_err(got_single, expected) > 1e-3 and rel_err(got_base, expected) > 1e-3  # the mix has teeth


def test_gralora_member_enters_as_its_exact_lora_form(service):
    torch.manual_seed(0)
    k, r, fin, fout = 2, 8, 12, 10
    m = ModuleDelta(k, torch.randn(k, fin // k, r), torch.randn(k, r, fout // k), 0.5,
                    torch.randn(fin, 3), torch.randn(3, fout))
    A, B = lora_form(m)
    x = torch.randn(5, fin)
    assert A.shape == (fin, k * r + 3)
    torch.testing.assert_close(m.scale * (x @ A @ B), module_delta(x, m), rtol=1e-5, atol=1e-5)
    # end to end: hybrid GraLoRA at weight 1 with a LoRA at weight 0 is the GraLoRA alone
    mix = asyncio.run(service._resolve_mix(ALICE, "base", [("h", 1.0), ("a", 0.0)]))
    ids = service.base.tokenizer(PROMPT)["input_ids"]
    got_mix, got_h = service.engine.score([(ids, mix), (ids, service.registry.resolve("alice.h"))])
    assert mix.weights.rank == 2 * 8 + 4 + 8
    assert rel_err(got_mix, got_h) <= 1e-5


def test_the_same_mix_is_one_shared_version(service):
    one = asyncio.run(service._resolve_mix(ALICE, "base", MIX))
    two = asyncio.run(service._resolve_mix(ALICE, "base", MIX))
    other = asyncio.run(service._resolve_mix(ALICE, "base", [("a", 0.6), ("b", 0.4)]))
    assert one.key == two.key and one.weights is two.weights
    assert other.key != one.key and other.weights is not one.weights


@pytest.fixture(scope="module")
def live(service, adapters):
    """The same store served over HTTP and gRPC by a started service (max rank 40: a + b + h is 44)."""
    server = LiveServer(make_service(service.registry.store.root, max_lora_rank=40))
    server.service.start()
    yield server
    server.stop()


def post(live, body: dict, key: str = KEYS["alice"]) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_mix_over_http_and_grpc_equals_peft_cat_generation(live, peft_cat, default_tokenizer):
    from loraplex.client import GrpcClient
    body = {"model": "base", "adapters": [{"id": i, "weight": w} for i, w in MIX], "ignore_eos": True}
    r = post(live, body)
    assert r.status_code == 200, r.text
    http_text = r.json()["choices"][0]["text"]
    with GrpcClient(live.grpc_target, api_key=KEYS["alice"]) as client:
        grpc_text = client.complete("base", PROMPT, adapters=dict(MIX), max_tokens=8, temperature=0, ignore_eos=True).text
    ids = torch.tensor([default_tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = peft_cat.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                                     pad_token_id=0)
    assert http_text == grpc_text == default_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("adapters_field, status, words", [
    ([{"id": "a", "weight": 1.0}], 400, "adapters"),  # one member
    ([{"id": f"x{i}", "weight": 0.1} for i in range(9)], 400, "adapters"),  # nine
    ([{"id": "a", "weight": 0.5}, {"id": "a", "weight": 0.5}], 400, "once"),
    ([{"id": "a", "weight": "0.5"}, {"id": "b", "weight": 0.5}], 400, "weight"),  # strict types
    ([{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5, "scale": 2}], 400, "scale"),  # unknown field
    ([{"id": "a", "weight": 0.5}, {"id": "nope", "weight": 0.5}], 404, "nope"),
    ([{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5}, {"id": "h", "weight": 0.5}], 400, "rank 44"),
    ([{"id": "a", "weight": 1e30}, {"id": "b", "weight": 0.5}], 400, "scale"),
])
def test_bad_mixes_are_refused_and_the_server_keeps_serving(live, adapters_field, status, words):
    r = post(live, {"model": "base", "adapters": adapters_field})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and {"message", "type", "code"} <= error.keys()
    assert post(live, {"model": "base", "adapters": [{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5}]}).status_code == 200


def test_non_finite_weight_and_non_base_model_are_refused(live):
    from loraplex.client import GrpcClient
    from loraplex.client.grpc import GrpcError
    r = post(live, {"model": "a", "adapters": [{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5}]})
    assert r.status_code == 400 and "model must be 'base'" in r.json()["error"]["message"]
    with GrpcClient(live.grpc_target, api_key=KEYS["alice"]) as client:
        with pytest.raises(GrpcError) as e:
            client.complete("base", PROMPT, adapters={"a": math.nan, "b": 0.5}, max_tokens=2)
    assert e.value.code.name == "INVALID_ARGUMENT" and "finite" in e.value.details


def test_every_member_is_resolved_in_the_callers_namespace(live):
    mix = {"model": "base", "adapters": [{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5}]}
    r = post(live, mix, key=KEYS["bob"])  # alice's adapters do not exist for bob
    assert r.status_code == 404 and "'a'" in r.json()["error"]["message"]
    r = post(live, {"model": "base", "adapters": [{"id": "alice.a", "weight": 0.5}, {"id": "b", "weight": 0.5}]},
             key=KEYS["bob"])  # nor under their stored id
    assert r.status_code == 404


def test_a_dora_member_is_refused():
    """DoRA rescales base + delta per channel: inside a weighted sum of deltas it has no meaning."""
    def lora(magnitude=None):
        module = ModuleDelta(1, torch.randn(1, 8, 2), torch.randn(1, 2, 6), 1.0, magnitude=magnitude)
        return AdapterWeights("LORA", 2, {}, {(0, "q_proj"): module})
    assert mix_weights([(lora(), 0.5), (lora(), 0.5)], 64).rank == 4
    with pytest.raises(AdapterError) as refused:
        mix_weights([(lora(), 0.5), (lora(torch.ones(6)), 0.5)], 64)
    assert refused.value.status == 400 and "DoRA" in refused.value.message
