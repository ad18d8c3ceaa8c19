"""Landing zone → bronze Delta tables, idempotently, with nothing lost.

Per file: valid rows go to their table (rows whose key is already there are not
added again), every other line to `quarantine` with its reason, then the file is
recorded in the `ingested_files` ledger. Each write is one Delta commit (up to
COMMIT_ROWS rows of one file), made in that order; a crash between them is harmless
because re-ingesting a file adds no row twice.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.ingest.events import parse_event_lines, with_event_hash
from flywheel_assets.lib.ingest.landing import LandingFile, list_landing, read_line_batches
from flywheel_assets.lib.ingest.trajectories import BadLine, parse_trajectory, to_arrow
from flywheel_assets.lib.lake import Lake, conform, utcnow
from flywheel_assets.lib.tables import (
    ANNOTATIONS, INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES, Table,
)

TARGETS: dict[str, Table] = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}


@dataclass
class IngestReport:
    files: list[dict] = field(default_factory=list)
    rows_new: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)  # by reason_code

    @property
    def lines_quarantined(self) -> int:
        return sum(self.quarantined.values())


def pending_files(config: FlywheelConfig, lake: Lake, files: list[LandingFile] | None = None) -> list[LandingFile]:
    """Ready landing files (all, or those of `files`) not yet in the ledger (same path, size and mtime)."""
    files = list_landing(config.landing) if files is None else files
    if not files:
        return []
    # A ledger row can only match a file with its mtime, so only ledger files holding an mtime at least
    # the oldest asked about are read: the rest are skipped on their Delta statistics, unopened.
    done = lake.read(INGESTED_FILES, columns=["source_file", "size_bytes", "mtime_ns"],
                     prune=f"mtime_ns >= {min(f.mtime_ns for f in files)}").to_pylist()
    seen = {(r["source_file"], r["size_bytes"], r["mtime_ns"]) for r in done}
    return [f for f in files if f.key not in seen]


def ingest_landing(config: FlywheelConfig, lake: Lake, files: list[LandingFile] | None = None,
                   log: Callable[[str], None] = print) -> IngestReport:
    """Ingest the files in order. Batches are parsed two at a time on worker threads
    (DuckDB and Arrow release the GIL) and written on another, but everything that
    decides what is new (key dedup, counters, the ledger) happens here, in file and
    batch order, exactly as if one batch were done after the other."""
    files = pending_files(config, lake) if files is None else files
    report = IngestReport()
    con = duckdb.connect()
    keys = _KeyIndex(con, lake)
    with _Writer(lake) as writer, _Parsers() as parsers:
        progress = None
        for index, lines, good, bad in parsers.batches(files, config):
            landing_file = files[index]
            if progress is None:
                progress = _FileProgress(TARGETS[landing_file.kind])
            if good is not None:
                progress.add(writer, keys, lines, good, bad)
                continue
            progress.commit(writer)  # the file's last batch is done
            rows_new, duplicates, quarantined, lines = (progress.rows_new, progress.duplicates,
                                                        progress.quarantined, progress.lines)
            progress = None
            report.rows_new[landing_file.kind] += rows_new
            report.duplicates[landing_file.kind] += duplicates
            report.quarantined.update(quarantined)
            # queued after the file's rows: the ledger never names a file whose rows are not committed
            writer.append(INGESTED_FILES, pa.Table.from_pylist([{
                "source_file": landing_file.relative, "kind": landing_file.kind,
                "size_bytes": landing_file.size_bytes, "mtime_ns": landing_file.mtime_ns, "lines": lines,
                "rows_new": rows_new, "rows_duplicate": duplicates, "rows_quarantined": sum(quarantined.values()), "ingested_at": utcnow(),
            }], schema=INGESTED_FILES.schema))
            report.files.append({"file": landing_file.relative, "lines": lines, "new": rows_new,
                                 "duplicates": duplicates, "quarantined": sum(quarantined.values())})
            log(f"[{index + 1}/{len(files)}] {landing_file.relative}: {lines} lines, {rows_new} new, "
                f"{duplicates} duplicates, {sum(quarantined.values())} quarantined")
    return report


# Rows of one file are committed together once this many are waiting (fewer, larger
# Delta commits: a commit costs about the same per row for 0.5M rows as for 2M, plus
# a fixed part, and every commit is a table version).
COMMIT_ROWS = 1_000_000


class _FileProgress:
    """One file's counters and the rows waiting for their commit."""

    def __init__(self, table: Table):
        self.table = table
        self.rows_new = self.duplicates = self.lines = 0
        self.quarantined: Counter = Counter()
        self.waiting: list[pa.Table] = []
        self.waiting_bad: list[pa.Table] = []
        self.waiting_rows = 0

    def add(self, writer: "_Writer", keys: "_KeyIndex", lines: int, good: pa.Table, bad: pa.Table) -> None:
        self.lines += lines
        fresh = keys.only_new(self.table, good)
        bad = keys.only_new(QUARANTINE, bad)
        # Every line is new, quarantined or a duplicate: of a row already stored, of a line
        # quarantined before, or of an earlier line of this batch (the parser keeps the first).
        self.duplicates += lines - fresh.num_rows - bad.num_rows
        keys.remember(self.table, fresh)
        keys.remember(QUARANTINE, bad)
        self.rows_new += fresh.num_rows
        self.quarantined.update(bad.column("reason_code").to_pylist())
        for waiting, rows in ((self.waiting, fresh), (self.waiting_bad, bad)):
            if rows.num_rows:
                waiting.append(rows)
                self.waiting_rows += rows.num_rows
        if self.waiting_rows >= COMMIT_ROWS:
            self.commit(writer)

    def commit(self, writer: "_Writer") -> None:
        _commit(writer, self.table, self.waiting, self.waiting_bad)
        self.waiting, self.waiting_bad, self.waiting_rows = [], [], 0


