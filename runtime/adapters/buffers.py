"""Memory that an adapter's weights are read into and that the parsed adapter may keep (parse_adapter's
`owned`): one anonymous buffer per file or upload, so the parse keeps views of it instead of a copy of every
tensor."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
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


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)  # Linux 5.14+
PREFAULT_PIECE_BYTES = 8 << 20


def _libc_madvise():
    """libc's madvise through ctypes, which lets the GIL go during the call (mmap.madvise holds it); None where
    there is no libc to load."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError, TypeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


_MADVISE = _libc_madvise() if MADV_POPULATE_WRITE is not None else None


def prefault(buffer: mmap.mmap, start: int, stop: int) -> None:
    """Give `buffer`'s pages in [start, stop) now, as writing them would, without changing what they hold (a
    page-aligned start). Fresh pages cost a fault and the kernel's zeroing each (1-2 GB/s on a 2-core VM): done
    ahead on other threads, the copy that fills them runs at memory speed. Where the kernel cannot, nothing.
    The GIL is let go meanwhile: mmap.madvise held it for the milliseconds a piece takes, and the event loop
    receiving the upload waited (47% of the GIL's samples during 8B uploads on an H100 host, py-spy)."""
    if MADV_POPULATE_WRITE is None:
        return
    try:
        if not 0 <= start < stop <= len(buffer):
            return
        if _MADVISE is None:
            buffer.madvise(MADV_POPULATE_WRITE, start, stop - start)
            return
        base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))  # (the temporary export ends with this line)
    except (OSError, ValueError, TypeError):  # closed, or the kernel cannot
        return
    _MADVISE(base + start, stop - start, MADV_POPULATE_WRITE)  # (an error, e.g. an old kernel: nothing done)


READ_PIECE_BYTES = 8 << 20  # a large file is read in pieces of this size, several at once
COPY_THREADS = 8  # threads of host memory copies: file pieces read here, an adapter's modules packed (kernels/ops.py),
                  # the store digest's pieces hashed (digest.py)
WRITE_THREADS = 4  # threads of file writes: an upload's pieces go to the disk several at once (they wait on the
                  # device, not on a core, so as many on a 2-core host)
_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=f"loraplex-{name}")
        return _pools[name]


def copy_threads() -> ThreadPoolExecutor:
    """The process's pool for host memory copies and digests (no task submits another, so none waits on one)."""
    return _pool("copy", min(COPY_THREADS, os.cpu_count() or 1))


def write_threads() -> ThreadPoolExecutor:
    """The process's pool for file writes (no task submits another)."""
    return _pool("write", WRITE_THREADS)


def _read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if not n:
            raise OSError(f"{path} shrank while it was read")
        done += n


def read_weights_file(path: Path) -> memoryview:
    """A weights file's bytes in fresh writable memory that nothing else refers to: parse_adapter(owned=True)
    keeps views of it instead of copying every tensor. A large file is read by several threads at once (the
    time goes to faulting the fresh pages in, even when the file is in the page cache: 125 ms for 168 MB on
    one core)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        buffer = owned_buffer(size)
        view = memoryview(buffer)[:size]
        pieces = [(start, min(start + READ_PIECE_BYTES, size)) for start in range(0, size, READ_PIECE_BYTES)]
        if len(pieces) <= 1:
            _read_into(fd, view, 0, path)
        else:
            list(copy_threads().map(lambda piece: _read_into(fd, view[piece[0]:piece[1]], piece[0], path), pieces))
        return view
    finally:
        os.close(fd)
