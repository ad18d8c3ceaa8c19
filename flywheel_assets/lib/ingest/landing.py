"""The landing zone: which files are there, and their lines.

Agents (or the logging client) drop `*.jsonl` / `*.jsonl.gz` files under
landing/{events,trajectories,annotations}/. A file whose name starts with '.' or
ends in .tmp/.part is still being written and is skipped until renamed.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

KINDS = ("events", "trajectories", "annotations")
SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".inprogress")

LINE_SCHEMA = pa.schema([("source_line", pa.int64()), ("raw", pa.string()),
                         ("problem", pa.string()), ("raw_truncated", pa.bool_())])


@dataclass(frozen=True, order=True)
class LandingFile:
    mtime_ns: int
    relative: str  # path relative to the landing root, with '/' separators
    kind: str
    size_bytes: int
    path: Path

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.relative, self.size_bytes, self.mtime_ns)


def is_ready(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(TEMP_SUFFIXES) and name.endswith(SUFFIXES)


def list_landing(landing_root: Path) -> list[LandingFile]:
    """Every ready file, oldest first (the order they are ingested in)."""
    found: list[LandingFile] = []
    for kind in KINDS:
        folder = landing_root / kind
        if not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            if not path.is_file() or not is_ready(path.name):
                continue
            stat = path.stat()
            found.append(LandingFile(stat.st_mtime_ns, path.relative_to(landing_root).as_posix(),
                                     kind, stat.st_size, path))
    return sorted(found)


def read_line_batches(path: Path, max_line_bytes: int, batch_lines: int) -> Iterator[pa.Table]:
    """The file's non-empty lines in batches, as (source_line, raw, problem, raw_truncated).

    `problem` is "not_utf8" or "oversized" for lines that must go to quarantine
    whatever they contain; raw then holds an escaped or cut copy.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        numbers: list[int] = []
        raws: list[str] = []
        problems: list[str | None] = []
        truncated: list[bool] = []
        for number, line in enumerate(handle, start=1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            problem = None
            cut = False
            if len(line) > max_line_bytes:
                problem, cut = "oversized", True
                line = line[:max_line_bytes]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("utf-8", errors="backslashreplace")
                problem = problem or "not_utf8"
            numbers.append(number)
            raws.append(text)
            problems.append(problem)
            truncated.append(cut)
            if len(numbers) >= batch_lines:
                yield _batch(numbers, raws, problems, truncated)
                numbers, raws, problems, truncated = [], [], [], []
        if numbers:
            yield _batch(numbers, raws, problems, truncated)


def _batch(numbers, raws, problems, truncated) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(numbers, pa.int64()), pa.array(raws, pa.string()),
         pa.array(problems, pa.string()), pa.array(truncated, pa.bool_())],
        schema=LINE_SCHEMA,
    )
