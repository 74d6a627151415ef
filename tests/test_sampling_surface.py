"""The OpenAI sampling surface: penalties, logit_bias, min_tokens, stop_token_ids, logprobs and n.

Unit tests on the sampler with hand-made logits, an engine test on a tiny random model, and
end-to-end tests with the official `openai` client (and the gRPC client) against a real server.
"""
from __future__ import annotations

import time

import httpx
import pytest
import torch

from loraplex.runtime.base_model import load_base_model
from loraplex.runtime.engine import Engine, EngineConfig, RequestError
from loraplex.runtime.sampler import process_logits, sample, token_logprobs
from loraplex.runtime.sequence import SamplingParams, Sequence


def seq(prompt=(1, 2, 3), generated=(), **params) -> Sequence:
    s = Sequence(list(prompt), SamplingParams(**params), None, lambda o: None)
    s.token_ids += list(generated)
    return s


# -- the sampler, on hand-made logits ----------------------------------------------------------
def test_frequency_and_presence_penalties_follow_openai_over_generated_tokens():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5]])
    s = seq(prompt=[4], generated=[2, 2, 3], frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(logits, [s])
    # token 2 twice, token 3 once; token 4 is only in the prompt: untouched
    expected = logits.clone()
    expected[0, 2] -= 0.5 * 2 + 0.25
    expected[0, 3] -= 0.5 * 1 + 0.25
    assert torch.equal(out, expected)


def test_repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    s = seq(prompt=[0, 1], generated=[3], repetition_penalty=2.0)
    out = process_logits(logits, [s])
    assert out.tolist() == [[1.0, -4.0, 3.0, -2.0, 0.5]]


def test_logit_bias_is_added_and_can_force_or_ban_a_token():
    logits = torch.zeros(2, 6)
    logits[:, 1] = 5.0
    rows = [seq(temperature=0.0, logit_bias={4: 100.0}), seq(temperature=0.0, logit_bias={1: -100.0, 2: 1.5})]
    out = process_logits(logits, rows)
    assert out[0, 4] == 100.0 and out[1, 1] == -95.0 and out[1, 2] == 1.5
    assert sample(logits, rows) == [4, 2]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(1, 8)
    logits[0, 7] = 10.0  # EOS, the favourite
    logits[0, 6] = 9.0  # a stop token id, second
    def row(generated, **kw):
        s = seq(generated=[5] * generated, temperature=0.0, min_tokens=3, stop_token_ids=[6], **kw)
        s.eos_token_ids = frozenset({7})
        return s
    assert sample(logits.expand(3, 8), [row(0), row(2), row(3)]) == [0, 0, 7]
    assert sample(logits, [row(0, ignore_eos=True)]) == [7]  # EOS does not stop it: nothing to mask
    # the raw logits' log-softmax is reported, not the masked one
    masked = row(0, logprobs=1)
    [lp] = token_logprobs(logits, [masked], [0])
    assert lp.logprob == pytest.approx(float(torch.log_softmax(logits, 1)[0, 0]))
    assert lp.top == [(7, pytest.approx(float(torch.log_softmax(logits, 1)[0, 7])))]


def test_penalties_leave_other_rows_of_the_batch_alone():
    logits = torch.randn(3, 50)
    rows = [seq(generated=[1, 1], frequency_penalty=2.0), seq(generated=[1, 1]), seq(logit_bias={3: 7.0})]
    out = process_logits(logits, rows)
    assert torch.equal(out[1], logits[1])
    assert out[0, 1] == logits[0, 1] - 4.0 and out[2, 3] == logits[2, 3] + 7.0


def test_token_logprobs_are_the_raw_log_softmax_with_top_n():
    logits = torch.randn(3, 40)
    rows = [seq(logprobs=3), seq(), seq(logprobs=0, frequency_penalty=1.0, generated=[5])]
    tokens = [5, 6, 7]
    lps = token_logprobs(logits, rows, tokens)
    reference = torch.log_softmax(logits, 1)
    assert lps[1] is None
    assert lps[0].token_id == 5 and lps[0].logprob == pytest.approx(float(reference[0, 5]))
    top = torch.topk(reference[0], 3)
    assert [t for t, _ in lps[0].top] == top.indices.tolist()
    assert [v for _, v in lps[0].top] == pytest.approx(top.values.tolist())
    assert lps[2].top == [] and lps[2].logprob == pytest.approx(float(reference[2, 7]))


def test_choices_of_a_seeded_request_derive_distinct_reproducible_seeds():
    params = SamplingParams(seed=-5)
    seeds = [params.for_choice(i).seed for i in range(4)]
    assert seeds[0] == -5 and len(set(seeds)) == 4
    assert seeds == [SamplingParams(seed=-5).for_choice(i).seed for i in range(4)]
    assert SamplingParams().for_choice(2).seed is None  # unseeded: each choice draws its own


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3, "frequency_penalty"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("logit_bias", {1: 101.0}, "logit_bias"),
    ("logit_bias", {-1: 1.0}, "logit_bias"), ("min_tokens", 99, "min_tokens"),
    ("stop_token_ids", [True], "stop_token_ids"), ("logprobs", 21, "logprobs"),
])
def test_sampling_params_refuse_out_of_range_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(max_tokens=16, **{field: value}).validate(vocab_size=100)


