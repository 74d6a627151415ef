"""Property: random sampling parameters for several requests in ONE running batch never make a
request fail because of another's parameters, and greedy rows produce exactly their solo output."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.sequence import SamplingParams

from test_engine import greedy, texts, tiny_base  # noqa: F401 (fixture)

PROMPTS = ["hello world", "one two three", "a longer prompt with a few more words", "x"]

temperatures = st.one_of(st.just(0.0), st.sampled_from([5e-324, 1e-300, 1e-45, 1e-30, 1e-8]),
                         st.floats(min_value=0.0, max_value=2.0, allow_nan=False))
sampled = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 6),
    temperature=temperatures,
    top_p=st.one_of(st.just(1.0), st.sampled_from([5e-324, 1e-300]), st.floats(min_value=1e-6, max_value=1.0)),
    top_k=st.one_of(st.just(0), st.integers(1, 50), st.sampled_from([1 << 40, (1 << 63) - 1, 1 << 80])),
    seed=st.one_of(st.none(), st.sampled_from([0, -(1 << 63), (1 << 63) - 1, (1 << 64) - 1]),
                   st.integers(-(1 << 63), (1 << 64) - 1)),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
    ignore_eos=st.booleans(),
)


@pytest.fixture(scope="module")
def engine_and_solo(tiny_base):
    tok = tiny_base.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=4096))
    solo = [texts(engine.generate([(ids, greedy(6), None)]))[0] for ids in prompts]  # one at a time
    return engine, prompts, solo


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(st.integers(0, len(PROMPTS) - 1), sampled), min_size=1, max_size=5),
       greedy_rows=st.lists(st.integers(0, len(PROMPTS) - 1), min_size=1, max_size=2))
def test_random_parameters_in_one_batch(engine_and_solo, requests, greedy_rows):
    engine, prompts, solo = engine_and_solo
    batch = [(prompts[i], params, None) for i, params in requests] + [(prompts[i], greedy(6), None) for i in greedy_rows]
    results = engine.generate(batch)
    for outs in results:
        assert outs[-1].finished and outs[-1].finish_reason in ("stop", "length"), outs[-1]
        assert outs[-1].error is None
    assert texts(results[len(requests):]) == [solo[i] for i in greedy_rows]
    assert engine.alive and engine.blocks.num_used == 0 and not engine.scheduler.has_work()
