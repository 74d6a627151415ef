"""Prefix caching: block hashes keyed by adapter version, reference counts, LRU eviction; the engine
serving repeated prompts from cache with outputs equal to runs without it (CPU reference attention
and the Triton paged kernel), adapter replacement never reusing another version's blocks, and the
counters in /health and /metrics."""
from __future__ import annotations

import os

import httpx
import pytest
import triton.language as tl

from conftest import rerun_under_triton_interpreter
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.block_manager import BlockManager, adapter_key, block_hash
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.sequence import SamplingParams, Sequence
from test_engine import greedy, random_adapter, texts

INTERPRETED = type(tl.zeros).__name__ == "InterpretedFunction"
not_interpreted = pytest.mark.skipif(INTERPRETED, reason="run in the normal process")
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_paged_kernel_in_fresh_process")


def seq(tokens, adapter=None) -> Sequence:
    return Sequence(list(tokens), SamplingParams(max_tokens=4), adapter, lambda out: None)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + salt * 104729) % 40000 + 100 for i in range(n)]


def admit(blocks: BlockManager, s: Sequence) -> int:
    """What the scheduler does at admission: take the cached prefix, allocate the whole prompt."""
    prefix = blocks.cached_prefix(s)
    blocks.take_prefix(s, prefix)
    blocks.allocate(s, len(s))
    return len(prefix)


def computed(blocks: BlockManager, s: Sequence) -> None:
    """What a step computing the rest of s's prompt leaves behind."""
    n = len(s) - s.num_computed
    s.num_computed = len(s)
    blocks.cache_computed(s, n)


# -- block manager -----------------------------------------------------------------------------
@not_interpreted
def test_block_hash_chains_previous_block_tokens_and_adapter_key():
    v1, v2 = AdapterRef("a", 1, None), AdapterRef("a", 2, None)
    keys = {adapter_key(seq([1], a)) for a in (None, v1, v2, AdapterRef("b", 1, None))}
    assert len(keys) == 4  # base, each id and each version apart
    tokens = list(range(16))
    first = block_hash(None, adapter_key(seq([1], v1)), tokens)
    assert first == block_hash(None, adapter_key(seq([1], v1)), tokens)
    assert first != block_hash(None, adapter_key(seq([1], v2)), tokens)
    assert first != block_hash(None, adapter_key(seq([1])), tokens)
    assert first != block_hash(None, adapter_key(seq([1], v1)), tokens[:-1] + [99])
    # the same block after a different previous block is a different prefix
    assert block_hash(first, b"base", tokens) != block_hash(block_hash(None, b"base", tokens[::-1]), b"base", tokens)


@not_interpreted
def test_decode_rows_register_nothing_and_hash_nothing(monkeypatch):
    """Every step asks for every row; a decode row (or a chunk that fills no prompt block) must cost no hashing."""
    import loraplex.runtime.block_manager as bm
    blocks = BlockManager(8, 16)
    s = seq(prompt(40), AdapterRef("a", 1, None))
    admit(blocks, s)
    computed(blocks, s)
    assert blocks.num_cached == 2
    calls = []
    monkeypatch.setattr(bm, "adapter_key", lambda q: calls.append(q) or b"")
    monkeypatch.setattr(bm, "block_hash", lambda *args: calls.append(args) or b"")
    s.token_ids.append(7)  # a decode step's token, then the step that computed it
    blocks.allocate(s, len(s))
    s.num_computed += 1
    blocks.cache_computed(s, 1)
    assert not calls and blocks.num_cached == 2


