"""Incremental detokenization and stop strings.

Text is decoded from a small window of recent tokens (so each step costs O(1) tokens, not the
whole output), incomplete UTF-8 sequences are held back, and the tail that could still become a
stop string is held back from the stream until it can't.
"""
from __future__ import annotations

from .sequence import Sequence


def append_token_text(tokenizer, seq: Sequence) -> None:
    """Extend seq.text with the text of its newest token(s)."""
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.text += full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


def find_stop(seq: Sequence, previous_len: int) -> int | None:
    """Index in seq.text where the earliest stop string starts, if one appeared in the new text."""
    stops = seq.params.stop
    if not stops:
        return None
    window_start = max(previous_len - max(len(s) for s in stops) + 1, 0)
    hits = [i for i in (seq.text.find(s, window_start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def releasable_text(seq: Sequence, finished: bool) -> str:
    """Text not yet streamed that can no longer turn into a stop string."""
    end = len(seq.text)
    if not finished and seq.params.stop:
        end = max(end - max(len(s) for s in seq.params.stop) + 1, seq.emitted_chars)
    out = seq.text[seq.emitted_chars:end]
    seq.emitted_chars = end
    return out
