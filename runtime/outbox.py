"""Engine outputs to the event loop's consumers, one wake-up of the loop per batch.

The engine thread produces one output per running request per step; handing each over with its own
`loop.call_soon_threadsafe` costs a lock, a handle and a write to the loop's self-pipe per token, on the
engine thread that the next step waits for. An Outbox queues them and wakes the loop once: its callback
delivers everything queued by then, in order.
"""
from __future__ import annotations

import asyncio
import collections
import threading


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        """From any thread: item goes to queue.put_nowait on the loop, after everything put before it."""
        self._items.append((queue, item))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:  # an item put after this point schedules the next delivery
            self._scheduled = False
        items = self._items
        for _ in range(len(items)):
            queue, item = items.popleft()
            queue.put_nowait(item)
