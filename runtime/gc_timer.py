"""Time spent in Python's garbage collector, process-wide (gc.callbacks): the engine reports it beside its
step counters, since a full collection stops the engine thread as surely as a slow step does."""
from __future__ import annotations

import gc
import time


class GcTimer:
    def __init__(self):
        self.seconds = 0.0
        self.full_collections = 0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None
            self.full_collections += info.get("generation") == 2


gc_timer = GcTimer()
gc.callbacks.append(gc_timer)


_freezing = False  # set by the server process (enable_heap_freezing): a library user's heap is its own


def enable_heap_freezing() -> None:
    """The server process's policy: exempt every object alive now from the collector's scans (gc.freeze;
    refcounting still frees them), and from here on also each uploaded adapter's objects (freeze_new).
    Called once the server has started (model, tokenizer, graphs: a million objects that live as long as
    the process): a full collection then scans only what requests create, not the whole heap (0.2 s a
    pass on a 400k-object heap here, in the middle of a running batch)."""
    global _freezing
    _freezing = True
    gc.collect()
    gc.freeze()


def freeze_new() -> None:
    """After an adapter upload (its weights live until deleted), in the server process only. No collection
    first: it is cheap, and cyclic garbage alive at that moment is never collected."""
    if _freezing:
        gc.freeze()
