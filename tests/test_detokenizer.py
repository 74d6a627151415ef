"""Incremental detokenization: token by token, the text equals decoding the whole output at once."""
from __future__ import annotations

import torch

from loraplex.runtime.detokenizer import Detokenizer
from loraplex.runtime.sequence import SamplingParams, Sequence


def _stream(detok: Detokenizer, tokenizer, ids: list[int]) -> str:
    seq = Sequence(tokenizer("Hello")["input_ids"], SamplingParams(), None, lambda out: None)
    for t in ids:
        seq.token_ids.append(t)
        detok.append([seq])
    if seq.utf8 is not None:
        seq.text += seq.utf8.decode(b"", final=True)
    return seq.text


def test_byte_table_and_window_paths_match_full_decode(default_tokenizer):
    tok = default_tokenizer
    fast = Detokenizer(tok)
    assert fast.table is not None  # SmolLM2 is byte-level BPE
    windowed = Detokenizer(tok)
    windowed.table = None
    g = torch.Generator().manual_seed(0)
    texts = ["naïve café — 東京 🙂 done", "def f(x):\n    return x * 2", " spaces  and\ttabs"]
    for ids in [tok(t)["input_ids"] for t in texts] + [torch.randint(0, len(tok), (40,), generator=g).tolist()]:
        expected = tok.decode(ids, skip_special_tokens=True)
        assert _stream(fast, tok, ids) == expected
        if "\ufffd" not in expected:  # the window path holds back incomplete characters at the end
            assert _stream(windowed, tok, ids) == expected
