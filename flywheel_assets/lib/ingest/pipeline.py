"""Landing zone → bronze Delta tables: every line once, in a table or in quarantine.

The guarantees, and what gives each:
- One ingest at a time over a landing zone (lock.ingest_lock, held for the whole run);
  which files are pending is decided only once the lock is held.
- Per file: valid rows go to their table (rows whose key is already there are not added
  again), every other line to `quarantine` with its reason, then the file is recorded in
  the `ingested_files` ledger. Each write is one Delta commit (up to COMMIT_ROWS rows of
  one file), made in that order on one writer thread; once a write fails, no later one
  is made, so the ledger never names a file whose rows are not all committed. The run
  then fails with IngestError, and the next run reads the file again: its committed rows
  are found by key and not added twice, the rest are added — each line once.
- A file that cannot be read (permissions, a truncated or corrupt .gz) keeps the lines
  read before the fault, gets one quarantine row for the rest (reason, path, size), and
  is recorded; a symlink or special file gets one quarantine row and is never opened.
  A line that breaks a parser (too deep, a date out of range, anything unforeseen) is a
  quarantine row. Nothing about one file stops the others.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.feedback.scoring import SCORED_EVENTS
from flywheel_assets.lib.ingest.cleanup import clean_stale
from flywheel_assets.lib.ingest.keys import KeyIndex
from flywheel_assets.lib.ingest.landing import LandingFile, list_landing
from flywheel_assets.lib.ingest.lock import ingest_lock
from flywheel_assets.lib.ingest.remote_landing import pull
from flywheel_assets.lib.ingest.parsing import TARGETS, IngestError, Parsers
from flywheel_assets.lib.lake import Lake, conform, sql_literal, utcnow
from flywheel_assets.lib.tables import INGESTED_FILES, QUARANTINE, Table

__all__ = ["IngestError", "IngestReport", "TARGETS", "ingest_landing", "pending_files"]


@dataclass
class IngestReport:
    files: list[dict] = field(default_factory=list)
    rows_new: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)  # by reason_code
    resumed: Counter = field(default_factory=Counter)  # rows an earlier, failed attempt had committed, by kind
    unscored_event_types: Counter = field(default_factory=Counter)  # new events whose type scoring ignores
    cleaned: list[str] = field(default_factory=list)  # stale leftovers deleted before the run
    pulled: int = 0  # objects copied in from the landing bucket

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
                   log: Callable[[str], None] = print, owner: str = "ingest") -> IngestReport:
    """Ingest the pending files (all, or those of `files`) in order, holding the landing zone's lock.

    Batches are parsed two at a time on worker threads (DuckDB and Arrow release the GIL)
    and written on another, but everything that decides what is new (key dedup, counters,
    the ledger) happens here, in file and batch order, as if one batch came after the other."""
    with ingest_lock(config.landing, config.ingest.lock_timeout_s, owner=owner, log=log):
        report = IngestReport(cleaned=clean_stale(config, lake))
        if files is None:  # the landing bucket's new objects (FLYWHEEL_LANDING_URI), copied in
            report.pulled = pull(config, lake, log)
        files = pending_files(config, lake, files)  # under the lock: another ingest's files are done
        if files:
            _ingest(config, lake, files, report, log)
    return report


def _ingest(config: FlywheelConfig, lake: Lake, files: list[LandingFile], report: IngestReport,
            log: Callable[[str], None]) -> None:
    started = utcnow()
    keys = KeyIndex(duckdb.connect(), lake)
    with _Writer(lake) as writer, Parsers(config.ingest) as parsers:
        progress: _FileProgress | None = None
        for index, lines, good, bad in parsers.batches(files):
            landing_file = files[index]
            if progress is None:
                progress = _FileProgress(landing_file)
            if isinstance(good, pa.Table):
                fresh = progress.add(writer, keys, lines, good, bad)
                if landing_file.kind == "events":
                    report.unscored_event_types.update(_unscored(fresh))
                continue
            if good is not None:  # the file, or what is left of it, cannot be read
                progress.unreadable(keys, good)
                continue
            progress.commit(writer)  # the file's last batch is done
            if progress.duplicates:
                progress.count_resumed(lake, started)
            report.rows_new[landing_file.kind] += progress.rows_new - progress.resumed
            report.resumed[landing_file.kind] += progress.resumed
            report.duplicates[landing_file.kind] += progress.duplicates
            report.quarantined.update(progress.quarantined)
            # after the file's rows on the one writer thread, and never made once a write has failed
            writer.append(INGESTED_FILES, pa.Table.from_pylist([progress.ledger_row()], schema=INGESTED_FILES.schema),
                          landing_file)
            report.files.append(progress.summary())
            log(f"[{index + 1}/{len(files)}] {landing_file.relative}: {progress.lines} lines, {progress.rows_new} new, "
                f"{progress.duplicates} duplicates, {sum(progress.quarantined.values())} quarantined"
                + (f" ({progress.problem})" if progress.problem else ""))
            progress = None


def _unscored(events: pa.Table) -> Counter:
    types = events.column("event_type")
    unknown = types.filter(pc.invert(pc.is_in(types, value_set=pa.array(SCORED_EVENTS))))
    return Counter({row["values"]: row["counts"] for row in pc.value_counts(unknown).to_pylist()}) if len(unknown) else Counter()


# Rows of one file are committed together once this many are waiting (fewer, larger
# Delta commits: a commit costs about the same per row for 0.5M rows as for 2M, plus
# a fixed part, and every commit is a table version).
COMMIT_ROWS = 1_000_000


class _FileProgress:
    """One file's counters and the rows waiting for their commit."""

    def __init__(self, landing_file: LandingFile):
        self.file = landing_file
        self.table = TARGETS[landing_file.kind]
        self.rows_new = self.duplicates = self.lines = self.resumed = 0
        self.quarantined: Counter = Counter()
        self.problem: str | None = None
        self.waiting: list[pa.Table] = []
        self.waiting_bad: list[pa.Table] = []
        self.waiting_rows = 0

    def add(self, writer: "_Writer", keys: KeyIndex, lines: int, good: pa.Table, bad: pa.Table) -> pa.Table:
        """Counts the batch, queues its new rows and quarantined lines; returns the new rows."""
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
        return fresh

    def unreadable(self, keys: KeyIndex, problem: str) -> None:
        """The file (or the rest of it, after the lines already read) as one quarantine row."""
        self.problem = problem
        where = f"after line {self.last_line}: the rest of the file" if self.lines else "the file"
        row = conform(pa.Table.from_pylist([{
            "quarantine_id": hashlib.md5(f"{self.file.relative}:file:{self.file.size_bytes}:{self.file.mtime_ns}"
                                         .encode()).hexdigest(),
            "kind": self.file.kind, "reason_code": "unreadable_file",
            "reason": f"{problem}; {where} ({self.file.size_bytes} bytes) was not read",
            "raw": "", "raw_truncated": True, "source_file": self.file.relative, "source_line": 0,
            "ingested_at": utcnow(),
        }]), QUARANTINE)
        row = keys.only_new(QUARANTINE, row)
        keys.remember(QUARANTINE, row)
        if row.num_rows:
            self.quarantined["unreadable_file"] += 1
            self.waiting_bad.append(row)
        else:  # recorded by an earlier attempt that failed later (count_resumed tells)
            self.duplicates += 1

    @property
    def last_line(self) -> int:
        last = [t.column("source_line") for t in (*self.waiting, *self.waiting_bad) if t.num_rows]
        return max((pc.max(c).as_py() for c in last), default=self.lines)

    def commit(self, writer: "_Writer") -> None:
        if self.waiting:
            writer.append(self.table, _concat(self.waiting, self.table), self.file)
        if self.waiting_bad:
            writer.append(QUARANTINE, _concat(self.waiting_bad, QUARANTINE), self.file)
        self.waiting, self.waiting_bad, self.waiting_rows = [], [], 0

    def count_resumed(self, lake: Lake, started: datetime) -> None:
        """Rows of this file that an earlier attempt committed before it failed (so before this run
        began, and after the ledger last recorded this path) were counted as duplicates here:
        they are this file's rows, and the ledger says so."""
        path = sql_literal(self.file.relative)
        last = lake.read(INGESTED_FILES, columns=["ingested_at"], filter_sql=f"source_file = {path}",
                         prune=f"source_file = {path}").column("ingested_at")
        since = pc.max(last).as_py() if len(last) else None
        window = f"source_file = {path} AND ingested_at < '{started.isoformat()}'" + (
            f" AND ingested_at > '{since.isoformat()}'" if since is not None else "")
        rows = lake.read(self.table, columns=["source_line"], filter_sql=window, prune=f"source_file = {path}")
        bad = lake.read(QUARANTINE, columns=["reason_code"], filter_sql=window, prune=f"source_file = {path}")
        self.resumed = rows.num_rows
        self.rows_new += rows.num_rows
        self.duplicates -= rows.num_rows + bad.num_rows
        self.quarantined.update(bad.column("reason_code").to_pylist())

    def ledger_row(self) -> dict:
        return {"source_file": self.file.relative, "kind": self.file.kind, "size_bytes": self.file.size_bytes,
                "mtime_ns": self.file.mtime_ns, "lines": self.lines, "rows_new": self.rows_new,
                "rows_duplicate": self.duplicates, "rows_quarantined": sum(self.quarantined.values()),
                "ingested_at": utcnow()}

    def summary(self) -> dict:
        summary = {"file": self.file.relative, "lines": self.lines, "new": self.rows_new,
                   "duplicates": self.duplicates, "quarantined": sum(self.quarantined.values())}
        return summary | ({"problem": self.problem} if self.problem else {})


