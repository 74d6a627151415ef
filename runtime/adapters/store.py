"""The on-disk adapter store: every committed adapter version survives a restart, and nothing else does.

Layout: `<root>/<id>/v<N>/{adapter_config.json, adapter_model.safetensors}` and `<root>/<id>/CURRENT`
(JSON naming the served version and the sha256 digest of its files). A commit writes a temp
directory, fsyncs it, renames it into place, then atomically replaces CURRENT, fsyncing every
directory it changes: a crash leaves either the old or the new version served. CURRENT is the commit
point: an upload returns success only after it is durable.

At start the store removes the temp directories a crash can leave, and nothing else: start-up costs one
directory read whatever the number of adapters (10,000 stored adapters must not slow it, issue #20). Each
adapter folder is recovered when it is first touched after start (get, list, read, commit, delete): a
`CURRENT.tmp`, version folders CURRENT does not name and a folder without CURRENT (an upload that never
returned) are removed; a CURRENT that does not parse or name this folder, or a version whose files are
missing or of the wrong size, is moved under `<root>/.quarantine/`, logged and listed in `quarantined`.
The digest is checked on every read (the engine loads nothing else), so a corrupt version is quarantined
the first time it is asked for and never served (digest.py says what it is).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .buffers import read_weights_file
from .digest import adapter_digest, digest_matches
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_IDS = {"base"}
QUARANTINE_DIR = ".quarantine"
QUARANTINE_NOTE = "QUARANTINE.json"
TEMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredAdapter:
    id: str
    version: int
    peft_type: str
    rank: int
    size_bytes: int
    created: float
    sha256: str = ""  # adapter_digest of the version's files (or a plain sha256 before 2026-12-06); "" only in
    # CURRENT files written before digests


@dataclass(frozen=True)
class QuarantinedAdapter:
    id: str
    version: int | None  # None when CURRENT itself was unreadable
    reason: str
    path: str  # where the files were moved
    when: float


@dataclass(frozen=True)
class Staged:
    """A version's files written and synced in a temporary directory of the store, not yet published."""
    path: Path
    digest: str
    size_bytes: int


