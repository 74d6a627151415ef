"""The server keeps long-lived objects out of the collector's scans, and times the collector."""
from __future__ import annotations

import gc

from loraplex.runtime.gc_timer import freeze_heap, gc_timer


def test_gc_timer_counts_collections_and_their_time():
    before_s, before_full = gc_timer.seconds, gc_timer.full_collections
    junk = [[i] for i in range(20000)]
    gc.collect()
    assert gc_timer.full_collections >= before_full + 1
    assert gc_timer.seconds > before_s
    del junk


def test_freeze_heap_exempts_live_objects_and_refcounting_still_frees_them():
    import weakref

    class Box:
        pass

    box = Box()
    ref = weakref.ref(box)
    freeze_heap()
    try:
        assert gc.get_freeze_count() > 0
        del box
        assert ref() is None  # frozen, yet freed by refcount as soon as the last reference goes
    finally:
        gc.unfreeze()