class _Parsers:
    """parse_event_lines / _parse_python on `workers` threads, each event parser with
    its own single-threaded DuckDB connection; results come back in order."""

    def __init__(self, workers: int = 2, ahead: int = 3):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest-parse")
        self.ahead = ahead
        self.local = threading.local()
        self.connections: list[duckdb.DuckDBPyConnection] = []

    def _parse(self, batch: pa.Table, landing_file: LandingFile) -> tuple[pa.Table, pa.Table]:
        if landing_file.kind != "events":
            return _parse_python(batch, landing_file)
        con = getattr(self.local, "con", None)
        if con is None:
            con = self.local.con = duckdb.connect(config={"threads": 1})
            self.connections.append(con)
        return parse_event_lines(con, batch, landing_file.relative)

    def batches(self, files: list[LandingFile], config: FlywheelConfig) -> Iterator[tuple]:
        """(file index, lines, good, bad) per batch, and (file index, 0, None, None) after a file's last."""
        queued: deque[tuple[int, int, Future | None]] = deque()
        try:
            for index, landing_file in enumerate(files):
                for batch in read_line_batches(landing_file.path, config.ingest.max_line_bytes,
                                               config.ingest.batch_lines):
                    queued.append((index, batch.num_rows, self.pool.submit(self._parse, batch, landing_file)))
                    while len(queued) > self.ahead:
                        yield self._result(queued.popleft())
                queued.append((index, 0, None))
            while queued:
                yield self._result(queued.popleft())
        finally:
            for _, _, future in queued:
                if future is not None:
                    future.cancel()

    @staticmethod
    def _result(item: tuple[int, int, Future | None]) -> tuple:
        index, lines, future = item
        return (index, lines, None, None) if future is None else (index, lines, *future.result())

    def __enter__(self) -> "_Parsers":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for con in self.connections:
            con.close()


def _commit(writer: "_Writer", table: Table, rows: list[pa.Table], bad: list[pa.Table]) -> None:
    if rows:
        writer.append(table, _concat(rows, table))
    if bad:
        writer.append(QUARANTINE, _concat(bad, QUARANTINE))


def _concat(parts: list[pa.Table], table: Table) -> pa.Table:
    return conform(parts[0], table) if len(parts) == 1 else pa.concat_tables([conform(p, table) for p in parts])