class CorruptAdapter(FileNotFoundError):
    """A stored version failed its digest check on read; it has been quarantined, so it is gone."""


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


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (for a version's files staged outside this module)."""
    _fsync_dir(path)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


RECORD_TYPES = {"id": str, "version": int, "peft_type": str, "rank": int, "size_bytes": int, "created": (int, float),
                "sha256": str}


def _parse_record(raw: bytes) -> StoredAdapter:
    data = json.loads(raw)
    if not isinstance(data, dict) or not set(RECORD_TYPES) - {"sha256"} <= set(data) <= set(RECORD_TYPES):
        raise ValueError(f"CURRENT holds {data!r:.200}")
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, RECORD_TYPES[name]):
            raise ValueError(f"CURRENT field {name!r} is {value!r:.100}")
    return StoredAdapter(**data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_store_root(root: Path) -> None:
    """Create the store's directory if missing, or raise OSError with a sentence saying why `root` cannot hold
    the adapter store (a server checks this before it loads its model): a file in its place or in a parent's,
    a directory that cannot be created, no write access."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        file = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), root)
        what = "the path" if file == root else f"its parent {file}"
        raise OSError(f"{root}: {what} is a file, not a directory; give a directory (it is created if missing)") from None
    except OSError as e:
        raise OSError(f"{root}: cannot create the directory: {e.strerror or e}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise OSError(f"{root}: the directory is not writable by this user")


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._last_version: dict[str, int] = {}  # kept after delete so a re-upload never reuses a version
        self._quarantined: list[QuarantinedAdapter] = self._read_quarantine()
        for q in self._quarantined:
            if q.version is not None:
                self._last_version[q.id] = max(self._last_version.get(q.id, 0), q.version)
        self._recovered: set[str] = set()  # ids whose folder was recovered since start (or had none)
        self._remove_leftovers()

    # -- recovery -----------------------------------------------------------------------------
    def _remove_leftovers(self) -> None:
        with os.scandir(self.root) as entries:
            leftovers = [Path(e.path) for e in entries if e.name.startswith(TEMP_PREFIX)]
        for entry in leftovers:  # an unfinished commit or delete
            log.warning("adapter store: removing leftover %s", entry)
            _remove(entry)
        if leftovers:
            _fsync_dir(self.root)

    def _recover(self, adapter_id: str) -> None:
        """Recover the adapter's folder on its first touch since start (takes the lock: call outside it)."""
        if adapter_id in self._recovered:
            return
        with self._lock:
            if adapter_id not in self._recovered:
                adapter_dir = self.root / adapter_id
                if adapter_dir.is_dir():
                    self._recover_adapter(adapter_dir)
                self._recovered.add(adapter_id)

    def _recover_adapter(self, adapter_dir: Path) -> None:
        changed = False  # fsync the folder only when recovery changed it (10,000 idle fsyncs cost seconds)
        if (adapter_dir / "CURRENT.tmp").exists():
            (adapter_dir / "CURRENT.tmp").unlink()
            changed = True
        if not (adapter_dir / "CURRENT").exists():  # its first upload died before the commit point
            log.warning("adapter store: removing %s: no committed version", adapter_dir)
            shutil.rmtree(adapter_dir)
            return
        try:
            record = _parse_record((adapter_dir / "CURRENT").read_bytes())
        except (OSError, ValueError, TypeError) as e:
            self._quarantine(adapter_dir.name, None, f"unreadable CURRENT: {e}")
            return
        for entry in adapter_dir.iterdir():
            if entry.name not in ("CURRENT", f"v{record.version}"):  # e.g. a version renamed in before a crash
                log.warning("adapter store: removing orphan %s (CURRENT names v%d)", entry, record.version)
                _remove(entry)
                changed = True
        if changed:
            _fsync_dir(adapter_dir)
        problem = self._verify(adapter_dir.name, record)
        if problem == "no digest":  # a store written before digests: adopt what is there
            config_raw, weights_raw = self._read_files(record.id, record.version)
            record = StoredAdapter(**{**asdict(record), "sha256": adapter_digest(config_raw, weights_raw)})
            self._write_current(adapter_dir, record)
            log.warning("adapter store: %s v%d had no digest; recorded one now", record.id, record.version)
        elif problem is not None:
            self._quarantine(adapter_dir.name, record.version, problem)

    def _verify(self, dir_name: str, record: StoredAdapter) -> str | None:
        """What is wrong with a committed version that its folder shows (no file is read: read() checks the
        digest), or None."""
        if record.id != dir_name:
            return f"CURRENT names adapter {record.id!r}"
        version_dir = self.root / dir_name / f"v{record.version}"
        try:
            (version_dir / CONFIG_FILE).stat()
            weights_bytes = (version_dir / WEIGHTS_FILE).stat().st_size
        except OSError as e:
            return f"version v{record.version} is incomplete: {e}"
        if not record.sha256:
            return "no digest"
        if weights_bytes != record.size_bytes:
            return f"version v{record.version} has {weights_bytes} bytes of weights, CURRENT records {record.size_bytes}"
        return None

    # -- quarantine -------------------------------------------------------------------------
    @property
    def quarantined(self) -> list[QuarantinedAdapter]:
        """Adapters moved aside because they were corrupt or incomplete (oldest first)."""
        with self._lock:
            return list(self._quarantined)

    def _read_quarantine(self) -> list[QuarantinedAdapter]:
        found = []
        for note in sorted((self.root / QUARANTINE_DIR).glob(f"*/{QUARANTINE_NOTE}")):
            try:
                found.append(QuarantinedAdapter(**json.loads(note.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("adapter store: unreadable quarantine note %s", note)
        return sorted(found, key=lambda q: q.when)

    def _quarantine(self, adapter_id: str, version: int | None, reason: str) -> None:
        """Move `<root>/<id>` aside in one rename: from then on the adapter is absent."""
        quarantine = self.root / QUARANTINE_DIR
        quarantine.mkdir(exist_ok=True)
        when = time.time()
        target = quarantine / f"{adapter_id}.v{version}.{time.time_ns()}"
        os.rename(self.root / adapter_id, target)
        _fsync_dir(self.root)
        entry = QuarantinedAdapter(adapter_id, version, reason, str(target), when)
        _write_synced(target / QUARANTINE_NOTE, json.dumps(asdict(entry)).encode())
        _fsync_dir(quarantine)
        if version is not None:
            self._last_version[adapter_id] = max(self._last_version.get(adapter_id, 0), version)
        self._quarantined.append(entry)
        log.error("adapter store: quarantined adapter %r v%s (%s) to %s", adapter_id, version, reason, target)

    # -- reads ------------------------------------------------------------------------------
    def _current(self, adapter_id: str) -> StoredAdapter | None:
        try:
            return _parse_record((self.root / adapter_id / "CURRENT").read_bytes())
        except (OSError, ValueError, TypeError):
            return None

    def _read_files(self, adapter_id: str, version: int) -> tuple[bytes, memoryview]:
        d = self.root / adapter_id / f"v{version}"
        return (d / CONFIG_FILE).read_bytes(), read_weights_file(d / WEIGHTS_FILE)

    def ids(self) -> list[str]:
        """The ids of the adapter folders, sorted, from one directory read (CURRENT files are not opened: an
        id may still be committing or deleting; get() says)."""
        with os.scandir(self.root) as entries:
            return sorted(e.name for e in entries if ADAPTER_ID.match(e.name) and e.is_dir(follow_symlinks=False))

    def list(self) -> list[StoredAdapter]:
        found = []
        for adapter_id in self.ids():
            self._recover(adapter_id)
            current = self._current(adapter_id)
            if current is not None:
                found.append(current)
        return found

    def get(self, adapter_id: str) -> StoredAdapter | None:
        check_adapter_id(adapter_id)
        self._recover(adapter_id)
        return self._current(adapter_id)

    def read(self, adapter_id: str, version: int) -> tuple[bytes, memoryview]:
        """The files of a committed version, verified against its digest; the weights in memory of their own
        (read_weights_file).

        FileNotFoundError when the version is no longer current (replaced or deleted meanwhile);
        CorruptAdapter (a FileNotFoundError: the version is gone) when it failed the check and was
        quarantined just now.
        """
        self._recover(adapter_id)
        record = self._current(adapter_id)
        if record is None or record.version != version:
            raise FileNotFoundError(f"adapter {adapter_id!r} v{version} is not the current version")
        config_raw, weights_raw = self._read_files(adapter_id, version)
        if digest_matches(record.sha256, config_raw, weights_raw):
            return config_raw, weights_raw
        with self._lock:
            if self._current(adapter_id) == record:  # still the same commit: the files themselves are damaged
                self._quarantine(adapter_id, version, f"version v{version} does not match its sha256 digest")
        raise CorruptAdapter(f"adapter {adapter_id!r} v{version} failed its digest check and was quarantined")

    # -- writes -----------------------------------------------------------------------------
    def _write_current(self, adapter_dir: Path, record: StoredAdapter) -> None:
        _write_synced(adapter_dir / "CURRENT.tmp", json.dumps(asdict(record)).encode())
        os.replace(adapter_dir / "CURRENT.tmp", adapter_dir / "CURRENT")
        _fsync_dir(adapter_dir)

    def staging_dir(self) -> Path:
        """A new temporary directory of the store for a version's files (an upload streams its weights into it);
        commit() publishes it, discard() removes it, the next start removes it after a crash."""
        return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.root))

    def stage(self, config_raw: bytes, weights_raw: bytes) -> Staged:
        """Write both files to a temporary directory of the store and sync them (no lock: a registry
        stages while it validates). commit() publishes it; discard() removes it; a crash leaves a temp
        directory that the next start removes."""
        tmp = self.staging_dir()
        try:
            _write_synced(tmp / CONFIG_FILE, config_raw)
            _write_synced(tmp / WEIGHTS_FILE, weights_raw)
            _fsync_dir(tmp)
            return Staged(tmp, adapter_digest(config_raw, weights_raw), len(weights_raw))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def discard(staged: Staged) -> None:
        shutil.rmtree(staged.path, ignore_errors=True)

    def commit(self, adapter_id: str, config_raw: bytes, weights_raw: bytes, peft_type: str, rank: int,
               staged: Staged | None = None) -> StoredAdapter:
        """Publish a new version of adapter_id (from `staged`, or staged here) as its CURRENT one."""
        check_adapter_id(adapter_id)
        self._recover(adapter_id)
        if staged is None:
            staged = self.stage(config_raw, weights_raw)
        with self._lock:
            adapter_dir = self.root / adapter_id
            existing = [int(p.name[1:]) for p in adapter_dir.glob("v*") if p.name[1:].isdigit()]
            version = max(existing + [self._last_version.get(adapter_id, 0)]) + 1
            version_dir = adapter_dir / f"v{version}"
            previous = self._current(adapter_id)
            record = StoredAdapter(adapter_id, version, peft_type, rank, staged.size_bytes, time.time(), staged.digest)
            tmp = staged.path
            try:
                if not adapter_dir.exists():
                    adapter_dir.mkdir()
                    _fsync_dir(self.root)
                os.rename(tmp, version_dir)
                _fsync_dir(self.root)
                self._write_current(adapter_dir, record)  # the commit point
            except BaseException:  # a rejected commit leaves the store as it was
                shutil.rmtree(tmp, ignore_errors=True)
                if previous is None:
                    shutil.rmtree(adapter_dir, ignore_errors=True)
                else:
                    if self._current(adapter_id) != previous:
                        self._write_current(adapter_dir, previous)
                    (adapter_dir / "CURRENT.tmp").unlink(missing_ok=True)
                    shutil.rmtree(version_dir, ignore_errors=True)
                raise
            self._last_version[adapter_id] = version
            for old in adapter_dir.glob("v*"):  # older versions are no longer served from disk
                if old != version_dir:
                    shutil.rmtree(old, ignore_errors=True)
            return record

    def delete(self, adapter_id: str) -> StoredAdapter | None:
        check_adapter_id(adapter_id)
        self._recover(adapter_id)
        with self._lock:
            current = self._current(adapter_id)
            if current is None:
                return None
            self._last_version[adapter_id] = current.version
            trash = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.root))
            os.rename(self.root / adapter_id, trash / adapter_id)  # atomic: gone from list() at once
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            return current
