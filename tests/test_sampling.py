"""Sampling and detokenization details: seeds, top-k/top-p, stop strings held back while streaming."""
from __future__ import annotations

import pytest
import torch

from loraplex.runtime.adapters.peft_format import AdapterWeights, ModuleDelta
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.detokenizer import find_stop, releasable_text
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.sampler import MASK32, mix32, sample
from loraplex.runtime.sequence import SamplingParams, Sequence


def seq(**params) -> Sequence:
    return Sequence([1, 2, 3], SamplingParams(**params), None, lambda o: None)


def test_seeded_sampling_is_reproducible_and_filters_apply():
    logits = torch.randn(1, 1000)
    draws = lambda **p: [sample(logits, [seq(seed=seed, **p)])[0] for seed in range(20)]
    assert draws(temperature=1.0) == draws(temperature=1.0)
    assert set(draws(temperature=1.0, top_k=1)) == {int(logits.argmax())}
    assert set(draws(temperature=1.0, top_p=1e-6)) == {int(logits.argmax())}
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    assert set(draws(temperature=5.0, top_k=3)) <= top3
    assert sample(logits, [seq(temperature=0.0)]) == [int(logits.argmax())]


def test_stop_string_tail_is_held_back_until_it_cannot_match():
    s = seq(stop=["STOP"])
    s.text = "hello ST"
    assert find_stop(s, 0) is None
    assert releasable_text(s, False) == "hello"  # "ST" might begin "STOP"
    s.text += "OP and more"
    assert find_stop(s, 8) == 6
    s2 = seq(stop=["STOP"])
    s2.text = "abcdef"
    assert releasable_text(s2, False) == "abc" and releasable_text(s2, True) == "def"


def seq_at(position: int, **params) -> Sequence:
    """A sequence that has already generated `position` tokens."""
    s = seq(**params)
    s.token_ids += [7] * position
    return s


def counts(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * observed.sum()
    kept = expected > 0
    assert observed[~kept].sum() == 0, "drew a token of probability 0"
    return float(((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum())


def test_mix32_is_the_uint32_hash():
    def reference(x):  # lowbias32 in plain unsigned 32-bit arithmetic
        x ^= x >> 16
        x = (x * 0x7FEB352D) & MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & MASK32
        return x ^ (x >> 16)
    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, MASK32]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_greedy_is_argmax_alone_and_in_a_mixed_batch():
    logits = torch.randn(12, 500)
    assert sample(logits, [seq(temperature=0.0) for _ in range(12)]) == logits.argmax(1).tolist()
    mixed = [seq(temperature=0.0) if i % 2 else seq(temperature=1.5, top_p=0.9, top_k=40, seed=i) for i in range(12)]
    assert sample(logits, mixed)[1::2] == logits.argmax(1)[1::2].tolist()


def test_top_k_1_is_argmax_at_any_temperature():
    logits = torch.randn(8, 300)
    for temperature in (0.01, 1.0, 2.0, 100.0):
        for extra in ({}, {"top_p": 0.99}):
            rows = [seq(temperature=temperature, top_k=1, seed=i, **extra) for i in range(8)]
            assert sample(logits, rows) == logits.argmax(1).tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.15, 0.05, 0.5, 0.3])  # sorted: 2 (0.5), 3 (0.3), 0 (0.15), 1 (0.05)
    n = 400
    logits = probs.log().expand(n, 4)
    for top_p, kept in ((0.45, {2}), (0.7, {2, 3}), (0.9, {2, 3, 0}), (1.0, {0, 1, 2, 3})):
        assert set(sample(logits, [seq(top_p=top_p, seed=i) for i in range(n)])) == kept, top_p
    # top-k applies first, then top-p on the renormalised top-k distribution: {2, 3} → 0.625, 0.375
    assert set(sample(logits, [seq(top_k=2, top_p=0.6, seed=i) for i in range(n)])) == {2}
    assert set(sample(logits, [seq(top_k=3, seed=i) for i in range(n)])) == {0, 2, 3}


def test_frequencies_match_softmax():
    vocab, n = 8, 4000
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.7]])
    many = logits.expand(n, vocab)
    # 7 degrees of freedom: P(chi2 > 30) ≈ 1e-4; the seeds are fixed, so this is deterministic anyway
    drawn = sample(many, [seq(temperature=1.0, seed=1000 + i) for i in range(n)])
    assert chi_square(counts(drawn, vocab), logits[0].softmax(0)) < 30
    drawn = sample(many, [seq(temperature=0.5, seed=5000 + i) for i in range(n)])
    assert chi_square(counts(drawn, vocab), (logits[0] / 0.5).softmax(0)) < 30
    top4 = torch.topk(logits[0], 4).indices
    expected = torch.zeros(vocab)
    expected[top4] = (logits[0, top4] / 1.5).softmax(0)
    drawn = sample(many, [seq(temperature=1.5, top_k=4, seed=9000 + i) for i in range(n)])
    assert chi_square(counts(drawn, vocab), expected) < 25
    # one seed over successive positions is a fresh draw each time, with the same distribution
    drawn = sample(many, [seq_at(i, temperature=1.0, seed=42) for i in range(n)])
    assert chi_square(counts(drawn, vocab), logits[0].softmax(0)) < 30


