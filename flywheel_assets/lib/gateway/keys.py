"""API keys: each names a tenant; only their SHA-256 is stored.

A key is `fw-` + 32 random bytes (urlsafe base64), shown once at creation. Keys carry 256
bits of entropy, so a plain SHA-256 is enough to store them (a slow password hash guards
guessable secrets; nobody guesses these), and a lookup stays one dict access per request.
The store is FLYWHEEL_HOME/gateway/keys.json, rewritten atomically (temporary file, fsync,
rename); a running gateway rereads it when its modification time changes, so `flywheel
keys revoke` takes effect at the next request.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

PREFIX = "fw-"


@dataclass(frozen=True)
class ApiKey:
    key_id: str  # the first characters of the key, to name it in lists and logs
    tenant: str
    sha256: str
    created_at: str
    revoked_at: str | None = None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[float, int] | None = None
        self._by_hash: dict[str, ApiKey] = {}

    def create(self, tenant: str) -> tuple[str, ApiKey]:
        """(the key itself, shown once, and its stored record)."""
        if not tenant or not tenant.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"tenant must be letters, digits, '-' or '_', got {tenant!r}")
        key = PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(key_id=key[:10], tenant=tenant, sha256=digest(key), created_at=_now())
        self._write([*self.list(), record])
        return key, record

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke by key id (or the whole key); revoking twice is an error."""
        records = self.list()
        wanted = key_id[:10]
        matches = [r for r in records if r.key_id == wanted]
        if not matches:
            raise KeyError(f"no key {wanted!r}")
        if all(r.revoked_at for r in matches):
            raise ValueError(f"key {wanted!r} is already revoked")
        revoked = [r if r.key_id != wanted or r.revoked_at else ApiKey(**{**asdict(r), "revoked_at": _now()})
                   for r in records]
        self._write(revoked)
        return next(r for r in revoked if r.key_id == wanted)

    def list(self) -> list[ApiKey]:
        if not self.path.exists():
            return []
        return [ApiKey(**row) for row in json.loads(self.path.read_text())["keys"]]

    def tenant_of(self, key: str | None) -> str | None:
        """The tenant of a live key, None for an unknown or revoked one."""
        if not key:
            return None
        with self._lock:
            self._reload()
            record = self._by_hash.get(digest(key))
        return record.tenant if record and not record.revoked_at else None

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._by_hash, self._seen = {}, None
            return
        seen = (stat.st_mtime, stat.st_size)
        if seen != self._seen:
            self._by_hash = {r.sha256: r for r in self.list()}
            self._seen = seen

    def _write(self, records: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w") as handle:
            json.dump({"keys": [asdict(r) for r in records]}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.path)


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only, whatever the file was before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, text.encode())
    finally:
        os.close(descriptor)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
