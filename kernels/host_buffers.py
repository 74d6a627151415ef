"""Host memory for adapters' packed copies (kernels/ops.py prepare): pinned on CUDA, with a spare block ahead.

Pinning 84 MB took 16-41 ms of an 8B adapter's hot-load (adapter_scale_gpu.json), so after each block is handed
out another of the same size is pinned in the background, and the next request of that size takes it: one base
model's adapters mostly share their shapes (a fleet's rank and target modules). At most one spare is held; it is
no adapter's, and a request of another size replaces it with one of that size.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class HostBuffers:
    def __init__(self, dtype: torch.dtype, pinned: bool):
        self.dtype = dtype
        self.pinned = pinned
        self.spare: Future | None = None  # the next block, being allocated or ready
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="loraplex-pinned")

    def take(self, numel: int) -> torch.Tensor:
        """A block of `numel` elements: the spare when it is ready and of that size, else a new one."""
        data = None
        with self._lock:
            spare = self.spare
            if spare is not None and spare.done():
                if spare.exception() is None and spare.result().numel() == numel:
                    data = spare.result()
                spare = None  # taken, failed or of another size: the next one is of this size
            if spare is None:
                self.spare = self._thread.submit(torch.empty, numel, dtype=self.dtype, pin_memory=self.pinned)
        return torch.empty(numel, dtype=self.dtype, pin_memory=self.pinned) if data is None else data
