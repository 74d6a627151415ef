"""Engine behaviour on a tiny random model: continuous batching, chunked prefill, preemption,
adapter slots under pressure, aborts — each checked against requests run one at a time."""
from __future__ import annotations

import pytest
import torch

from loraplex.runtime.adapters.peft_format import AdapterWeights, ModuleDelta
from loraplex.runtime.adapters.registry import AdapterRef
from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import Engine, EngineConfig, RequestError
from loraplex.runtime.model import PROJECTIONS
from loraplex.runtime.sequence import SamplingParams


def random_adapter(shapes, num_layers, *, k=1, rank=8, hybrid=0, seed=0, projections=PROJECTIONS) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(num_layers):
        for p in projections:
            fin, fout = shapes[p]
            gA = torch.randn(fin, hybrid, generator=g) * 0.3 if hybrid else None
            gB = torch.randn(hybrid, fout, generator=g) * 0.3 if hybrid else None
            modules[(layer, p)] = ModuleDelta(k, torch.randn(k, fin // k, rank, generator=g) * 0.3,
                                              torch.randn(k, rank, fout // k, generator=g) * 0.3, 0.5, gA, gB)
    return AdapterWeights("GRALORA" if k > 1 else "LORA", rank + hybrid, {}, modules)


@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def adapters(tiny_base):
    shapes, n = tiny_base.projection_shapes, tiny_base.num_layers
    made = [random_adapter(shapes, n, rank=8, seed=1), random_adapter(shapes, n, k=2, rank=4, seed=2),
            random_adapter(shapes, n, k=4, rank=16, hybrid=4, seed=3),
            random_adapter(shapes, n, rank=2, seed=4, projections=("q_proj", "down_proj"))]
    return [AdapterRef(f"a{i}", 1, w) for i, w in enumerate(made)]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def texts(results):
    return [[t for o in outs for t in o.token_ids] for outs in results]


def solo(base, requests):
    out = []
    for req in requests:
        engine = Engine(base, EngineConfig(max_gpu_adapters=1, kv_cache_tokens=1024))
        out += texts(engine.generate([req]))
    return out


def test_mixed_batch_equals_solo_runs(tiny_base, adapters):
    tok = tiny_base.tokenizer
    prompts = ["hello world", "a much longer prompt with several more tokens in it", "x", "one two three four"]
    requests = [(tok(p)["input_ids"], greedy(10), a) for p in prompts for a in adapters + [None]]
    engine = Engine(tiny_base, EngineConfig(max_gpu_adapters=4, kv_cache_tokens=4096))
    batched = texts(engine.generate(requests))
    assert batched == solo(tiny_base, requests)
    assert len({tuple(t) for t in batched[:5]}) >= 4  # adapters change the output


def test_chunked_prefill_and_preemption_keep_outputs(tiny_base, adapters):
    tok = tiny_base.tokenizer
    prompt = tok(" ".join(f"word{i}" for i in range(40)))["input_ids"]
    requests = [(prompt, greedy(24), adapters[i % 4]) for i in range(6)]
    # 7-token steps force chunked prefill; 12 blocks of 16 cannot hold six ~64-token sequences: preemption
    engine = Engine(tiny_base, EngineConfig(max_gpu_adapters=4, kv_cache_tokens=12 * 16, max_batched_tokens=7))
    assert texts(engine.generate(requests)) == solo(tiny_base, requests)
    assert engine.scheduler.preemptions > 0
    assert engine.blocks.num_used == 0


def test_more_adapters_than_slots(tiny_base, adapters):
    tok = tiny_base.tokenizer
    requests = [(tok("slot pressure")["input_ids"], greedy(6), adapters[i % 4]) for i in range(8)]
    engine = Engine(tiny_base, EngineConfig(max_gpu_adapters=2, kv_cache_tokens=2048))
    assert texts(engine.generate(requests)) == solo(tiny_base, requests)
    assert engine.slots.loads >= 4 and engine.slots.evictions >= 2
    assert len(engine.slots.resident) <= 2


def test_new_requests_join_a_running_batch(tiny_base):
    tok = tiny_base.tokenizer
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=2048))
    events = []
    engine.submit(tok("first")["input_ids"], greedy(30), None, lambda o: events.append(("A", o.finished)))
    for _ in range(5):
        engine._drain_inbox()
        engine.step()
    engine.submit(tok("second")["input_ids"], greedy(3), None, lambda o: events.append(("B", o.finished)))
    while engine.scheduler.has_work() or engine._inbox:
        engine._drain_inbox()
        engine.step()
    b_done = events.index(("B", True))
    assert ("A", True) in events[b_done:]  # B joined, ran and left while A kept decoding
    assert events[5:7] == [("A", False), ("B", False)]  # B's first token came at the very next step


def test_abort_frees_blocks_and_slot(tiny_base, adapters):
    tok = tiny_base.tokenizer
    engine = Engine(tiny_base, EngineConfig(max_gpu_adapters=1, kv_cache_tokens=2048))
    outs = []
    rid = engine.submit(tok("abort me")["input_ids"], greedy(100), adapters[0], outs.append)
    for _ in range(3):
        engine._drain_inbox()
        engine.step()
    assert engine.blocks.num_used > 0
    engine.abort(rid)
    engine._drain_inbox()
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work()
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert engine.slots._pins == [0]


def test_request_checks(tiny_base):
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=256))
    with pytest.raises(RequestError, match="context"):
        engine.check([1] * 200, greedy(100))
    with pytest.raises(RequestError, match="empty"):
        engine.check([], greedy(1))
    with pytest.raises(RequestError, match="token ids"):
        engine.check([10 ** 9], greedy(1))