def test_token_ids_beyond_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match=r"stop_token_ids.*\[0, 100\)"):
        SamplingParams(stop_token_ids=[100]).validate(vocab_size=100)


# -- the engine, on a tiny random model ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_engine_stop_token_ids_min_tokens_and_logprobs(tiny_base):
    prompt = tiny_base.tokenizer("a tiny model")["input_ids"]
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=2048))
    free = tokens_of(engine.generate([(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                                       None)])[0])
    stop_at = free[2]
    first = free.index(stop_at)
    stopped, held, logged = engine.generate([
        (prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]), None),
        (prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at],
                                min_tokens=8), None),
        (prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2), None)])
    assert tokens_of(stopped) == free[:first + 1] and stopped[-1].finish_reason == "stop"
    assert len(tokens_of(held)) == 8 and stop_at not in tokens_of(held) and held[-1].finish_reason == "length"
    entries = [lp for o in logged for lp in o.logprobs]
    assert [e.token_id for e in entries] == free[:4]
    reference = engine.score([(prompt + free[:3], None)])[0][len(prompt) - 1:]
    for e, row in zip(entries, reference):
        assert e.logprob == pytest.approx(float(torch.log_softmax(row, 0)[e.token_id]), abs=1e-4)
        assert len(e.top) == 2 and e.top[0][0] == e.token_id  # greedy: the chosen token is the top one


def test_engine_refuses_a_bias_on_a_token_outside_the_vocabulary(tiny_base):
    engine = Engine(tiny_base, EngineConfig(kv_cache_tokens=1024))
    vocab = tiny_base.config.vocab_size
    with pytest.raises(RequestError, match="logit_bias"):
        engine.check([1, 2], SamplingParams(logit_bias={vocab: 1.0}))


# -- end to end: the official openai client against a real server (fp32) --------------------------
@pytest.fixture(scope="module")
def oai(fp32_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{fp32_server.url}/v1", api_key="unused", timeout=120, max_retries=0)


PROMPT = "The three primary colours are"


def test_n_choices_with_a_seed_are_reproducible(oai):
    ask = lambda: oai.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3)
    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # each choice has its own seed
    assert first.usage.completion_tokens == 24  # 8 per choice (the prompt counted once)
    chat = lambda: oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "Name a fruit."}],
                                               max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.message.content for c in chat().choices] == [c.message.content for c in chat().choices]


def greedy_reference(prompt_ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """The default model's own greedy tokens and the log-softmax at each step, computed directly."""
    from conftest import peft_reference
    model = peft_reference(None)
    ids = list(prompt_ids)
    rows = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            rows.append(torch.log_softmax(logits, 0))
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):], torch.stack(rows)


def test_logprobs_equal_the_log_softmax_of_the_model_logits(oai, default_tokenizer):
    prompt_ids = default_tokenizer(PROMPT)["input_ids"]
    tokens, reference = greedy_reference(prompt_ids, 5)
    r = oai.completions.create(model="base", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [default_tokenizer.decode([t]) for t in tokens]
    assert lp.token_logprobs == pytest.approx([float(reference[i, t]) for i, t in enumerate(tokens)], abs=2e-3)
    for i, top in enumerate(lp.top_logprobs):
        values, ids = torch.topk(reference[i], 3)
        assert list(top) == [default_tokenizer.decode([t]) for t in ids.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=2e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    chat = oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert c.bytes == list(c.token.encode("utf-8")) and c.logprob <= 0


def test_penalties_bias_and_stop_tokens_change_outputs_as_defined(oai, default_tokenizer):
    prompt = "one one one one one one one"
    base = oai.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0)
    penalized = oai.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0, presence_penalty=2.0,
                                       frequency_penalty=2.0, extra_body={"repetition_penalty": 1.5})
    assert base.choices[0].text != penalized.choices[0].text
    forced_id = default_tokenizer(" blue")["input_ids"][0]
    forced = oai.completions.create(model="base", prompt=prompt, max_tokens=3, temperature=0,
                                    logit_bias={str(forced_id): 100})
    assert forced.choices[0].text == " blue" * 3
    first = default_tokenizer(base.choices[0].text)["input_ids"][0]
    stopped = oai.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"stop_token_ids": [first]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    held = oai.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [first], "min_tokens": 8, "repetition_penalty": 1.0})
    assert held.usage.completion_tokens == 8 and held.choices[0].finish_reason == "length"


