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

import gzip
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flywheel_assets.lib.ingest.landing import walk

LOCK_PREFIXES = (".ingest.lock", ".refresh-")  # lock files hold who holds them, never data


@dataclass(frozen=True)
class Matcher:
    """Does a line belong to the subject? Any of `tokens` (session and trajectory ids) as a JSON
    string, or the user id as a JSON string together with the tenant's (when scoped to a tenant
    other than 'default', which a line may leave out)."""

    tokens: re.Pattern | None
    user: bytes
    tenant: bytes | None

    @classmethod
    def build(cls, user_id: str, tenant_id: str | None, ids: Iterable[str]) -> Matcher:
        quoted = sorted({_quoted(value) for value in ids if value}, key=len, reverse=True)
        pattern = re.compile(b"|".join(re.escape(token) for token in quoted)) if quoted else None
        tenant = None if tenant_id in (None, "default") else _quoted(tenant_id)
        return cls(pattern, _quoted(user_id), tenant)

    def __call__(self, line: bytes) -> bool:
        if self.tokens is not None and self.tokens.search(line):
            return True
        return self.user in line and (self.tenant is None or self.tenant in line)

    def text(self, value: str | None) -> bool:
        return value is not None and self(value.encode("utf-8", "surrogateescape"))


def _quoted(value: str) -> bytes:
    return json.dumps(value).encode()


@dataclass
class Rewritten:
    path: Path
    lines: int  # lines blanked
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
    blanked = 0
    for index, line in enumerate(lines):
        if line.strip() and matcher(line):
            lines[index] = b"" if compressed else b" " * len(line)
            blanked += 1
    if not blanked or dry_run:
        return Rewritten(path, blanked, info.st_size, info.st_size) if blanked else None
    temporary = path.with_name(f".{path.name}.forget-tmp")
    with open(temporary, "wb") as raw:
        if compressed:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
                handle.write(b"\n".join(lines))
        else:
            raw.write(b"\n".join(lines))
        raw.flush()
        os.fsync(raw.fileno())
    os.utime(temporary, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.replace(temporary, path)
    _fsync_dir(path.parent)
    return Rewritten(path, blanked, info.st_size, path.stat().st_size)


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