def test_stop_string_found_in_the_overlap_drops_the_extra_token(tiny_base):
    """The host work of step n (detokenising, stop strings) runs while step n+1 computes, so a row ended by a
    stop string was launched once more: that token must reach neither the output nor the counts (here it
    would also have been the row's last by length: a second ending), and the rows beside it must go on
    exactly as alone."""
    tok = tiny_base.tokenizer
    prompt = tok("Hello there, how are you")["input_ids"]
    other = tok("The quick brown fox")["input_ids"]
    free = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024)).generate([(prompt, greedy(12), None)])[0]
    free_text = "".join(o.text for o in free)
    assert len(free_text) >= 6
    stop = free_text[3:6]  # a stop string that appears mid-generation
    expected = free_text[:free_text.index(stop)]
    completes_at = next(i for i in range(len(free)) if stop in "".join(o.text for o in free[:i + 1]))
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024))
    params = SamplingParams(max_tokens=completes_at + 2, temperature=0.0, ignore_eos=True, stop=[stop])
    stopped, beside = engine.generate([(prompt, params, None), (other, greedy(12), None)])
    assert [o.finished for o in stopped].count(True) == 1 and stopped[-1].finish_reason == "stop"
    assert "".join(o.text for o in stopped) == expected
    tokens = [t for o in stopped for t in o.token_ids]
    assert tokens == [t for o in free for t in o.token_ids][:completes_at + 1]
    assert stopped[-1].completion_tokens == completes_at + 1  # none past the token that completed the stop
    assert texts([beside]) == solo(tiny_base, [(other, greedy(12), None)])
    assert engine.tokens_generated == completes_at + 1 + 12
    assert not engine.scheduler.has_work() and engine.blocks.num_used == 0 and not engine._pending


def test_a_consumer_failing_in_the_overlap_ends_only_its_request(tiny_base):
    tok = tiny_base.tokenizer
    prompts = [tok(p)["input_ids"] for p in ("One two three", "Four five six")]
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024))
    seen = []

    def failing(out):
        seen.append(out)
        if len(seen) == 3:
            raise RuntimeError("client went away")

    engine.submit(prompts[0], greedy(10), None, failing)
    results = []
    engine.submit(prompts[1], greedy(10), None, results.append)
    engine._drain_inbox()
    while engine.scheduler.has_work():
        engine.step()
    engine.flush()
    assert len(seen) == 3  # nothing more reached the failed consumer
    assert results[-1].finished and results[-1].finish_reason == "length" and results[-1].completion_tokens == 10
    assert texts([results]) == solo(tiny_base, [(prompts[1], greedy(10), None)])
    assert engine.blocks.num_used == 0


def test_adapters_pack_once_one_at_a_time_and_a_packed_one_never_waits(tiny_base, adapters):
    """prepare_adapter packs each adapter once (two threads preparing one: the second finds it packed), one
    adapter's host work at a time in the process (ADAPTER_HOST_WORK: another adapter's pack waits for the slow one),
    and an adapter already packed returns at once, not behind a pack in progress."""
    import threading
    import time

    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024))
    slow, fast, ready = (AdapterRef(ref.id, 1, random_adapter(tiny_base.projection_shapes, tiny_base.num_layers,
                                                               seed=9 + i)) for i, ref in enumerate(adapters[:3]))
    calls, started, packed = [], threading.Event(), {id(ready.weights)}

    def timed_prepare(weights):
        begin = time.perf_counter()
        if weights is slow.weights:
            started.set()
            time.sleep(0.5)
        packed.add(id(weights))
        calls.append((weights, begin, time.perf_counter()))
    engine.ops.prepare = timed_prepare
    engine.ops.prepared = lambda weights: id(weights) in packed
    threads = [threading.Thread(target=engine.prepare_adapter, args=(slow,)) for _ in range(2)]
    threads[0].start()
    assert started.wait(10)
    threads[1].start()
    t = time.perf_counter()
    engine.prepare_adapter(ready)
    assert time.perf_counter() - t < 0.25  # packed already: not behind the slow pack
    engine.prepare_adapter(fast)
    for thread in threads:
        thread.join()
    assert sum(w is slow.weights for w, _, _ in calls) == 1  # the second thread found it packed
    [(_, _, slow_end)] = [c for c in calls if c[0] is slow.weights]
    [(_, fast_begin, _)] = [c for c in calls if c[0] is fast.weights]
    assert fast_begin >= slow_end  # one adapter's host work at a time
    assert not any(w is ready.weights for w, _, _ in calls)


def test_a_running_engine_takes_the_gil_back_within_a_millisecond(tiny_base):
    """Each step gives the GIL up while it waits for the device: a started engine sets the interpreter's switch
    interval to at most GIL_SWITCH_SECONDS, so a thread running Python (an adapter being parsed) hands it back
    that soon instead of after the default 5 ms."""
    import sys
    from loraplex.runtime.engine import GIL_SWITCH_SECONDS
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=256))
    try:
        engine.start()
        assert sys.getswitchinterval() <= GIL_SWITCH_SECONDS <= 0.001
    finally:
        engine.stop()
        sys.setswitchinterval(before)


def test_folding_prefill_adapters_needs_the_triton_ops(tiny_base):
    """--fold-prefill-adapters (kernels/lora_fold.py) is a Triton-ops feature: asked of the PyTorch ops, the engine
    refuses to start with a reason instead of ignoring the flag; off (the default), nothing folds."""
    with pytest.raises(ValueError, match="Triton adapter ops"):
        Engine(tiny_base, EngineConfig(adapter_ops="torch", fold_prefill_adapters=2))
    engine = Engine(tiny_base, EngineConfig(adapter_ops="torch"))
    assert engine.stats()["fold_blocks"] == 0 and engine.stats()["folded_steps"] == 0
