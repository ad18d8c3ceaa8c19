"""A forgotten user's lines out of the files beside the lake: landing files, the gateway's journal,
datasets' exports and id lists.

A landing line is matched by the subject's identifiers as JSON strings (`"user-7"`, a session or
trajectory id in quotes) anywhere in its bytes, so lines that never parsed (quarantined) and
duplicates the ingest skipped are found as well as the rows' own lines. A matched line is
blanked in place, not removed: a plain file keeps its size (the line becomes spaces) and every
other line its number, so the ingest ledger (path, size, mtime) and every row's source_line
still hold; a gzip file is recompressed with the line empty and its ledger row takes the new
size. The mtime is kept, so a file is never ingested twice. The ingest skips blank lines.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flywheel_assets.lib.ingest.landing import walk
from flywheel_assets.lib.ingest.lock import LOCK_NAME, REFRESH_PREFIX, WRITERS_GATE, WRITERS_LOCK

LOCK_PREFIXES = (LOCK_NAME, REFRESH_PREFIX, WRITERS_LOCK, WRITERS_GATE)  # lock files hold who holds them, never data


ID_FIELDS = ("session_id", "trajectory_id", "corrects")


@dataclass(frozen=True)
class Matcher:
    """Does a line belong to the subject? A line that parses as JSON is compared field by field, at
    any depth (an event's data.trajectory_id, a journal record's nested conversation): an object
    whose user_id is the user's (and whose tenant, 'default' when none is named, is the tenant asked
    for), or whose session_id, trajectory_id or corrects is one of the subject's — unless the
    object (or one enclosing it) names another tenant than the one asked for: two tenants may use
    the same session id.
    Content is never compared: another user's answer that happens to say the id is not theirs. A
    line that does not parse (quarantined) is matched on the ids or the user as JSON strings in
    its bytes, UTF-8 and escaped (the ids unless it names a tenant_id and not the one asked for)."""

    user: str | None  # None: the ids alone
    tenant: str | None
    ids: frozenset[str]

    @classmethod
    def build(cls, user_id: str | None, tenant_id: str | None, ids: Iterable[str]) -> Matcher:
        return cls(user_id, tenant_id, frozenset(value for value in ids if value))

    def __call__(self, line: bytes) -> bool:
        try:
            value = json.loads(line)
        except ValueError:  # not JSON (or not UTF-8): the bytes
            return self._bytes(line)
        return self._value(value)

    def _bytes(self, line: bytes) -> bool:
        if any(token in line for value in self.ids for token in _quoted(value)) and (
                self.tenant is None or b'"tenant_id"' not in line or any(token in line for token in _quoted(self.tenant))):
            return True
        if self.user is None or not any(token in line for token in _quoted(self.user)):
            return False
        if self.tenant is None:
            return True
        if self.tenant == "default":  # a line naming no tenant is the default tenant's
            return b'"tenant_id"' not in line or any(token in line for token in _quoted("default"))
        return any(token in line for token in _quoted(self.tenant))

    def _value(self, value, named: str | None = None) -> bool:
        """`named`: the tenant the enclosing object names (an event's data object names none)."""
        if isinstance(value, list):
            return any(self._value(item, named) for item in value)
        if not isinstance(value, dict):
            return False
        journal = value.get("kind") == "conversation"  # the gateway journal's record names them tenant and user
        named = value.get("tenant_id") or (value.get("tenant") if journal else None) or named
        user = value.get("user_id") or (value.get("user") if journal else None)
        if self.user is not None and user == self.user and (self.tenant is None or (named or "default") == self.tenant):
            return True
        # a session id is the tenant's only in an object of the tenant ('default' when none is named):
        # two tenants may use one session id; a trajectory id is one tenant's (the lake's key)
        for name in ID_FIELDS:
            if isinstance(value.get(name), str) and value[name] in self.ids and (
                    self.tenant is None or (named or "default") == self.tenant
                    or (name != "session_id" and named is None)):
                return True
        return any(self._value(item, named) for item in value.values() if isinstance(item, (dict, list)))

    def text(self, value: str | None) -> bool:
        return value is not None and self(value.encode("utf-8", "surrogateescape"))


def _quoted(value: str) -> set[bytes]:
    return {json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogateescape")}


@dataclass
class Rewritten:
    path: Path
    lines: int  # lines blanked
    numbers: list[int]  # their 1-based numbers (rows' source_line)
    size_before: int
    size_after: int


def scrub_folder(root: Path, matcher: Matcher, dry_run: bool = False) -> list[Rewritten]:
    """Blank the subject's lines in every regular file under root (links are not followed); a dry
    run only counts them."""
    done = []
    for path, _ in walk(root):
        if not path.is_file() or path.is_symlink() or path.name.startswith(LOCK_PREFIXES):
            continue
        if (result := scrub_file(path, matcher, dry_run)) is not None:
            done.append(result)
    return sorted(done, key=lambda r: str(r.path))


def scrub_file(path: Path, matcher: Matcher, dry_run: bool = False) -> Rewritten | None:
    """Blank the matched lines of one file, atomically (temporary file, fsync, rename), its mtime
    kept. None when no line matched. A gzip file is read and rewritten compressed."""
    compressed = _is_gzip(path)
    info = path.stat()
    with (gzip.open if compressed else open)(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    numbers = []
    for index, line in enumerate(lines):
        if line.strip() and matcher(line):
            lines[index] = b"" if compressed else b" " * len(line)
            numbers.append(index + 1)
    if not numbers or dry_run:
        return Rewritten(path, len(numbers), numbers, info.st_size, info.st_size) if numbers else None
    temporary = path.with_name(f".{path.name}.forget-tmp")
    with open(temporary, "wb") as raw:
        if compressed:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
                handle.write(b"\n".join(lines))
        else:
            raw.write(b"\n".join(lines))
        raw.flush()
        os.fsync(raw.fileno())
    os.chmod(temporary, info.st_mode & 0o7777)
    os.utime(temporary, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.replace(temporary, path)
    _fsync_dir(path.parent)
    return Rewritten(path, len(numbers), numbers, info.st_size, path.stat().st_size)


@contextmanager
def journal_held(folder: Path) -> Iterator[bool]:
    """Hold the gateway journal's lock (lib/gateway/journal.py) while its files are rewritten: True
    when taken (or there is no journal), False when a running gateway holds it — it appends to the
    open segment, and rewriting that file under it would lose what it acknowledges next."""
    path = folder / "journal" / "lock"
    if not path.exists():
        yield True
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value) -> None:
    """Replace a JSON file atomically (ids lists, dataset manifests)."""
    temporary = path.with_name(f".{path.name}.forget-tmp")
    temporary.write_text(json.dumps(value, default=str, indent=2), encoding="utf-8")
    os.replace(temporary, path)