class _Writer:
    """Delta appends in order, on one background thread, so that the next batches are
    parsed while the last ones are written (deltalake releases the GIL). At most
    `depth` appends wait (memory). Leaving the block waits for every queued append
    (each is a whole commit, whatever happens next); the first failure is raised."""

    def __init__(self, lake: Lake, depth: int = 2):
        self.lake = lake
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-append")
        self.queued: deque[Future] = deque()
        self.depth = depth

    def append(self, table: Table, rows: pa.Table) -> None:
        while self.queued and (self.queued[0].done() or len(self.queued) >= self.depth):
            self.queued.popleft().result()
        self.queued.append(self.pool.submit(self.lake.append, table, rows))

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        errors = [future.exception() for future in self.queued]
        self.queued.clear()
        first = next((error for error in errors if error is not None), None)
        if first is not None and exc[0] is None:
            raise first


def _parse_python(batch: pa.Table, landing_file: LandingFile) -> tuple[pa.Table, pa.Table]:
    now = utcnow()
    good: list[dict] = []
    bad: list[dict] = []
    parse = parse_trajectory if landing_file.kind == "trajectories" else parse_annotation
    for number, raw, problem, truncated in zip(*(batch.column(c).to_pylist() for c in batch.column_names)):
        try:
            if problem is not None:
                raise BadLine(problem, "line longer than the configured max_line_bytes" if problem == "oversized"
                              else "line is not valid UTF-8")
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as error:
                raise BadLine("malformed_json", f"line is not valid JSON: {error.msg} at column {error.colno}") from None
            row = parse(obj, now)
        except BadLine as bad_line:
            bad.append(_quarantine_row(landing_file, number, raw, truncated, bad_line, now))
            continue
        row.update(source_file=landing_file.relative, source_line=number, ingested_at=now)
        good.append(row)
    table = TARGETS[landing_file.kind]
    if table is TRAJECTORIES:
        good_table = to_arrow(good)
    else:
        good_table = conform(pa.Table.from_pylist(good) if good else table.schema.empty_table(), table)
    seen: set[str] = set()
    key = table.key[0]
    keep = [i for i, r in enumerate(good) if not (r[key] in seen or seen.add(r[key]))]
    good_table = good_table.take(keep) if len(keep) != len(good) else good_table
    return good_table, conform(pa.Table.from_pylist(bad) if bad else QUARANTINE.schema.empty_table(), QUARANTINE)


def _quarantine_row(landing_file, number, raw, truncated, bad_line: BadLine, now: datetime) -> dict:
    return {
        "quarantine_id": hashlib.md5(f"{landing_file.relative}:{number}".encode()).hexdigest(),
        "kind": landing_file.kind, "reason_code": bad_line.code, "reason": bad_line.reason,
        "raw": raw, "raw_truncated": truncated, "source_file": landing_file.relative,
        "source_line": number, "ingested_at": now,
    }


def parse_annotation(obj, ingested_at: datetime) -> dict:
    """{"trajectory_id", "score" in [-1, 1] (or "label": good/bad), "annotator", "note", "annotated_at"}."""
    if not isinstance(obj, dict):
        raise BadLine("not_an_object", f"line is JSON {type(obj).__name__}, not an object")
    trajectory_id = obj.get("trajectory_id")
    if not isinstance(trajectory_id, str) or not trajectory_id:
        raise BadLine("missing_key" if trajectory_id is None else "wrong_type", "trajectory_id must be a non-empty string")
    score = obj.get("score", {"good": 1.0, "bad": -1.0}.get(obj.get("label")))
    if score is None:
        raise BadLine("missing_key", "score (in [-1, 1]) or label (good/bad) is required")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise BadLine("wrong_type", f"score must be a number, got {type(score).__name__}")
    if not -1.0 <= score <= 1.0:
        raise BadLine("invalid_value", f"score must be within [-1, 1], got {score}")
    annotated_at = obj.get("annotated_at")
    try:
        when = datetime.fromisoformat(annotated_at.replace("Z", "+00:00")) if isinstance(annotated_at, str) else ingested_at
    except ValueError:
        raise BadLine("invalid_value", f"annotated_at is not an ISO-8601 timestamp: {annotated_at!r}") from None
    annotator = str(obj.get("annotator") or "unknown")
    return {
        "annotation_id": hashlib.md5(f"{trajectory_id}|{annotator}|{when.isoformat()}".encode()).hexdigest(),
        "trajectory_id": trajectory_id, "score": float(score), "annotator": annotator,
        "note": obj.get("note") if isinstance(obj.get("note"), str) else None, "annotated_at": when,
    }


