"""Landing zone → bronze Delta tables, idempotently, with nothing lost.

Per file: valid rows go to their table (rows whose key is already there are not
added again), every other line to `quarantine` with its reason, then the file is
recorded in the `ingested_files` ledger. Each write is one Delta commit; a crash
between them is harmless because re-ingesting a file adds no row twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.ingest.events import parse_event_lines
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


def pending_files(config: FlywheelConfig, lake: Lake) -> list[LandingFile]:
    """Ready landing files not yet in the ledger (same path, size and mtime)."""
    done = lake.read(INGESTED_FILES, columns=["source_file", "size_bytes", "mtime_ns"]).to_pylist()
    seen = {(r["source_file"], r["size_bytes"], r["mtime_ns"]) for r in done}
    return [f for f in list_landing(config.landing) if f.key not in seen]


def ingest_landing(config: FlywheelConfig, lake: Lake, files: list[LandingFile] | None = None,
                   log: Callable[[str], None] = print) -> IngestReport:
    files = pending_files(config, lake) if files is None else files
    report = IngestReport()
    con = duckdb.connect()
    keys = _KeyIndex(con, lake)
    with _Writer(lake) as writer:
        for position, landing_file in enumerate(files, start=1):
            rows_new, duplicates, quarantined, lines = _ingest_file(config, writer, con, keys, landing_file)
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
            log(f"[{position}/{len(files)}] {landing_file.relative}: {lines} lines, {rows_new} new, "
                f"{duplicates} duplicates, {sum(quarantined.values())} quarantined")
    return report


# Rows of one file are committed together once this many are waiting (fewer, larger
# Delta commits: a commit costs about the same for 0.5M rows as for 2M).
COMMIT_ROWS = 2_000_000


def _ingest_file(config, writer: "_Writer", con, keys, landing_file: LandingFile) -> tuple[int, int, Counter, int]:
    table = TARGETS[landing_file.kind]
    rows_new = duplicates = lines = 0
    quarantined: Counter = Counter()
    waiting: list[pa.Table] = []
    waiting_bad: list[pa.Table] = []
    waiting_rows = 0
    for batch in read_line_batches(landing_file.path, config.ingest.max_line_bytes, config.ingest.batch_lines):
        lines += batch.num_rows
        if landing_file.kind == "events":
            good, bad = parse_event_lines(con, batch, landing_file.relative)
        else:
            good, bad = _parse_python(batch, landing_file)
        fresh = keys.only_new(table, good)
        duplicates += good.num_rows - fresh.num_rows
        bad = keys.only_new(QUARANTINE, bad)
        keys.remember(table, fresh)
        keys.remember(QUARANTINE, bad)
        rows_new += fresh.num_rows
        quarantined.update(bad.column("reason_code").to_pylist())
        if fresh.num_rows:
            waiting.append(fresh)
            waiting_rows += fresh.num_rows
        if bad.num_rows:
            waiting_bad.append(bad)
            waiting_rows += bad.num_rows
        if waiting_rows >= COMMIT_ROWS:
            _commit(writer, table, waiting, waiting_bad)
            waiting, waiting_bad, waiting_rows = [], [], 0
    _commit(writer, table, waiting, waiting_bad)
    return rows_new, duplicates, quarantined, lines


def _commit(writer: "_Writer", table: Table, rows: list[pa.Table], bad: list[pa.Table]) -> None:
    if rows:
        writer.append(table, _concat(rows, table))
    if bad:
        writer.append(QUARANTINE, _concat(bad, QUARANTINE))


def _concat(parts: list[pa.Table], table: Table) -> pa.Table:
    return conform(parts[0], table) if len(parts) == 1 else pa.concat_tables([conform(p, table) for p in parts])


class _Writer:
    """Delta appends in order, on one background thread, so that the next batch is
    parsed while the last one is written (both release the GIL). At most `depth`
    appends wait (memory); the first failure is raised to the caller."""

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
        try:
            while self.queued:
                future = self.queued.popleft()
                if exc[0] is None:
                    future.result()
                else:
                    future.cancel()
        finally:
            self.pool.shutdown(wait=True)


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
    files add nothing. Events keep theirs in DuckDB (tens of millions of ids) and a
    sorted array of their 64-bit hashes: a batch's hashes are looked up there (a
    binary search per row, not a hash table of every id seen), and only the ids whose
    hash is found are compared as strings, so no hash collision can drop a new event."""

    def __init__(self, con: duckdb.DuckDBPyConnection, lake: Lake):
        self.con = con
        self.sets: dict[str, set[str]] = {}
        con.execute("CREATE TEMP TABLE seen_events (event_id VARCHAR, h UBIGINT)")
        self.hashes = np.empty(0, dtype=np.uint64)  # of seen_events.event_id, sorted
        if lake.exists(SESSION_EVENTS):
            lake.register(con, SESSION_EVENTS, "existing_events")
            con.execute("INSERT INTO seen_events SELECT event_id, hash(event_id) FROM existing_events")
            self.hashes = np.sort(self._column("SELECT h FROM seen_events"))
        self._last: tuple[pa.Table, np.ndarray] | None = None  # rows and their hashes, for remember()
        for table in (TRAJECTORIES, ANNOTATIONS, QUARANTINE):
            key = table.key[0]
            self.sets[table.name] = set(lake.read(table, columns=[key]).column(key).to_pylist())

    def _column(self, sql: str, **tables: pa.Table) -> np.ndarray:
        for name, table in tables.items():
            self.con.register(name, table)
        try:
            return self.con.execute(sql).to_arrow_table().column(0).to_numpy()
        finally:
            for name in tables:
                self.con.unregister(name)

    def _hashes(self, rows: pa.Table) -> np.ndarray:
        """hash(event_id) of the rows, sorted (the order is all lookups and merges need)."""
        if self._last is not None and self._last[0] is rows:
            return self._last[1]
        hashes = np.sort(self._column("SELECT hash(event_id) FROM incoming", incoming=rows.select(["event_id"])))
        self._last = (rows, hashes)
        return hashes

    def only_new(self, table: Table, rows: pa.Table) -> pa.Table:
        if rows.num_rows == 0:
            return rows
        if table is SESSION_EVENTS:
            hashes = self._hashes(rows)
            if len(self.hashes) == 0:
                return rows
            found = np.searchsorted(self.hashes, hashes)  # sorted needles: each search starts where the last ended
            found[found == len(self.hashes)] = 0
            known = self.hashes[found] == hashes
            if not known.any():
                return rows
            candidates = pa.table({"h": pa.array(np.unique(hashes[known]))})
            self.con.register("candidates", candidates)
            try:
                seen = self.con.execute("SELECT event_id FROM seen_events SEMI JOIN candidates USING (h)") \
                    .to_arrow_table().column("event_id")
            finally:
                self.con.unregister("candidates")
            return rows.filter(pc.invert(pc.is_in(rows.column("event_id"), value_set=seen)))
        known = self.sets[table.name]
        key = table.key[0]
        mask = [k not in known for k in rows.column(key).to_pylist()]
        return rows if all(mask) else rows.filter(pa.array(mask))

    def remember(self, table: Table, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        if table is SESSION_EVENTS:
            hashes = self._hashes(rows)
            self._last = None
            self.con.register("incoming", rows.select(["event_id"]))
            try:
                self.con.execute("INSERT INTO seen_events SELECT event_id, hash(event_id) FROM incoming")
            finally:
                self.con.unregister("incoming")
            merged = np.concatenate([self.hashes, hashes])
            merged.sort(kind="stable")  # timsort: a merge of the two sorted runs
            self.hashes = merged
        else:
            self.sets[table.name].update(rows.column(table.key[0]).to_pylist())
