"""An upload's weights file while its bytes arrive (an HTTP multipart part, gRPC chunks).

The bytes land in one buffer in memory, which the parse reads afterwards, and block by block, on a worker
thread while the next bytes arrive, in the weights file of a temporary directory of the store and in the
sha256 digest: when the last byte is in, the file only needs its fsync. The size limit is checked on every
chunk and the safetensors header as soon as its bytes are in, before the weights arrive. A refused upload
calls discard(), which removes the temporary directory before the refusal is answered.
"""
from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import shutil
from pathlib import Path

from .peft_format import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_safetensors_header, refuse_pickle,
                          safetensors_header_length)
from .store import AdapterStore, Staged, fsync_dir

BLOCK_BYTES = 4 << 20  # handed to the worker at a time: few thread hops, and the disk works while bytes arrive


def _digest_prefix(config_raw: bytes):
    """store.adapter_digest's hash state after the config: the weights' bytes follow."""
    h = hashlib.sha256(len(config_raw).to_bytes(8, "big"))
    h.update(config_raw)
    return h


class IncomingWeights:
    """`capacity`: the most bytes this upload can carry (a declared size, a Content-Length), at most `max_bytes`.
    `config_raw`: the adapter config when it is known before the weights (the store digest then runs as bytes
    arrive; otherwise over the buffer at the end). `weights_sha256`: also hash the weights alone (gRPC checks
    a declared digest)."""

    def __init__(self, store: AdapterStore, max_bytes: int, capacity: int | None = None,
                 config_raw: bytes | None = None, weights_sha256: bool = False):
        self.max_bytes = max_bytes
        self.capacity = max_bytes if capacity is None else min(capacity, max_bytes)
        # anonymous memory: pages are taken as bytes arrive, so a capacity above the real size costs nothing
        self._buffer = mmap.mmap(-1, max(self.capacity, 1), flags=mmap.MAP_PRIVATE)
        self.size = 0
        self._config_raw = config_raw
        self._digest = None if config_raw is None else _digest_prefix(config_raw)
        self._weights_digest = hashlib.sha256() if weights_sha256 else None
        self._header_end: int | None = None  # 8 + header length, once known
        self._header_checked = False
        self._handed = 0  # bytes given to the worker so far
        self._writing: asyncio.Future | None = None  # the block the worker is writing
        self.path = store.staging_dir()
        try:
            self._file = open(self.path / WEIGHTS_FILE, "wb")
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    @property
    def data(self) -> memoryview:
        """The weights received (valid until release())."""
        return memoryview(self._buffer)[:self.size]

    async def write(self, chunk) -> None:
        end = self.size + len(chunk)
        if end > self.capacity:
            if self.capacity == self.max_bytes:
                raise AdapterError(f"adapter weights are more than {self.max_bytes} bytes, above the limit of "
                                   f"{self.max_bytes}", 413)
            raise AdapterError(f"the upload sent more than the declared {self.capacity} bytes", 400)
        self._buffer[self.size:end] = chunk
        self.size = end
        if not self._header_checked:
            self._check_head()
        if self.size - self._handed >= BLOCK_BYTES:
            await self._hand_over()

    def _check_head(self) -> None:
        """Refuse a pickle, or a file whose safetensors header is malformed, as soon as those bytes are in."""
        if self.size >= 4:
            refuse_pickle(self._buffer[:4])
        if self._header_end is None and self.size >= 8:
            self._header_end = 8 + safetensors_header_length(self._buffer[:8])
            if self._header_end > self.capacity:
                raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file or is truncated (a header of "
                                   f"{self._header_end - 8} bytes in an upload of at most {self.capacity})", 400)
        if self._header_end is not None and self.size >= self._header_end:
            read_safetensors_header(self._buffer[:self._header_end], None)
            self._header_checked = True

    async def _hand_over(self) -> None:
        """Start writing the bytes not yet handed over, after the block before them (one block at a time, in order)."""
        if self._writing is not None:
            await self._writing
        start, self._handed = self._handed, self.size
        if start < self.size:
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._write_block, start, self.size))
        else:
            self._writing = None

    def _write_block(self, start: int, stop: int) -> None:
        with memoryview(self._buffer)[start:stop] as block:  # file I/O and hashing release the GIL
            self._file.write(block)
            for digest in (self._digest, self._weights_digest):
                if digest is not None:
                    digest.update(block)

    async def finish(self, config_raw: bytes) -> Staged:
        """Every byte is in: write the rest and the config, sync both files and the directory; the staged version
        commit() publishes."""
        if self.size < 4:
            refuse_pickle(self._buffer[:self.size])
        await self._hand_over()
        if self._writing is not None:
            await self._writing
            self._writing = None
        return await asyncio.to_thread(self._seal, config_raw)

    def _seal(self, config_raw: bytes) -> Staged:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        with open(self.path / CONFIG_FILE, "wb") as f:
            f.write(config_raw)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path)
        if self._digest is None or config_raw != self._config_raw:  # the config came after the weights
            self._digest = _digest_prefix(config_raw)
            with self.data as weights:
                self._digest.update(weights)
        return Staged(self.path, self._digest.hexdigest(), self.size)

    @property
    def weights_sha256(self) -> str:
        """The hex digest of the weights alone (with weights_sha256=True, after finish())."""
        return self._weights_digest.hexdigest()

    async def discard(self) -> None:
        """Remove the temporary directory, after the block being written (the upload is refused)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:  # the refusing task itself is cancelled: remove once the block is out
                writing.add_done_callback(lambda _: self._remove())
                raise
            except Exception:
                pass
        self._remove()

    def _remove(self) -> None:
        self._file.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def release(self) -> None:
        """Drop the buffer (after the parse copied what it keeps)."""
        self._buffer = None
