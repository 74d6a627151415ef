"""Incremental detokenization and stop strings.

Text is decoded from a small window of recent tokens (so each step costs O(1) tokens, not the
whole output), incomplete UTF-8 sequences are held back, and the tail that could still become a
stop string is held back from the stream until it can't.
"""
from __future__ import annotations

from typing import Callable

from .sequence import Sequence


def batch_decoder(tokenizer) -> Callable[[list[list[int]]], list[str]]:
    """Decodes many id lists in one call: the fast tokenizer's backend when it decodes exactly like
    `tokenizer.decode` (checked on a probe), else one `decode` per list. A step decodes two small
    windows per row; one backend call for the whole batch saves most of that host time."""
    slow = lambda windows: [tokenizer.decode(w, skip_special_tokens=True) for w in windows]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return slow
    fast = lambda windows: backend.decode_batch(windows, skip_special_tokens=True)
    vocab = len(tokenizer)
    probe = [[(i * 7919 + j * 104729) % vocab for j in range(n)] for i, n in enumerate((1, 2, 3, 5, 8) * 8)]
    try:
        return fast if fast(probe) == slow(probe) else slow
    except Exception:
        return slow


def append_token_texts(decode: Callable[[list[list[int]]], list[str]], seqs: list[Sequence]) -> None:
    """Extend each seq.text with the text of its newest token(s)."""
    windows = []
    for seq in seqs:
        windows += [seq.token_ids[seq.prefix_offset:seq.read_offset], seq.token_ids[seq.prefix_offset:]]
    texts = decode(windows) if windows else []
    for seq, prefix, full in zip(seqs, texts[0::2], texts[1::2]):
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.token_ids)


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