@not_interpreted
def test_shared_prefix_reference_counts_and_release():
    blocks = BlockManager(16, 4)
    a = seq(prompt(10))
    assert admit(blocks, a) == 0 and len(a.block_table) == 3
    computed(blocks, a)
    assert blocks.num_cached == 2  # the two full blocks; the partial third is not cached
    b = seq(prompt(10)[:8] + [7, 7, 7])  # shares two blocks
    assert admit(blocks, b) == 2 and b.block_table[:2] == a.block_table[:2] and b.num_computed == 8
    assert b.block_table[2] != a.block_table[2]
    assert (blocks.queried_blocks, blocks.hit_blocks) == (2 + 2, 2)
    assert blocks.num_used == 4  # shared blocks count once
    blocks.free(a)
    assert blocks.num_used == 3  # b still holds the shared ones
    other = seq(prompt(10), AdapterRef("x", 1, None))  # same tokens, another adapter: nothing shared
    assert admit(blocks, other) == 0
    blocks.free(b)
    blocks.free(other)
    assert blocks.num_used == 0 and blocks.num_free == 16 and blocks.num_cached == 2
    c = seq(prompt(10))  # the freed blocks stayed cached
    assert admit(blocks, c) == 2 and blocks.hit_blocks == 4


@not_interpreted
def test_last_prompt_token_is_never_served_from_cache():
    blocks = BlockManager(8, 4)
    a = seq(prompt(8))  # exactly two blocks
    admit(blocks, a)
    computed(blocks, a)
    assert blocks.num_cached == 2
    b = seq(prompt(8))
    assert admit(blocks, b) == 1 and b.num_computed == 4  # the second block holds the last token: computed again
    assert blocks.queried_blocks == 1 + 1


@not_interpreted
def test_lru_eviction_of_unreferenced_blocks_only_when_space_is_needed():
    blocks = BlockManager(6, 4)
    a, b = seq(prompt(9, 1)), seq(prompt(9, 2))
    for s in (a, b):
        admit(blocks, s)
        computed(blocks, s)
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_cached == 4 and blocks.num_free == 6 and blocks.evictions == 0
    c = seq(prompt(9, 3))  # 3 blocks: the 2 free ones, then the least recently freed cached one (a's tail)
    admit(blocks, c)
    assert blocks.evictions == 1
    assert len(blocks.cached_prefix(seq(prompt(9, 1)))) == 1  # a's head survived
    assert len(blocks.cached_prefix(seq(prompt(9, 2)))) == 2  # b was freed later: intact
    held = seq(prompt(9, 2))
    assert admit(blocks, held) == 2  # references b's blocks; its third block evicts a's head
    assert blocks.evictions == 2 and blocks.num_free == 0
    blocks.free(c)  # never computed: its blocks go back uncached
    assert blocks.num_free == 3 and not blocks.can_allocate(seq(prompt(13, 4)), 13)
    admit(blocks, seq(prompt(12, 4)))
    assert blocks.evictions == 2  # referenced cached blocks are never evicted
    assert len(blocks.cached_prefix(seq(prompt(9, 2)))) == 2


@not_interpreted
def test_uncache_drops_only_blocks_no_other_sequence_reads():
    blocks = BlockManager(8, 4)
    a = seq(prompt(9))
    admit(blocks, a)
    computed(blocks, a)
    b = seq(prompt(9)[:4] + [5] * 5)
    admit(blocks, b)
    computed(blocks, b)
    dropped = blocks.uncache(b)
    assert b.block_table[0] not in dropped and set(dropped) == set(b.block_table[1:])
    blocks.free(b)
    blocks.free(a)
    assert len(blocks.cached_prefix(seq(prompt(9)))) == 2  # a's blocks untouched
    assert len(blocks.cached_prefix(seq(prompt(9)[:4] + [5] * 5))) == 1  # b's own block is gone


@not_interpreted
def test_disabled_cache_shares_nothing():
    blocks = BlockManager(8, 4, prefix_caching=False)
    a = seq(prompt(9))
    admit(blocks, a)
    computed(blocks, a)
    assert blocks.num_cached == 0 and blocks.cached_prefix(seq(prompt(9))) == [] and blocks.queried_blocks == 0


# -- engine, tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")


def run(base, requests, **config) -> tuple[list[list[int]], Engine]:
    engine = Engine(base, EngineConfig(cuda_graphs=False, **config))
    return texts(engine.generate(requests)), engine


