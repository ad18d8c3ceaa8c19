"""Landing zone → bronze Delta tables, idempotently, with nothing lost.

Per file: valid rows go to their table (rows whose key is already there are not
added again), every other line to `quarantine` with its reason, then the file is
recorded in the `ingested_files` ledger. Each write is one Delta commit; a crash
between them is harmless because re-ingesting a file adds no row twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa

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
    for position, landing_file in enumerate(files, start=1):
        rows_new, duplicates, quarantined, lines = _ingest_file(config, lake, con, keys, landing_file)
        report.rows_new[landing_file.kind] += rows_new
        report.duplicates[landing_file.kind] += duplicates
        report.quarantined.update(quarantined)
        lake.append(INGESTED_FILES, pa.Table.from_pylist([{
            "source_file": landing_file.relative, "kind": landing_file.kind,
            "size_bytes": landing_file.size_bytes, "mtime_ns": landing_file.mtime_ns, "lines": lines,
            "rows_new": rows_new, "rows_duplicate": duplicates, "rows_quarantined": sum(quarantined.values()), "ingested_at": utcnow(),
        }], schema=INGESTED_FILES.schema))
        report.files.append({"file": landing_file.relative, "lines": lines, "new": rows_new,
                             "duplicates": duplicates, "quarantined": sum(quarantined.values())})
        log(f"[{position}/{len(files)}] {landing_file.relative}: {lines} lines, {rows_new} new, "
            f"{duplicates} duplicates, {sum(quarantined.values())} quarantined")
    return report


def _ingest_file(config, lake, con, keys, landing_file: LandingFile) -> tuple[int, int, Counter, int]:
    table = TARGETS[landing_file.kind]
    rows_new = duplicates = lines = 0
    quarantined: Counter = Counter()
    for batch in read_line_batches(landing_file.path, config.ingest.max_line_bytes, config.ingest.batch_lines):
        lines += batch.num_rows
        if landing_file.kind == "events":
            good, bad = parse_event_lines(con, batch, landing_file.relative)
        else:
            good, bad = _parse_python(batch, landing_file)
        fresh = keys.only_new(table, good)
        duplicates += good.num_rows - fresh.num_rows
        bad = keys.only_new(QUARANTINE, bad)
        if fresh.num_rows:
            lake.append(table, fresh)
        if bad.num_rows:
            lake.append(QUARANTINE, bad)
        keys.remember(table, fresh)
        keys.remember(QUARANTINE, bad)
        rows_new += fresh.num_rows
        quarantined.update(bad.column("reason_code").to_pylist())
    return rows_new, duplicates, quarantined, lines


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
    files add nothing. Events keep theirs in DuckDB (tens of millions of ids)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, lake: Lake):
        self.con = con
        self.sets: dict[str, set[str]] = {}
        con.execute("CREATE TEMP TABLE seen_events (event_id VARCHAR)")
        if lake.exists(SESSION_EVENTS):
            lake.register(con, SESSION_EVENTS, "existing_events")
            con.execute("INSERT INTO seen_events SELECT event_id FROM existing_events")
        for table in (TRAJECTORIES, ANNOTATIONS, QUARANTINE):
            key = table.key[0]
            self.sets[table.name] = set(lake.read(table, columns=[key]).column(key).to_pylist())

    def only_new(self, table: Table, rows: pa.Table) -> pa.Table:
        if rows.num_rows == 0:
            return rows
        if table is SESSION_EVENTS:
            self.con.register("incoming", rows)
            fresh = self.con.execute("SELECT * FROM incoming ANTI JOIN seen_events USING (event_id)").to_arrow_table()
            self.con.unregister("incoming")
            return fresh.select(rows.column_names)
        known = self.sets[table.name]
        key = table.key[0]
        mask = [k not in known for k in rows.column(key).to_pylist()]
        return rows if all(mask) else rows.filter(pa.array(mask))

    def remember(self, table: Table, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        if table is SESSION_EVENTS:
            self.con.register("incoming", rows)
            self.con.execute("INSERT INTO seen_events SELECT event_id FROM incoming")
            self.con.unregister("incoming")
        else:
            self.sets[table.name].update(rows.column(table.key[0]).to_pylist())
