"""An upload's weights file while its bytes arrive (an HTTP multipart part, gRPC chunks).

The bytes go, block by block on a worker thread while the next bytes arrive, into one buffer of the upload's
size (its capacity: the Content-Length, a declared size), whose pages the copy threads give ahead of them
(buffers.prefault); each block, once in the buffer, goes to the weights file of a temporary directory of the
store on the write threads, several pieces at once, while the next block is copied (copying and writing one
after the other in one worker capped an upload near the disk's single-stream rate); each 4 MiB piece of the
buffer is hashed for the store's digest on the copy threads once its bytes are in (digest.py: one sha256
stream ran at 958 MB/s on the GPU host, below the wire). When the last byte is in,
the file only needs its fsync and the digest its last piece, and the parse keeps
views of the buffer (no second copy of the weights; reading the file back through a memory map and cloning
every tensor took longer than receiving it). The file is written from that buffer with O_DIRECT where the
filesystem allows it: no page-cache copy of the weights (on a 2-core VM, allocating page-cache pages for a
fresh 78 MB file took 190-440 ms, the direct writes 65-80 ms). The size limit is checked on every chunk and the
safetensors header as soon as its bytes are in, before the weights arrive. A refused upload calls
discard(), which removes the temporary directory before the refusal is answered.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import mmap
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from .peft_format import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_safetensors_header, refuse_pickle,
                          safetensors_header_length)
from .buffers import PREFAULT_PIECE_BYTES, copy_threads, owned_buffer, prefault, write_threads
from .digest import DIGEST_PIECE_BYTES, combine_digests, piece_digest
from .store import AdapterStore, Staged, fsync_dir

_SEAL_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loraplex-seal")  # (waits on the write
# and copy threads' work: never one of theirs)
BLOCK_BYTES = 4 << 20  # handed to the workers at a time: few thread hops, and the disk works while bytes arrive
SYNC_BYTES = 32 << 20  # written bytes between two fdatasync calls during an upload (page-cache writes)
WRITE_PIECE_BYTES = 2 << 20  # one write of the file (a multiple of DIRECT_ALIGN); a block goes as several at once
DIRECT_ALIGN = 4096  # O_DIRECT: memory address, file offset and length in multiples of the logical block size


def open_for_direct_writes(path: Path) -> tuple[int, bool]:
    """A new file opened for writing, with O_DIRECT where the filesystem takes it (tmpfs refuses it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError:
            pass
    return os.open(path, flags, 0o644), False


class IncomingWeights:
    """`capacity`: the most bytes this upload can carry (a declared size, a Content-Length), at most `max_bytes`.
    `weights_sha256`: also hash the weights alone, as one sha256 stream (gRPC checks a declared digest)."""

    def __init__(self, store: AdapterStore, max_bytes: int, capacity: int | None = None, weights_sha256: bool = False):
        self.max_bytes = max_bytes
        self.capacity = max_bytes if capacity is None else min(capacity, max_bytes)
        self.size = 0
        self.opened = time.perf_counter()  # the first byte of the weights
        self._pieces: list[Future] = []  # digests of the buffer's 4 MiB pieces, in order (digest.piece_digest)
        self._hashed = 0  # bytes of the buffer handed to self._pieces
        self._weights_digest = hashlib.sha256() if weights_sha256 else None
        self._head = bytearray()  # the first bytes, up to the end of the safetensors header
        self._header_end: int | None = None  # 8 + header length, once known
        self.expected_size: int | None = None  # the file's length its safetensors header describes, once checked
        self._header_checked = False
        self._pending: list = []  # chunks not yet handed to the worker
        self._pending_bytes = 0
        self._writing: asyncio.Future | None = None  # the block the worker is writing
        self._written = 0  # bytes in the buffer
        self._flushed = 0  # bytes handed to the write threads (with O_DIRECT, a multiple of DIRECT_ALIGN until the seal)
        self._synced_at = 0  # file bytes at the last fdatasync (page-cache writes)
        self._writes: list[Future] = []  # the file writes handed to the write threads, not yet seen done
        self._buffer = owned_buffer(self.capacity)  # None after release()
        self._prefaults: list[Future] = []
        self._sealing: Future | None = None  # seal(): the files' last writes and syncs
        self.seal_ms = 0.0
        if self.capacity < self.max_bytes:  # a declared size: its pages given ahead of the bytes
            self._prefaults = [copy_threads().submit(prefault, self._buffer, start,
                                                     min(start + PREFAULT_PIECE_BYTES, self.capacity))
                               for start in range(0, self.capacity, PREFAULT_PIECE_BYTES)]
        self.path = store.staging_dir()
        try:
            self._fd, self._direct = open_for_direct_writes(self.path / WEIGHTS_FILE)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    async def write(self, chunk) -> None:
        end = self.size + len(chunk)
        if end > self.capacity:
            if self.capacity == self.max_bytes:
                raise AdapterError(f"adapter weights are more than {self.max_bytes} bytes, above the limit of "
                                   f"{self.max_bytes}", 413)
            raise AdapterError(f"the upload sent more than the declared {self.capacity} bytes", 400)
        self.size = end
        taken = 0
        while not self._header_checked and taken < len(chunk):  # the first 8 bytes, then the header they announce
            piece = chunk[taken:taken + (self._header_end or 8) - len(self._head)]
            self._head += piece
            taken += len(piece)
            self._check_head()
        self._pending.append(chunk)  # (a view of immutable bytes: held, not copied)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= BLOCK_BYTES:
            await self._hand_over()

    def _check_head(self) -> None:
        """Refuse a pickle, or a file whose safetensors header is malformed, as soon as those bytes are in."""
        if len(self._head) >= 4:
            refuse_pickle(self._head)
        if self._header_end is None and len(self._head) >= 8:
            self._header_end = 8 + safetensors_header_length(self._head)
            if self._header_end > self.capacity:
                raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file or is truncated (a header of "
                                   f"{self._header_end - 8} bytes in an upload of at most {self.capacity})", 400)
        if self._header_end is not None and len(self._head) >= self._header_end:
            header = read_safetensors_header(self._head, None)  # (its tensors tile the data from byte 0)
            self.expected_size = self._header_end + max((info["data_offsets"][1] for name, info in header.items()
                                                         if name != "__metadata__"), default=0)
            if self.expected_size > self.capacity:
                if self.capacity == self.max_bytes:
                    raise AdapterError(f"{WEIGHTS_FILE}: its safetensors header describes {self.expected_size} "
                                       f"bytes, above the limit of {self.max_bytes}", 413)
                raise AdapterError(f"{WEIGHTS_FILE} is truncated: its safetensors header describes {self.expected_size} "
                                   f"bytes, more than the {self.capacity} declared for this upload", 400)
            self._header_checked = True
            self._head = bytearray()

    async def _hand_over(self) -> None:
        """Start copying the pending chunks, after the block before them (one block at a time, in order)."""
        if self._writing is not None:
            # shielded: a cancelled caller (a client gone) must not cancel the block, whose copy goes on in its
            # threads; discard() waits for it before it closes the file and removes the directory
            await asyncio.shield(self._writing)
            self._writing = None
        self._check_writes()
        if self._pending:
            block, self._pending, self._pending_bytes = self._pending, [], 0
            self._writing = asyncio.ensure_future(self._take_block(block))

    async def _take_block(self, block: list) -> None:
        """Copy + write one block (and hash it into the weights-only digest, beside it), then hand the pieces it
        completed to the copy threads."""
        jobs = [asyncio.to_thread(self._copy_and_write, block)]
        if self._weights_digest is not None:
            jobs.append(asyncio.to_thread(self._hash_weights, block))
        for result in await asyncio.gather(*jobs, return_exceptions=True):  # both done before anything is removed
            if isinstance(result, BaseException):
                raise result
        self._hash_pieces(self._written - self._written % DIGEST_PIECE_BYTES)

    def _hash_pieces(self, end: int) -> None:
        """Start hashing the buffer's pieces up to `end` (a piece boundary, or the end of the upload)."""
        view = memoryview(self._buffer)
        while self._hashed < end:
            stop = min(self._hashed + DIGEST_PIECE_BYTES, end)
            self._pieces.append(copy_threads().submit(piece_digest, view[self._hashed:stop]))
            self._hashed = stop

    def _copy_and_write(self, block: list) -> None:
        end = self._written
        target = np.frombuffer(self._buffer, np.uint8)
        for chunk in block:  # (numpy's copy releases the GIL, a memoryview's slice assignment does not: the event
            np.copyto(target[end:end + len(chunk)], np.frombuffer(chunk, np.uint8))  # loop then waited on it)
            end += len(chunk)
        self._written = end
        self._write_out(end - end % DIRECT_ALIGN if self._direct else end)

    def _write_out(self, end: int) -> None:
        """Hand the buffer's bytes up to `end` to the write threads, in pieces written at once."""
        view = memoryview(self._buffer)
        while self._flushed < end:
            stop = min(self._flushed + WRITE_PIECE_BYTES, end)
            self._writes.append(write_threads().submit(self._write_range, view[self._flushed:stop], self._flushed))
            self._flushed = stop
        if not self._direct and self._flushed - self._synced_at >= SYNC_BYTES:
            self._writes.append(write_threads().submit(os.fdatasync, self._fd))  # the disk works while bytes arrive;
            self._synced_at = self._flushed                                      # the final fsync only has the tail

    def _write_range(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            direct = self._direct  # (another write may turn O_DIRECT off while this one is refused)
            try:
                done += os.pwrite(self._fd, data[done:], offset + done)  # (releases the GIL)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                self._buffered_from_now()  # the filesystem opened the file O_DIRECT but refuses such writes

    def _check_writes(self) -> None:
        """Raise the error of a write that failed (a full disk ends the upload before its last byte)."""
        still = []
        for write in self._writes:
            if write.done():
                write.result()
            else:
                still.append(write)
        self._writes = still

    def _wait_writes(self) -> None:
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def _buffered_from_now(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def _write_tail(self) -> None:
        """The last bytes, after every write before them: with O_DIRECT, a length short of a block goes out padded,
        then the file is cut to size. The caller waits for the writes this hands over (_wait_writes)."""
        self._wait_writes()
        if not self._direct or self._flushed == self.size:
            self._write_out(self.size)
            return
        tail = self.size - self._flushed
        padded = -(-tail // DIRECT_ALIGN) * DIRECT_ALIGN
        scratch = mmap.mmap(-1, padded)  # page-aligned
        try:
            scratch[:tail] = memoryview(self._buffer)[self._flushed:self.size]
            try:
                os.pwrite(self._fd, scratch, self._flushed)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered_from_now()
                self._write_out(self.size)
                return
        finally:
            scratch.close()
        os.ftruncate(self._fd, self.size)
        self._flushed = self.size

    def _hash_weights(self, block: list) -> None:
        for chunk in block:
            self._weights_digest.update(chunk)  # (releases the GIL)

    async def finish(self, config_raw: bytes) -> Staged:
        """Every byte is in: write the rest and the config, sync both files and the directory; the staged version
        commit() publishes. Then `data` holds the weights."""
        return await asyncio.wrap_future(await self.seal(config_raw))

    async def seal(self, config_raw: bytes) -> Future:
        """As finish(), but returns once every byte is in the buffer (`data` holds the weights), with a Future of
        the staged version: the weights can be validated while their file is synced."""
        if len(self._head) < 4 and not self._header_checked:
            refuse_pickle(self._head)
        await self.drain()
        self._sealing = _SEAL_THREADS.submit(self._seal, config_raw)
        return self._sealing

    async def drain(self) -> None:
        """Write and hash every byte received so far."""
        await self._hand_over()
        if self._writing is not None:
            await asyncio.shield(self._writing)  # (as in _hand_over)
            self._writing = None

    def _seal(self, config_raw: bytes) -> Staged:
        started = time.perf_counter()
        self._write_tail()
        self._wait_writes()
        os.fsync(self._fd)
        with open(self.path / CONFIG_FILE, "wb") as f:
            f.write(config_raw)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path)
        self._hash_pieces(self.size)
        digest = combine_digests(config_raw, [piece.result() for piece in self._pieces])
        self._pieces = []  # (their views of the buffer are gone: it may shrink)
        wait(self._prefaults)
        if len(self._buffer) > max(self.size, 1):  # a capacity above the upload (the form's other fields, or no
            try:                                    # Content-Length: up to the size limit) is not kept with it
                self._buffer.resize(max(self.size, 1))
            except (BufferError, OSError, SystemError, ValueError):  # a view of it still open, or no mremap here
                pass
        self.seal_ms = 1e3 * (time.perf_counter() - started)
        return Staged(self.path, digest, self.size)

    @property
    def data(self) -> memoryview:
        """The weights received (after finish(), until release()): writable memory that the parse may keep views
        of (parse_adapter's `owned`), not written again."""
        return memoryview(self._buffer if self._buffer is not None else b"")[:self.size]

    @property
    def weights_sha256(self) -> str:
        """The hex digest of the weights alone (with weights_sha256=True, after finish())."""
        return self._weights_digest.hexdigest()

    async def discard(self) -> None:
        """Remove the temporary directory, after the block being copied and the writes under way (the upload is
        refused)."""
        writing, self._writing = self._writing, None
        finished = asyncio.ensure_future(self._settle(writing))
        try:
            await asyncio.shield(finished)
        except asyncio.CancelledError:  # the refusing task itself is cancelled: remove once the writes are out
            finished.add_done_callback(lambda _: self._remove())
            raise
        self._remove()

    async def _settle(self, writing: asyncio.Future | None) -> None:
        """Until the block being copied, the seal and every write they started are over, whatever their outcome."""
        if writing is not None:
            await asyncio.gather(writing, return_exceptions=True)
        if self._sealing is not None:
            await asyncio.gather(asyncio.wrap_future(self._sealing), return_exceptions=True)
        for piece in self._prefaults:
            piece.cancel()
        writes, self._writes = self._writes, []
        await asyncio.gather(*(asyncio.wrap_future(w) for w in writes + self._prefaults), return_exceptions=True)

    def _remove(self) -> None:
        for piece in self._pieces:  # (a refused upload's pieces not yet hashed: no need)
            piece.cancel()
        self._pieces = []
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)

    def release(self) -> None:
        """Let go of the buffer (a parsed adapter keeps it through its views) and close the file."""
        self._buffer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
