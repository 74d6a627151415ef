"""One request fails only itself: bad parameters are refused up front, extreme-but-valid ones never
raise inside a step, a poisoned adapter or a consumer that raises ends its own request, an abort
wins wherever the request is, and an engine that dies says so instead of hanging."""
from __future__ import annotations

import math
import threading
from collections import deque

import pytest
import torch

from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.engine import Engine, EngineConfig, EngineDead, RequestError

from loraplex.runtime.sequence import SamplingParams

from test_engine import adapters, greedy, random_adapter, solo, texts, tiny_base  # noqa: F401 (fixtures)


def submit_all(engine, requests, timeout=30.0, start: bool = False) -> list[list]:
    """Submit to an engine and wait (bounded) for every request to finish. start: the engine is started
    after the last submit (every request is in before the first step)."""
    outs = [[] for _ in requests]
    done = [threading.Event() for _ in requests]
    for i, (ids, params, adapter) in enumerate(requests):
        engine.submit(ids, params, adapter, lambda out, i=i: (outs[i].append(out), out.finished and done[i].set()))
    if start:
        engine.start()
    assert all(d.wait(timeout) for d in done), "requests did not finish: the engine thread is stuck or dead"
    return outs


def engine_for(base, **kw) -> Engine:
    return Engine(base, EngineConfig(max_gpu_adapters=4, kv_cache_tokens=kw.pop("kv_cache_tokens", 2048), **kw))


@pytest.mark.parametrize("params, message", [
    (SamplingParams(temperature=math.nan), "temperature"),
    (SamplingParams(temperature=math.inf), "temperature"),
    (SamplingParams(temperature=-1e-30), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=math.nan), "top_p"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(top_k=True), "top_k"),
    (SamplingParams(max_tokens=True), "max_tokens"),
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(seed=1 << 64), "seed"),
    (SamplingParams(seed=-(1 << 63) - 1), "seed"),
    (SamplingParams(seed=1.5), "seed"),
    (SamplingParams(stop=[""]), "stop"),
])
def test_bad_parameters_refused_before_the_batch(tiny_base, params, message):
    engine = engine_for(tiny_base)
    with pytest.raises(RequestError, match=message):
        engine.submit([1, 2, 3], params, None, lambda out: None)
    assert not engine._inbox


def test_non_integer_prompt_ids_refused(tiny_base):
    engine = engine_for(tiny_base)
    with pytest.raises(RequestError, match="integers"):
        engine.check([True, False], greedy(1))
    with pytest.raises(RequestError, match="integers"):
        engine.check([1.0, 2.0], greedy(1))


EXTREME = [SamplingParams(max_tokens=6, temperature=t, top_k=k, top_p=p, seed=s, ignore_eos=True)
           for t, k, p, s in [(1e-30, 0, 1.0, 0), (5e-324, 0, 1.0, None), (1e-30, 1 << 80, 1e-300, (1 << 64) - 1),
                              (2.0, 1 << 63, 5e-324, -(1 << 63)), (1e-45, 3, 0.5, 7), (1.0, 1 << 40, 1.0, 1 << 63)]]


def test_extreme_valid_parameters_never_fail_a_step(tiny_base):
    tok = tiny_base.tokenizer
    prompt = tok("edge cases of sampling")["input_ids"]
    requests = [(prompt, p, None) for p in EXTREME] + [(prompt, greedy(6), None)]
    results = engine_for(tiny_base).generate(requests)
    assert [outs[-1].finish_reason for outs in results] == ["length"] * len(requests)
    reference = solo(tiny_base, [requests[-1]])[0]
    # a vanishing temperature is the greedy limit (a float32 zero is greedy; 1e-30 leaves the noise no say)
    assert texts(results)[0] == texts(results)[1] == texts(results)[-1] == reference


def test_poisoned_adapter_fails_only_its_request(tiny_base, adapters):
    shapes, n = tiny_base.projection_shapes, tiny_base.num_layers
    poison = random_adapter(shapes, n, seed=9)
    for m in poison.modules.values():
        m.scale = math.inf  # what an unchecked lora_alpha of inf makes; validation refuses it at upload
    poisoned = AdapterRef("poison", 1, poison)
    tok = tiny_base.tokenizer
    # the poisoned request takes block 0 first; the healthy rows decode together with different context
    # lengths, so the shorter one's padding gathers a cache slot: it must never be the poisoned K/V
    healthy = [(tok("hi")["input_ids"], greedy(8), None), (tok("a somewhat longer one")["input_ids"], greedy(8), None),
               (tok("and with an adapter")["input_ids"], greedy(8), adapters[0])]
    expected = solo(tiny_base, healthy)  # first: every engine installs its own KV cache in the shared model
    engine = engine_for(tiny_base)
    results = engine.generate([(tok("the poisoned prompt")["input_ids"], greedy(8), poisoned)] + healthy)
    assert results[0][-1].finish_reason == "error" and "non-finite" in results[0][-1].error
    assert texts(results[1:]) == expected
    # the blocks the poisoned request left behind hold no NaN/inf for their next owners
    for layer in tiny_base.model.layers:
        assert layer.self_attn.k_cache.isfinite().all() and layer.self_attn.v_cache.isfinite().all()
    assert texts(engine.generate(healthy)) == expected
    assert engine.alive and engine.blocks.num_used == 0 and engine.slots.pinned == 0