@not_interpreted
def test_eviction_under_kv_pressure_never_fails_nor_serves_wrong_blocks(tiny):
    shared = prompt(40, 9)
    adapter = AdapterRef("a", 1, random_adapter(tiny.projection_shapes, tiny.num_layers, seed=5))
    # distinct prompts, prompts sharing a head, repeats and the same prompt on an adapter
    prompts = [prompt(20 + 7 * (i % 5), i) for i in range(12)] + [shared + prompt(9, i) for i in range(6)]
    requests = [(p, greedy(6), None) for p in prompts] + [(shared, greedy(6), adapter), (shared, greedy(6), None)]
    requests += requests[::3]
    expected, _ = run(tiny, requests, kv_cache_tokens=40 * 16, max_num_seqs=64, prefix_caching=False)
    got = []
    engine = Engine(tiny, EngineConfig(cuda_graphs=False, kv_cache_tokens=10 * 16, max_num_seqs=4, max_batched_tokens=64))
    for i in range(0, len(requests), 5):  # waves: later ones find earlier blocks cached or evicted
        got += texts(engine.generate(requests[i:i + 5]))
    assert got == expected
    stats = engine.stats()
    assert stats["prefix_cache_hit_blocks"] > 0 and stats["prefix_cache_evictions"] > 0
    assert stats["kv_blocks_used"] == 0 and 0 < stats["kv_blocks_cached"] <= 10


@not_interpreted
def test_preemption_and_abort_release_references(tiny):
    shared = prompt(48, 3)
    requests = [(shared + prompt(5, i), greedy(20), None) for i in range(6)]
    expected, _ = run(tiny, requests, kv_cache_tokens=64 * 16, prefix_caching=False)
    got, engine = run(tiny, requests, kv_cache_tokens=14 * 16, max_batched_tokens=24)
    assert got == expected
    assert engine.scheduler.preemptions > 0 and engine.blocks.hit_blocks > 0
    assert engine.blocks.num_used == 0 and all(r == 0 for r in engine.blocks._refs)
    # an abort while sharing blocks: the survivor's output is unchanged and every reference returns
    outs = []
    first = engine.submit(shared + [1], greedy(30), None, outs.append)
    engine._drain_inbox()
    engine.step()
    second_out = []
    engine.submit(shared + [2], greedy(5), None, second_out.append)
    engine._drain_inbox()
    engine.step()
    engine.abort(first)
    while engine.scheduler.has_work() or engine._aborts:
        engine._drain_inbox()
        engine.step()
    assert outs[-1].finish_reason == "abort"
    assert [t for o in second_out for t in o.token_ids] == run(tiny, [(shared + [2], greedy(5), None)],
                                                                 prefix_caching=False, kv_cache_tokens=1024)[0][0]
    assert engine.blocks.num_used == 0


# -- engine, default model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    return load_base_model(None, dtype="float32", device="cpu")


@not_interpreted
def test_repeated_1000_token_prompt_is_served_from_cache(smol):
    ids = smol.tokenizer(" ".join(f"item {i} is {i * 37 % 101}." for i in range(200)))["input_ids"][:1000]
    assert len(ids) == 1000
    request = (ids, greedy(4), None)
    engine = Engine(smol, EngineConfig(cuda_graphs=False, kv_cache_tokens=2048))
    [expected] = texts(engine.generate([request]))  # the cache is empty: this run computes every block
    before = engine.stats()
    assert before["prefix_cache_hit_blocks"] == 0 and before["kv_blocks_cached"] == 1000 // 16
    assert texts(engine.generate([request])) == [expected]
    after = engine.stats()
    queried = after["prefix_cache_queried_blocks"] - before["prefix_cache_queried_blocks"]
    hits = after["prefix_cache_hit_blocks"] - before["prefix_cache_hit_blocks"]
    assert queried == 999 // 16 and hits / (1000 // 16) >= 0.9, (hits, queried)


