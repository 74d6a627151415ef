"""Incremental detokenization and stop strings.

Text is decoded from a small window of recent tokens (so each step costs O(1) tokens, not the
whole output), incomplete UTF-8 sequences are held back, and the tail that could still become a
stop string is held back from the stream until it can't.
"""
from __future__ import annotations

import codecs

from .sequence import Sequence


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character (as in every byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


class Detokenizer:
    """Appends the text of each sequence's newest token.

    Byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, ...) decode to the UTF-8 of their tokens'
    bytes laid end to end, so each token's bytes are looked up once at start-up and fed to the
    sequence's incremental UTF-8 decoder (incomplete characters wait for the next token) — no
    tokenizer call per step. Other tokenizers decode a small window of recent tokens per sequence,
    all sequences in one backend call. The byte table is used only if it reproduces
    `tokenizer.decode` on a probe.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.table = self._byte_table(tokenizer)

    @staticmethod
    def _byte_table(tokenizer) -> list[bytes] | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.decoder).__name__ != "ByteLevel":
            return None
        special = set(tokenizer.all_special_ids)
        char_byte = {c: b for b, c in _bytes_to_unicode().items()}
        table = []
        for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if i in special or token is None:
                table.append(b"")
            elif all(c in char_byte for c in token):
                table.append(bytes(char_byte[c] for c in token))
            else:  # an added token stored as plain text
                table.append(token.encode())
        vocab = len(table)
        probe = [[(i * 7919 + j * 104729) % vocab for j in range(n)] for i, n in enumerate((1, 2, 3, 5, 8) * 20)]
        for ids in probe:
            if b"".join(table[t] for t in ids).decode("utf-8", "replace") != tokenizer.decode(ids, skip_special_tokens=True):
                return None
        return table

    def append(self, seqs: list[Sequence]) -> None:
        """Extend each seq.text with the text of its newest token."""
        if self.table is not None:
            for seq in seqs:
                if seq.utf8 is None:
                    seq.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
                seq.text += seq.utf8.decode(self.table[seq.token_ids[-1]])
            return
        windows = []
        for seq in seqs:
            windows += [seq.token_ids[seq.prefix_offset:seq.read_offset], seq.token_ids[seq.prefix_offset:]]
        texts = self._decode(windows) if windows else []
        for seq, prefix, full in zip(seqs, texts[0::2], texts[1::2]):
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                seq.text += full[len(prefix):]
                seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.token_ids)

    def _decode(self, windows: list[list[int]]) -> list[str]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.decode_batch(windows, skip_special_tokens=True)
        return [self.tokenizer.decode(w, skip_special_tokens=True) for w in windows]


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