def test_a_consumer_that_raises_ends_only_its_request(tiny_base):
    tok = tiny_base.tokenizer
    engine = engine_for(tiny_base)
    engine.start()
    try:
        calls = []

        def broken(out):
            calls.append(out)
            raise RuntimeError("client went away")

        engine.submit(tok("doomed")["input_ids"], greedy(20), None, broken)
        requests = [(tok("fine one")["input_ids"], greedy(8), None), (tok("fine two")["input_ids"], greedy(8), None)]
        assert texts(submit_all(engine, requests)) == solo(tiny_base, requests)
        assert engine.alive and engine.stats()["alive"] is True
        assert len(calls) == 1  # after its consumer failed the request ended; nothing more was sent
        assert engine.blocks.num_used == 0 and not engine.scheduler.has_work()
    finally:
        engine.stop()


def test_engine_death_is_visible_and_fails_everyone(tiny_base):
    tok = tiny_base.tokenizer
    engine = engine_for(tiny_base)

    def broken_run(*args, **kwargs):
        raise RuntimeError("device fell off the bus")

    engine.runner.run = broken_run
    try:  # both requests are in before the engine starts: the first step kills it with both running
        outs = submit_all(engine, [(tok(f"request {i}")["input_ids"], greedy(5), None) for i in range(2)], start=True)
        assert all(o[-1].finish_reason == "error" and "device fell off the bus" in o[-1].error for o in outs)
        engine._thread.join(5)
        assert not engine._thread.is_alive()
        assert engine.alive is False and "device fell off the bus" in engine.error
        assert engine.stats()["alive"] is False and "device fell off the bus" in engine.stats()["error"]
        with pytest.raises(EngineDead):
            engine.submit(tok("late")["input_ids"], greedy(5), None, lambda out: None)
    finally:
        engine.stop()


class _RacingAborts(deque):
    """The engine's abort queue, which submits + aborts one request (as a transport thread would)
    at the moment the engine has just drained its inbox and turns to the aborts."""

    def __init__(self, engine, prompt, outs):
        super().__init__()
        self.engine, self.prompt, self.outs, self.raced = engine, prompt, outs, None

    def __bool__(self):
        if self.raced is None:
            self.raced = self.engine.submit(self.prompt, greedy(50), None, self.outs.append)
            self.engine.abort(self.raced)
        return super().__len__() > 0


def test_abort_in_the_same_iteration_as_submit_wins(tiny_base):
    tok = tiny_base.tokenizer
    engine = engine_for(tiny_base)
    outs = []
    engine._aborts = _RacingAborts(engine, tok("abort me at once")["input_ids"], outs)
    for _ in range(5):
        engine._drain_inbox()
        if engine.scheduler.has_work():
            engine.step()
    assert engine._aborts.raced is not None
    assert [o.finish_reason for o in outs] == ["abort"] and outs[0].completion_tokens == 0
    assert not engine.scheduler.has_work() and engine.blocks.num_used == 0


def test_abort_of_a_waiting_request(tiny_base):
    tok = tiny_base.tokenizer
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=2048, max_num_seqs=1))
    first, second = [], []
    engine.submit(tok("runs")["input_ids"], greedy(10), None, first.append)
    rid = engine.submit(tok("waits")["input_ids"], greedy(10), None, second.append)
    engine._drain_inbox()
    engine.step()
    assert engine.scheduler.waiting and engine.scheduler.waiting[0].id == rid
    engine.abort(rid)
    while engine.scheduler.has_work() or engine._aborts:
        engine._drain_inbox()
        if engine.scheduler.has_work():
            engine.step()
    assert [o.finish_reason for o in second] == ["abort"]
    assert first[-1].finish_reason == "length"


def test_seeded_sampling_touches_no_global_generator(tiny_base):
    tok = tiny_base.tokenizer
    state = torch.get_rng_state()
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)  # unseeded: the engine draws a seed
    engine_for(tiny_base).generate([(tok("hello")["input_ids"], params, None),
                                    (tok("hello")["input_ids"], SamplingParams(max_tokens=4, seed=5), None)])
    assert torch.equal(torch.get_rng_state(), state)


def test_a_graph_that_cannot_be_captured_runs_its_steps_eagerly(tiny_base):
    """A lazy capture that raises (graph pool out of memory, an uncapturable kernel) marks that key
    uncapturable instead of failing the step: its steps run eagerly, and capture is not retried per step
    (only after drop_graphs frees memory)."""
    runner = engine_for(tiny_base).runner
    attempts = []

    def failing_capture():
        attempts.append(1)
        raise RuntimeError("CUDA error: out of memory (graph pool)")

    key = (8, None, None, None)
    assert runner._graph(runner.graphs, key, failing_capture) is None
    assert runner._graph(runner.graphs, key, failing_capture) is None and len(attempts) == 1
    assert runner._graph(runner.mixed_graphs, key, failing_capture) is None and len(attempts) == 2  # its own key
    assert key not in runner.graphs and key not in runner.mixed_graphs
    captured = object()
    runner.drop_graphs()
    assert runner._graph(runner.graphs, key, lambda: captured) is captured  # retried once memory was freed
    assert runner._graph(runner.graphs, key, failing_capture) is captured and len(attempts) == 2
