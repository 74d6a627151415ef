"""The server keeps long-lived objects out of the collector's scans, and times the collector."""
from __future__ import annotations

import gc

from loraplex.runtime.gc_timer import gc_timer


def test_gc_timer_counts_collections_and_their_time():
    before_s, before_full = gc_timer.seconds, gc_timer.full_collections
    junk = [[i] for i in range(20000)]
    gc.collect()
    assert gc_timer.full_collections >= before_full + 1
    assert gc_timer.seconds > before_s
    del junk


def test_heap_freezing_is_the_server_process_policy_and_refcounting_still_frees(monkeypatch):
    import weakref

    from loraplex.runtime import gc_timer as module

    class Box:
        pass

    monkeypatch.setattr(module, "_freezing", False)
    frozen = gc.get_freeze_count()
    module.freeze_new()  # a library user (tests, a Ray replica before serve) keeps its heap as it is
    assert gc.get_freeze_count() == frozen
    box = Box()
    ref = weakref.ref(box)
    try:
        module.enable_heap_freezing()
        assert gc.get_freeze_count() > frozen
        module.freeze_new()
        del box
        assert ref() is None  # frozen, yet freed by refcount as soon as the last reference goes
    finally:
        gc.unfreeze()
