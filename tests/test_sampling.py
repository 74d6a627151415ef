"""Sampling and detokenization details: seeds, top-k/top-p, stop strings held back while streaming."""
from __future__ import annotations

import torch

from loraplex.runtime.detokenizer import find_stop, releasable_text
from loraplex.runtime.sampler import sample
from loraplex.runtime.sequence import SamplingParams, Sequence


def seq(**params) -> Sequence:
    return Sequence([1, 2, 3], SamplingParams(**params), None, lambda o: None)


def test_seeded_sampling_is_reproducible_and_filters_apply():
    logits = torch.randn(1, 1000)
    draws = lambda **p: [sample(logits, [s])[0] for s in [seq(seed=3, **p)] for _ in range(20)]
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