def test_same_seed_same_tokens_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 2000)
    params = [dict(temperature=1.0), dict(temperature=0.7, top_k=50), dict(temperature=1.3, top_p=0.8),
              dict(temperature=0.9, top_k=20, top_p=0.95), dict(temperature=2.0), dict(temperature=0.0)]
    alone = [sample(logits[i:i + 1], [seq_at(3, seed=100 + i, **p)])[0] for i, p in enumerate(params)]
    together = sample(logits, [seq_at(3, seed=100 + i, **p) for i, p in enumerate(params)])
    order = [4, 2, 0, 5, 1, 3]
    shuffled = sample(logits[order], [seq_at(3, seed=100 + i, **params[i]) for i in order])
    assert together == alone and shuffled == [alone[i] for i in order]
    # with extra unrelated rows around it (they enable top-k/top-p paths the row itself does not use)
    noise = torch.randn(2, 2000)
    framed = sample(torch.cat([noise[:1], logits[:1], noise[1:]]),
                    [seq(top_k=5, seed=1), seq_at(3, seed=100, **params[0]), seq(top_p=0.5, seed=2)])
    assert framed[1] == alone[0]
    # a different seed or position changes the draws
    draws = lambda **kw: sample(logits[:1].expand(64, -1), [seq_at(i, temperature=1.0, **kw) for i in range(64)])
    assert draws(seed=7) == draws(seed=7) != draws(seed=8)
    assert len(set(draws(seed=7))) > 40


def test_tiny_temperature_behaves_like_greedy():
    logits = torch.randn(4, 1000) * 10
    for extra in ({}, {"top_p": 0.9}, {"top_k": 10}):
        rows = [seq(temperature=1e-30, seed=i, **extra) for i in range(4)]
        assert sample(logits, rows) == logits.argmax(1).tolist()
    rows = [seq(temperature=1e-30, seed=1), seq(temperature=1.0, seed=2), seq(temperature=1e-45, seed=3)]
    out = sample(logits[:3], rows)
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax()) and 0 <= out[1] < 1000


@pytest.mark.parametrize("extra", [{}, {"top_p": 0.9}, {"top_k": 5}, {"temperature": 0.0}])
def test_non_finite_rows_get_minus_one_alone(extra):
    torch.manual_seed(1)
    logits = torch.randn(5, 300)
    rows = lambda: [seq_at(2, seed=10 + i, **extra) for i in range(5)]
    clean = sample(logits, rows())
    poisoned = logits.clone()
    poisoned[1, 17] = float("nan")
    poisoned[3, 0] = float("inf")
    poisoned[4, 5] = float("-inf")
    out = sample(poisoned, rows())
    assert out[1] == out[3] == out[4] == -1
    assert [out[0], out[2]] == [clean[0], clean[2]]


# -- through the engine ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")


def generated(results) -> list[list[int]]:
    return [[t for o in outs for t in o.token_ids] for outs in results]


def test_engine_tiny_temperature_and_seeded_runs(tiny_base):
    tok = tiny_base.tokenizer
    prompt = tok("the sampler")["input_ids"]
    tiny = SamplingParams(max_tokens=8, temperature=1e-30, ignore_eos=True)
    normal = lambda seed: SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024))
    results = engine.generate([(prompt, tiny, None), (prompt, normal(5), None)])
    assert [outs[-1].finish_reason for outs in results] == ["length", "length"]
    greedy = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024)).generate(
        [(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), None)])
    assert generated(results)[0] == generated(greedy)[0]
    # the same seed gives the same text in another engine, alone or beside other requests
    again = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024)).generate(
        [(tok("other words")["input_ids"], normal(9), None), (prompt, normal(5), None)])
    alone = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024)).generate([(prompt, normal(5), None)])
    text = lambda outs: "".join(o.text for o in outs)
    assert text(results[1]) == text(again[1]) == text(alone[0]) != ""
    assert generated(results)[1] == generated(alone)[0]


def test_engine_fails_only_the_request_with_non_finite_logits(tiny_base):
    tok = tiny_base.tokenizer
    fin, fout = tiny_base.projection_shapes["q_proj"]
    nan_delta = ModuleDelta(1, torch.full((1, fin, 2), float("nan")), torch.ones(1, 2, fout), 1.0)
    poisoned = AdapterRef("poisoned", 1, AdapterWeights("LORA", 2, {}, {(0, "q_proj"): nan_delta}))
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    prompt = tok("hello there")["input_ids"]
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024))
    results = engine.generate([(prompt, params, None), (prompt, params, poisoned)])
    assert results[1][-1].finish_reason == "error" and "non-finite" in results[1][-1].error
    assert results[0][-1].finish_reason == "length"
    assert generated(results)[0] == generated(Engine(tiny_base, EngineConfig(kv_cache_tokens=1024)).generate(
        [(prompt, params, None)]))[0]
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work()
