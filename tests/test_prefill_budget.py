"""A long prompt must not starve running streams: while decode rows run, prefill is cut to a per-step
budget (the scheduler), sized on the CPU from measured step times (the engine)."""
from __future__ import annotations

import math
import time

import pytest
import torch

from loraplex.runtime.base_model import default_model_dir, load_base_model
from loraplex.runtime.block_manager import BlockManager
from loraplex.runtime.engine import Engine, EngineConfig
from loraplex.runtime.prefill_budget import PrefillBudget
from loraplex.runtime.scheduler import Scheduler
from loraplex.runtime.sequence import SamplingParams, Sequence


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def computed(batch) -> None:
    """What the engine does after a step: the tokens are in the cache, finished prompts get a token."""
    for seq, n in batch:
        seq.num_computed += n
        if seq.num_computed == len(seq):
            seq.token_ids.append(7)


def test_long_prompt_is_cut_to_the_budget_while_a_row_decodes():
    scheduler = Scheduler(BlockManager(512, 16), None, max_num_seqs=8, max_batched_tokens=2048)
    scheduler.prefill_budget = 256
    stream = Sequence(list(range(1, 11)), greedy(100), None, lambda out: None)
    scheduler.add(stream)
    computed(scheduler.schedule())  # its prompt, alone
    long = Sequence(list(range(1, 3001)), greedy(1), None, lambda out: None)
    scheduler.add(long)
    steps = 0
    while long.num_computed < 3000:
        batch = scheduler.schedule()
        rows = {seq.id: n for seq, n in batch}
        assert rows[stream.id] == 1  # the decode row runs every step
        assert rows[long.id] == min(256, 3000 - long.num_computed)
        computed(batch)
        steps += 1
    assert steps == math.ceil(3000 / 256)


def test_without_decode_rows_a_prompt_takes_the_whole_step():
    scheduler = Scheduler(BlockManager(512, 16), None, max_num_seqs=8, max_batched_tokens=2048)
    scheduler.prefill_budget = 256
    long = Sequence(list(range(1, 3001)), greedy(1), None, lambda out: None)
    scheduler.add(long)
    assert [n for _, n in scheduler.schedule()] == [2048]


def test_decode_rows_are_scheduled_before_prefill_chunks():
    scheduler = Scheduler(BlockManager(512, 16), None, max_num_seqs=8, max_batched_tokens=64)
    stream = Sequence([1, 2, 3], greedy(10), None, lambda out: None)
    scheduler.add(stream)
    computed(scheduler.schedule())
    long = Sequence(list(range(1, 201)), greedy(1), None, lambda out: None)
    scheduler.add(long)
    computed(scheduler.schedule())  # no budget set: long takes the step's remaining 63 tokens
    scheduler.running.reverse()  # long listed first, with more prompt left than the step holds
    rows = {seq.id: n for seq, n in scheduler.schedule()}
    assert rows == {stream.id: 1, long.id: 63}


@pytest.fixture(scope="module")
def long_context_base(tmp_path_factory):
    """A small random Llama with a 4k context: 2,048-token steps cost enough to see a stall."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    out = tmp_path_factory.mktemp("long-llama")
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return load_base_model(str(out), dtype="float32", device="cpu")


@pytest.fixture
def one_thread():
    """Timings compared within a test hold up on a busy machine with one thread; two OpenMP threads
    stall at every barrier whenever the other one is descheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_running_stream_keeps_pace_while_a_long_prompt_is_admitted(long_context_base, one_thread):
    # no prefix caching: the warm-up prompt is submitted again and must be prefilled again, in chunks
    engine = Engine(long_context_base, EngineConfig(kv_cache_tokens=4096, max_step_seconds=0.02, prefix_caching=False))
    long_prompt = torch.randint(100, 40000, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate([(long_prompt, greedy(1), None)])  # warm-up
    # the stall the budget prevents: the long prompt's first step with no decode rows (2,048 tokens)
    engine.submit(long_prompt, greedy(1), None, lambda out: None)
    engine._drain_inbox()
    started = time.perf_counter()
    engine.step()
    unchunked_step = time.perf_counter() - started
    while engine.scheduler.has_work():
        engine.step()

    stream_times, long_outputs = [], []
    engine.submit([1, 2, 3, 4, 5], greedy(400), None, lambda out: stream_times.append(time.perf_counter()))
    for _ in range(3):
        engine._drain_inbox()
        engine.step()
    engine.submit(long_prompt, greedy(1), None, long_outputs.append)
    engine._drain_inbox()
    before, steps = len(stream_times), 0
    while not long_outputs and steps < 300:  # bounds the test: ~3000 / 32 steps at the smallest chunk
        engine.step()
        steps += 1
    assert long_outputs, "the long prompt did not finish prefilling"
    assert len(stream_times) - before == steps  # the stream got a token at every step
    assert steps >= 3  # so the prompt went in chunks
    worst_gap = max(b - a for a, b in zip(stream_times[before - 1:], stream_times[before:]))
    assert worst_gap < 0.5 * unchunked_step, (worst_gap, unchunked_step, steps)
    assert engine.scheduler.prefill_budget < 2048



def test_cuda_budget_grows_when_steps_are_cheap_and_never_falls_below_the_chunk():
    budget = PrefillBudget("cuda", initial_tokens=512, max_tokens=2048)
    assert budget.target_seconds == 0.05 and budget.tokens == 512
    for _ in range(5):
        budget.measure(2048, 0.012)  # 1B: a 2,048-token step in 12 ms
    assert budget.tokens == 2048
    for _ in range(40):
        budget.measure(32, 0.060)  # 8B: decode rows alone take the whole target
    assert budget.tokens == 512


def test_one_stalled_step_does_not_collapse_the_budget():
    budget = PrefillBudget("cpu", initial_tokens=512, max_tokens=2048)
    assert budget.target_seconds == 0.25
    for _ in range(5):
        budget.measure(256, 0.1)  # 0.39 ms a token: budget 640
    assert budget.tokens == 640
    budget.measure(256, 30.0)  # a kernel compile inside one step
    assert budget.tokens > 640 / 3  # unclipped: 640 / 35
    for _ in range(10):
        budget.measure(256, 0.1)
    assert budget.tokens > 600
    for _ in range(40):
        budget.measure(32, 1.0)  # decode rows alone over the target: the CPU floor
    assert budget.tokens == 32
