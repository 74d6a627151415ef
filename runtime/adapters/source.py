"""A read-only adapter source: a directory whose folders `<DIR>/<id>/` each hold a PEFT adapter
(`adapter_config.json` + `adapter_model.safetensors`), loaded on the first request naming `<id>`.

This module owns only the file system side: which folder an id names (never one outside DIR: no
`..`, no `/`, no absolute path, no symlink whose target resolves outside DIR, for the folder or its
two files), the bytes of its files, and the ids a listing shows. Validation, caching and the
once-only load are the registry's (registry.py), exactly as for an upload.

A source adapter's version is derived from its files' size and modification time (see `version`):
a folder rewritten in place is a new version, so no cache serves the old weights for new requests.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from .buffers import read_weights_file
from .store import ADAPTER_ID

# Source versions live far above any store version (those count uploads from 1), so a source
# adapter's (id, version) key never equals a stored one's, and stays a positive int for metrics.
SOURCE_VERSION_BASE = 10 ** 12


@dataclass(frozen=True)
class SourceFiles:
    folder: Path  # as named to clients: DIR/<id>
    version: int
    config_raw: bytes | None = None
    weights_raw: bytes | None = None


class AdapterSource:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.real_root = Path(os.path.realpath(self.root))

    def __repr__(self) -> str:
        return f"AdapterSource({str(self.root)!r})"

    def _inside(self, path: Path) -> bool:
        real = os.path.realpath(path)
        return os.path.commonpath([real, self.real_root]) == str(self.real_root) and real != str(self.real_root)

    def folder(self, adapter_id: str) -> Path | None:
        """The folder `adapter_id` names, or None when this source has none by that name.
        AdapterError 400 for an id that could leave DIR or a folder (or file) that resolves outside it."""
        if (not isinstance(adapter_id, str) or not adapter_id or os.path.isabs(adapter_id) or "/" in adapter_id
                or "\\" in adapter_id or ".." in adapter_id or "\0" in adapter_id or not ADAPTER_ID.match(adapter_id)):
            raise AdapterError(f"invalid adapter id {adapter_id!r}: an on-demand adapter id names a folder directly "
                               "under an --adapter-source (letters, digits, '.', '_' or '-'; no '..', '/' or "
                               "absolute paths)", 400)
        folder = self.root / adapter_id
        if not os.path.lexists(folder):
            return None
        for path in (folder, folder / CONFIG_FILE, folder / WEIGHTS_FILE):
            if os.path.lexists(path) and not self._inside(path):
                raise AdapterError(f"adapter source folder {folder}: {path.name} resolves outside the source "
                                   f"directory {self.root}; refused", 400)
        if not folder.is_dir():
            return None
        return folder

    def version(self, folder: Path) -> int:
        """A version number that changes whenever either file is replaced or rewritten."""
        try:
            stats = [os.stat(folder / name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
        except OSError as e:
            raise AdapterError(f"adapter source folder {folder}: not a PEFT adapter folder (needs {CONFIG_FILE} "
                               f"and {WEIGHTS_FILE}): {e.strerror or e}", 400) from None
        stamp = ",".join(f"{s.st_dev}:{s.st_ino}:{s.st_size}:{s.st_mtime_ns}" for s in stats).encode()
        return SOURCE_VERSION_BASE + int.from_bytes(hashlib.sha256(stamp).digest()[:5], "big")

    def read(self, folder: Path, max_bytes: int) -> tuple[bytes, memoryview]:
        """Both files' bytes, the weights in memory of their own (store.read_weights_file); the weights refused
        (413) before they are read when above `max_bytes`."""
        try:
            size = os.stat(folder / WEIGHTS_FILE).st_size
            if size > max_bytes:
                raise AdapterError(f"adapter source folder {folder}: adapter weights are {size} bytes, above the "
                                   f"limit of {max_bytes}", 413)
            return (folder / CONFIG_FILE).read_bytes(), read_weights_file(folder / WEIGHTS_FILE)
        except OSError as e:
            raise AdapterError(f"adapter source folder {folder}: cannot read it: {e.strerror or e}", 400) from None

    def ids(self) -> list[str]:
        """The ids this source can serve, sorted: folders named like adapter ids, holding no link out of DIR.
        (A folder's files are checked when it is first used, not here: a listing stays one directory read.)"""
        found = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            name = entry.name
            if not ADAPTER_ID.match(name) or ".." in name or name in ("base",):
                continue
            try:
                if entry.is_symlink() and not self._inside(Path(entry.path)):
                    continue
                if entry.is_dir():
                    found.append(name)
            except OSError:
                continue
        return sorted(found)