def _concat(parts: list[pa.Table], table: Table) -> pa.Table:
    return conform(parts[0], table) if len(parts) == 1 else pa.concat_tables([conform(p, table) for p in parts])


class _Writer:
    """Delta appends in order, on one background thread, so that the next batches are parsed
    while the last ones are written (deltalake releases the GIL). At most `depth` appends wait
    (memory). The first failure stops the writer: every append queued after it is skipped (the
    ledger row of a file comes after its rows, so it is never written for a file whose rows
    failed), the next append() raises it, and leaving the block raises it."""

    def __init__(self, lake: Lake, depth: int = 2):
        self.lake = lake
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-append")
        self.queued: deque[Future] = deque()
        self.depth = depth
        self.failure: IngestError | None = None

    def append(self, table: Table, rows: pa.Table, landing_file: LandingFile) -> None:
        while self.queued and (self.queued[0].done() or len(self.queued) >= self.depth):
            self.queued.popleft().result()
        if self.failure is not None:
            raise self.failure
        self.queued.append(self.pool.submit(self._append, table, rows, landing_file))

    def _append(self, table: Table, rows: pa.Table, landing_file: LandingFile) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            self.lake.append(table, rows)
        except BaseException as error:  # deltalake's Rust panics are BaseException (pyo3 PanicException)
            self.failure = IngestError(
                f"writing {rows.num_rows:,} rows of {landing_file.relative} to {table.layer}/{table.name} failed "
                f"({type(error).__name__}: {error}). Files recorded in {INGESTED_FILES.name} before it are complete; "
                f"{landing_file.relative} and the files after it are not recorded, and the next ingest reads them "
                "again and adds each line once.")
            raise self.failure from error

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        errors = [future.exception() for future in self.queued]
        self.queued.clear()
        first = self.failure or next((error for error in errors if error is not None), None)
        if first is not None and exc[0] is None:
            raise first