@not_interpreted
def test_replaced_adapter_version_never_reuses_blocks(smol):
    ids = smol.tokenizer(" ".join(f"row {i}: value {i * 13 % 29};" for i in range(40)))["input_ids"][:200]
    shapes, layers = smol.projection_shapes, smol.num_layers
    v1 = AdapterRef("tuned", 1, random_adapter(shapes, layers, rank=4, seed=11, projections=("q_proj", "v_proj")))
    v2 = AdapterRef("tuned", 2, random_adapter(shapes, layers, rank=4, seed=12, projections=("q_proj", "v_proj")))
    [expected_v2], _ = run(smol, [(ids, greedy(6), v2)], kv_cache_tokens=1024, prefix_caching=False, max_gpu_adapters=2)
    engine = Engine(smol, EngineConfig(cuda_graphs=False, kv_cache_tokens=1024, max_gpu_adapters=2))
    [out_v1] = texts(engine.generate([(ids, greedy(6), v1)]))
    texts(engine.generate([(ids, greedy(6), v1)]))
    hits_v1 = engine.blocks.hit_blocks
    assert hits_v1 == 199 // 16  # v1 is served from its own blocks
    assert texts(engine.generate([(ids, greedy(6), v2)])) == [expected_v2]
    assert engine.blocks.hit_blocks == hits_v1  # 0 hits for the new version
    assert expected_v2 != out_v1  # the versions differ: reusing v1's blocks would have shown


# -- the HTTP surface and a real store: replace and delete bump the version ------------------------
@not_interpreted
def test_health_metrics_and_reuploaded_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from service_fixtures import LiveServer, make_service
    from test_tenants import upload
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(tmp_path / "lora")
    live = LiveServer(make_service(tiny_model_dir, tmp_path / "adapters"))
    try:
        client = httpx.Client(base_url=live.url, timeout=30)
        body = {"model": "mine", "prompt": [int(t) for t in prompt(70)], "max_tokens": 3, "temperature": 0}
        assert upload(client, "mine", tmp_path / "lora").status_code == 201
        first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first
        health = client.get("/health").json()
        assert health["prefix_caching"] is True and health["prefix_cache_hit_blocks"] == 69 // 16
        assert health["prefix_cache_hit_rate"] == pytest.approx(0.5)  # 4 of the 8 looked up
        metrics = client.get("/metrics").text
        assert "loraplex_prefix_cache_hit_blocks_total 4.0" in metrics
        assert "loraplex_prefix_cache_hit_rate 0.5" in metrics
        for step in ("replace", "delete"):
            if step == "delete":
                assert client.delete("/v1/adapters/mine").status_code == 200
            assert upload(client, "mine", tmp_path / "lora").status_code in (200, 201)  # same files, new version
            assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first
            assert client.get("/health").json()["prefix_cache_hit_blocks"] == 4, step
    finally:
        live.stop()


def test_no_prefix_caching_flag():
    from loraplex.runtime.cli import build_parser
    assert build_parser().parse_args(["serve", "--no-prefix-caching"]).no_prefix_caching is True
    assert build_parser().parse_args(["serve"]).no_prefix_caching is False


# -- the Triton paged attention kernel reads the shared blocks --------------------------------------
@pytest.mark.skipif(INTERPRETED or os.environ.get("TRITON_INTERPRET") == "1", reason="the tests below run here")
def test_paged_kernel_in_fresh_process():
    rerun_under_triton_interpreter(__file__)


@needs_interpreter
def test_paged_kernel_reads_shared_blocks(tiny):
    shared = prompt(40, 5)
    requests = [(shared + prompt(3, i), greedy(4), None) for i in range(3)]

    def paged_engine(**config) -> Engine:
        engine = Engine(tiny, EngineConfig(cuda_graphs=False, kv_cache_tokens=512, **config))
        engine.runner.paged = True
        return engine

    expected = texts(paged_engine(prefix_caching=False).generate(requests))
    engine = paged_engine()
    got = texts(engine.generate(requests[:1])) + texts(engine.generate(requests[1:]))
    assert got == expected and engine.blocks.hit_blocks == 2 * (40 // 16)