def test_unsupported_fields_are_400_naming_them(oai):
    import openai
    for fields, name in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"extra_body": {"best_of": 2}}, "best_of")):
        with pytest.raises(openai.BadRequestError, match=name) as e:
            oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                        **fields)
        assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="echo"):
        oai.completions.create(model="base", prompt="hi", max_tokens=2, echo=True, logprobs=1)


def test_streams_carry_each_choice_index_and_logprobs(oai):
    kw = dict(model="base", prompt=PROMPT, max_tokens=6, temperature=0.8, seed=5, n=2, logprobs=1)
    whole = oai.completions.create(**kw)
    texts, tokens = ["", ""], [[], []]
    for chunk in oai.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]

    chat_kw = dict(model="base", messages=[{"role": "user", "content": "Count."}], max_tokens=5, temperature=0.8,
                   seed=5, n=2, logprobs=True)
    whole = oai.chat.completions.create(**chat_kw)
    texts, entries = ["", ""], [[], []]
    for chunk in oai.chat.completions.create(stream=True, **chat_kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            entries[c.index] += c.logprobs.content if c.logprobs else []
    assert texts == [c.message.content for c in whole.choices]
    assert [[e.token for e in es] for es in entries] == [[e.token for e in c.logprobs.content] for c in whole.choices]


def test_grpc_n_choices_logprobs_and_penalties_equal_http(fp32_server, oai):
    from loraplex.client.grpc import GrpcClient, GrpcError
    kw = dict(max_tokens=5, temperature=0.9, seed=21)
    http = oai.completions.create(model="base", prompt=PROMPT, n=2, logprobs=2, frequency_penalty=1.0,
                                  logit_bias={"13": -100}, **kw)
    with GrpcClient(fp32_server.grpc_target) as client:
        unary = client.complete("base", PROMPT, n=2, logprobs=2, frequency_penalty=1.0, logit_bias={13: -100}, **kw)
        assert [c.text for c in unary.choices] == [c.text for c in http.choices] and unary.text == http.choices[0].text
        assert unary.usage.completion_tokens == http.usage.completion_tokens
        for mine, theirs in zip(unary.choices, http.choices):
            assert [e.token for e in mine.logprobs] == theirs.logprobs.tokens
            assert [e.logprob for e in mine.logprobs] == pytest.approx(theirs.logprobs.token_logprobs, abs=1e-4)  # fp32: batch composition changes rounding
            assert all(len(e.top_logprobs) == 2 for e in mine.logprobs)
        texts = ["", ""]
        for chunk in client.complete_stream("base", PROMPT, n=2, logprobs=2, frequency_penalty=1.0,
                                            logit_bias={13: -100}, **kw):
            texts[chunk.index] += chunk.text
            assert len(chunk.logprobs) == len(chunk.token_ids)
        assert texts == [c.text for c in http.choices]
        for bad, name in (({"n": 17}, "n must"), ({"logit_bias": {1: 200.0}}, "logit_bias"),
                          ({"stop_token_ids": [1 << 30]}, "stop_token_ids")):
            with pytest.raises(GrpcError, match=name) as e:
                client.complete("base", PROMPT, max_tokens=2, **bad)
            assert e.value.code.name == "INVALID_ARGUMENT"


def test_a_client_that_leaves_aborts_every_choice(fp32_server):
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 300, "temperature": 1.0, "n": 3, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{fp32_server.url}/v1/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = fp32_server.client.get("/health").json()
        if health["in_flight"] == 0 and health["running"] == 0:
            break
        time.sleep(0.2)
    assert (health["in_flight"], health["running"]) == (0, 0)
