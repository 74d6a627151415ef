"""Tenants and their API keys, and the namespace each tenant's adapters live in.

A keys file holds one `TENANT KEY [source=DIR ...]` line per key (`#` starts a comment); KEY is the key in
plain text or `sha256:<hex digest of the key>`; each `source=DIR` gives the tenant an adapter source of its
own (folders `DIR/<id>/` loaded on first use, like `serve --adapter-source`, seen by no other tenant). The tenant named `admin` has the admin role: it sees
and manages every adapter. Keys are kept only as SHA-256 digests and compared in constant time.

Adapters of tenant T are stored under `T.<id>` (tenant names hold no '.', so the first '.' splits
unambiguously); the admin's namespace is the whole store, so its ids are stored as given.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

ADMIN = "admin"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
SHA256_KEY = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True)
class Tenant:
    name: str

    @property
    def admin(self) -> bool:
        return self.name == ADMIN

    def stored_id(self, adapter_id: str) -> str:
        """The store's id of this tenant's adapter `adapter_id`."""
        return adapter_id if self.admin else f"{self.name}.{adapter_id}"

    def own_id(self, stored_id: str) -> str | None:
        """The id this tenant knows a stored adapter by, or None when it is not this tenant's."""
        if self.admin:
            return stored_id
        prefix = f"{self.name}."
        return stored_id[len(prefix):] if stored_id.startswith(prefix) else None


OPEN_TENANT = Tenant(ADMIN)  # no keys configured: every caller manages the whole store


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` value (scheme case-insensitive), or None."""
    if authorization is None:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


class KeyRing:
    def __init__(self, entries: list[tuple[str, bytes]], sources: dict[str, tuple[Path, ...]] | None = None):
        self._entries = entries  # (tenant name, sha256 digest of its key)
        self._sources = sources or {}  # tenant name -> its own adapter source directories

    def sources_of(self, tenant: Tenant) -> tuple[Path, ...]:
        """The adapter source directories given to this tenant alone in the key file."""
        return self._sources.get(tenant.name, ())

    @classmethod
    def single(cls, key: str) -> KeyRing:
        """`--api-key KEY`: one tenant, the admin."""
        return cls([(ADMIN, digest(key))])

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        entries, seen, sources = [], set(), {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) < 2 or not all(f.startswith("source=") for f in fields[2:]):
                raise KeyFileError(f"{path}:{number}: expected 'TENANT KEY [source=DIR ...]'")  # never quote the line: it holds a key
            name, key = fields[:2]
            for field in fields[2:]:
                directory = Path(field[len("source="):])
                if not directory.is_dir():
                    raise KeyFileError(f"{path}:{number}: source {str(directory)!r} is not a directory")
                sources.setdefault(name, []).append(directory)
            if not TENANT_NAME.match(name):
                raise KeyFileError(f"{path}:{number}: invalid tenant name {name!r}: use 1-32 letters, digits, "
                                   "'_' or '-', starting with a letter or digit")
            hashed = SHA256_KEY.match(key)
            key_digest = bytes.fromhex(hashed.group(1)) if hashed else digest(key)
            if key_digest in seen:
                raise KeyFileError(f"{path}:{number}: this key is already given to another line")
            seen.add(key_digest)
            entries.append((name, key_digest))
        if not entries:
            raise KeyFileError(f"{path}: no 'TENANT KEY' lines")
        return cls(entries, {name: tuple(dirs) for name, dirs in sources.items()})

    def tenant_for(self, key: str) -> Tenant | None:
        presented = digest(key)
        found = None
        for name, key_digest in self._entries:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(presented, key_digest):
                found = name
        return None if found is None else Tenant(found)
