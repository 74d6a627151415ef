"""The on-disk adapter store: every committed adapter version survives a restart.

Layout: `<root>/<id>/v<N>/{adapter_config.json, adapter_model.safetensors}` and `<root>/<id>/CURRENT`
(JSON naming the served version). A commit writes a temp directory, fsyncs it, renames it into
place, then atomically replaces CURRENT: a crash leaves either the old or the new version served.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_IDS = {"base"}


@dataclass(frozen=True)
class StoredAdapter:
    id: str
    version: int
    peft_type: str
    rank: int
    size_bytes: int
    created: float


def check_adapter_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not ADAPTER_ID.match(adapter_id) or ".." in adapter_id:
        raise AdapterError(f"invalid adapter id {adapter_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit", 400)
    if adapter_id in RESERVED_IDS:
        raise AdapterError(f"adapter id {adapter_id!r} is reserved for the base model", 400)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._last_version: dict[str, int] = {}  # kept after delete so a re-upload never reuses a version
        for leftover in self.root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _current(self, adapter_id: str) -> StoredAdapter | None:
        try:
            return StoredAdapter(**json.loads((self.root / adapter_id / "CURRENT").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def list(self) -> list[StoredAdapter]:
        found = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and ADAPTER_ID.match(d.name):
                current = self._current(d.name)
                if current is not None:
                    found.append(current)
        return found

    def get(self, adapter_id: str) -> StoredAdapter | None:
        check_adapter_id(adapter_id)
        return self._current(adapter_id)

    def read(self, adapter_id: str, version: int) -> tuple[bytes, bytes]:
        d = self.root / adapter_id / f"v{version}"
        return (d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes()

    def commit(self, adapter_id: str, config_raw: bytes, weights_raw: bytes, peft_type: str, rank: int) -> StoredAdapter:
        check_adapter_id(adapter_id)
        with self._lock:
            adapter_dir = self.root / adapter_id
            existing = [int(p.name[1:]) for p in adapter_dir.glob("v*") if p.name[1:].isdigit()]
            version = max(existing + [self._last_version.get(adapter_id, 0)]) + 1
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                _write_synced(tmp / CONFIG_FILE, config_raw)
                _write_synced(tmp / WEIGHTS_FILE, weights_raw)
                _fsync_dir(tmp)
                adapter_dir.mkdir(exist_ok=True)
                os.rename(tmp, adapter_dir / f"v{version}")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            record = StoredAdapter(adapter_id, version, peft_type, rank, len(weights_raw), time.time())
            _write_synced(adapter_dir / "CURRENT.tmp", json.dumps(asdict(record)).encode())
            os.replace(adapter_dir / "CURRENT.tmp", adapter_dir / "CURRENT")
            _fsync_dir(adapter_dir)
            self._last_version[adapter_id] = version
            for old in adapter_dir.glob("v*"):  # older versions are no longer served from disk
                if old.name != f"v{version}":
                    shutil.rmtree(old, ignore_errors=True)
            return record

    def delete(self, adapter_id: str) -> StoredAdapter | None:
        check_adapter_id(adapter_id)
        with self._lock:
            current = self._current(adapter_id)
            if current is None:
                return None
            self._last_version[adapter_id] = current.version
            trash = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            os.rename(self.root / adapter_id, trash / adapter_id)  # atomic: gone from list() at once
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            return current
