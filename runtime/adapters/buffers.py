"""Memory that an adapter's weights are read into and that the parsed adapter may keep (parse_adapter's
`owned`): one anonymous buffer per file or upload, so the parse keeps views of it instead of a copy of every
tensor."""
from __future__ import annotations

import mmap
import os
from pathlib import Path


def owned_buffer(size: int) -> mmap.mmap:
    """Anonymous writable memory for `size` bytes: pages are given on first write (a size far above what
    arrives, an upload without Content-Length, only reserves addresses), as huge pages where the kernel allows
    (one fault per 2 MB instead of per 4 KB: page faults dominated filling 4 KB pages on a 2-core VM)."""
    buffer = mmap.mmap(-1, max(size, 1))
    if size >= 2 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buffer


def read_weights_file(path: Path) -> memoryview:
    """A weights file's bytes in fresh writable memory that nothing else refers to: parse_adapter(owned=True)
    keeps views of it instead of copying every tensor."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = owned_buffer(size)
        view = memoryview(buffer)[:size]
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{path} shrank while it was read")
            done += n
        return view
