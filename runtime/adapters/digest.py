"""The store's digest of an adapter version's two files.

A sha256 over the config's length, the config and the sha256 of each 4 MiB piece of the weights, written
`sha256-4m:<hex>`: the pieces hash on several cores, while an upload arrives (adapters/incoming.py) and when a
version is read back (store.py); one sha256 stream ran at 958 MB/s on the GPU host, below the upload's target.
CURRENT files written before 2026-12-06 hold a plain sha256 over both files; those still check as such.
"""
from __future__ import annotations

import hashlib

from .buffers import copy_threads

DIGEST_PIECE_BYTES = 4 << 20
DIGEST_PREFIX = "sha256-4m:"


def piece_digest(piece) -> bytes:
    """sha256 of one piece of the weights (hashlib releases the GIL: pieces hash in parallel)."""
    return hashlib.sha256(piece).digest()


def combine_digests(config_raw: bytes, piece_digests) -> str:
    """The adapter digest from the config and the digests of the weights' pieces, in order; the config's length
    is hashed first so bytes cannot move between the files."""
    h = hashlib.sha256(len(config_raw).to_bytes(8, "big"))
    h.update(config_raw)
    for digest in piece_digests:
        h.update(digest)
    return DIGEST_PREFIX + h.hexdigest()


def adapter_digest(config_raw: bytes, weights_raw) -> str:
    """The digest of a version's two files (the module docstring), its pieces hashed on the copy threads."""
    view = memoryview(weights_raw).cast("B")
    pieces = [view[start:start + DIGEST_PIECE_BYTES] for start in range(0, len(view), DIGEST_PIECE_BYTES)]
    digests = list(copy_threads().map(piece_digest, pieces)) if len(pieces) > 1 else map(piece_digest, pieces)
    return combine_digests(config_raw, digests)


def digest_matches(recorded: str, config_raw: bytes, weights_raw) -> bool:
    """Whether the files have the digest CURRENT records: this format, or a plain sha256 over both files."""
    if recorded.startswith(DIGEST_PREFIX):
        return adapter_digest(config_raw, weights_raw) == recorded
    h = hashlib.sha256(len(config_raw).to_bytes(8, "big"))
    h.update(config_raw)
    h.update(weights_raw)
    return h.hexdigest() == recorded