class _KeyIndex:
    """Keys already in the lake, loaded once per run, so re-dropped or overlapping
    files add nothing. Events (tens of millions of ids) are kept as 64-bit hashes in
    sorted arrays: a batch's hashes are looked up by binary search (never a hash
    table of every id seen), and only the rows whose hash is found are compared, as
    strings, with the ids kept beside their hashes, so no hash collision can drop a
    new event. The hash is events.with_event_hash's, which parse_event_lines gives."""

    def __init__(self, con: duckdb.DuckDBPyConnection, lake: Lake):
        self.con = con
        self.sets: dict[str, set[str]] = {}
        self.sorted = [np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)]  # all, then the latest few
        self.ids: list[tuple[np.ndarray, pa.ChunkedArray]] = []  # (hashes, event_ids) per remembered batch
        self._hashes: tuple[pa.Table, np.ndarray] | None = None  # a batch and its sorted hashes
        existing = lake.read(SESSION_EVENTS, columns=["event_id"])
        if existing.num_rows:
            self.remember(SESSION_EVENTS, with_event_hash(con, existing))
        for table in (TRAJECTORIES, ANNOTATIONS, QUARANTINE):
            key = table.key[0]
            self.sets[table.name] = set(lake.read(table, columns=[key]).column(key).to_pylist())

    def _sorted_hashes(self, rows: pa.Table) -> np.ndarray:
        if self._hashes is None or self._hashes[0] is not rows:
            self._hashes = (rows, np.sort(rows.column("event_hash").to_numpy()))
        return self._hashes[1]

    def only_new(self, table: Table, rows: pa.Table) -> pa.Table:
        if rows.num_rows == 0:
            return rows
        if table is SESSION_EVENTS:
            if "event_hash" not in rows.column_names:
                rows = with_event_hash(self.con, rows)
            hashes = self._sorted_hashes(rows)
            known = np.zeros(len(hashes), dtype=bool)
            for seen in self.sorted:
                if len(seen):
                    found = np.searchsorted(seen, hashes)  # sorted needles: each search starts where the last ended
                    known |= seen[np.minimum(found, len(seen) - 1)] == hashes
            if not known.any():
                return rows
            candidates = np.unique(hashes[known])
            seen_ids = []
            for seen_hashes, ids in self.ids:
                found = np.searchsorted(candidates, seen_hashes)
                match = candidates[np.minimum(found, len(candidates) - 1)] == seen_hashes
                if match.any():
                    seen_ids.append(ids.filter(pa.array(match)))
            if not seen_ids:  # only hash collisions
                return rows
            seen_ids = pa.chunked_array(seen_ids).combine_chunks()
            return rows.filter(pc.invert(pc.is_in(rows.column("event_id"), value_set=seen_ids)))
        known = self.sets[table.name]
        key = table.key[0]
        mask = [k not in known for k in rows.column(key).to_pylist()]
        return rows if all(mask) else rows.filter(pa.array(mask))

    def remember(self, table: Table, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        if table is SESSION_EVENTS:
            if "event_hash" not in rows.column_names:
                rows = with_event_hash(self.con, rows)
            hashes = self._sorted_hashes(rows)
            self._hashes = None
            # copies: a zero-copy view would keep the whole batch DuckDB exported alive
            self.ids.append((rows.column("event_hash").to_numpy().copy(),
                             pa.concat_arrays(rows.column("event_id").chunks)))
            everything, latest = self.sorted
            latest = _merge(latest, hashes)
            if 4 * len(latest) > len(everything):  # fold the latest in: each hash moves O(log n) times in all
                everything, latest = _merge(everything, latest), latest[:0]
            self.sorted = [everything, latest]
        else:
            self.sets[table.name].update(rows.column(table.key[0]).to_pylist())


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two sorted arrays as one (timsort merges the two runs)."""
    merged = np.concatenate([a, b])
    merged.sort(kind="stable")
    return merged
