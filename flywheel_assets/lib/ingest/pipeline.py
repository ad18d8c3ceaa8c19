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
import json
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.config import FlywheelConfig, IngestConfig
from flywheel_assets.lib.feedback.scoring import SCORED_EVENTS
from flywheel_assets.lib.ingest.annotations import parse_annotation
from flywheel_assets.lib.ingest.cleanup import clean_stale
from flywheel_assets.lib.ingest.events import parse_event_lines, parse_event_lines_reference
from flywheel_assets.lib.ingest.keys import KeyIndex
from flywheel_assets.lib.ingest.landing import (
    READ_ERRORS, LandingFile, describe_read_error, is_poison, list_landing, read_line_batches,
)
from flywheel_assets.lib.ingest.limits import PROBLEM_REASONS, mark_too_deep
from flywheel_assets.lib.ingest.lock import ingest_lock
from flywheel_assets.lib.ingest.trajectories import BadLine, parse_trajectory, to_arrow
from flywheel_assets.lib.lake import Lake, conform, sql_literal, utcnow
from flywheel_assets.lib.tables import (
    ANNOTATIONS, INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES, Table,
)

TARGETS: dict[str, Table] = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}


class IngestError(RuntimeError):
    """A write to the lake failed: the run stops, and the files not yet recorded are read again next time."""


@dataclass
class IngestReport:
    files: list[dict] = field(default_factory=list)
    rows_new: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    quarantined: Counter = field(default_factory=Counter)  # by reason_code
    resumed: Counter = field(default_factory=Counter)  # rows an earlier, failed attempt had committed, by kind
    unscored_event_types: Counter = field(default_factory=Counter)  # new events whose type scoring ignores
    cleaned: list[str] = field(default_factory=list)  # stale leftovers deleted before the run

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
        files = pending_files(config, lake, files)  # under the lock: another ingest's files are done
        if files:
            _ingest(config, lake, files, report, log)
    return report


def _ingest(config: FlywheelConfig, lake: Lake, files: list[LandingFile], report: IngestReport,
            log: Callable[[str], None]) -> None:
    started = utcnow()
    keys = KeyIndex(duckdb.connect(), lake)
    with _Writer(lake) as writer, _Parsers(config.ingest) as parsers:
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


class _Parsers:
    """Each file's line batches parsed on `workers` threads (events by DuckDB, each thread with
    its own single-threaded connection; the rest in Python); results come back in order."""

    def __init__(self, settings: IngestConfig, workers: int = 2, ahead: int = 3):
        self.settings = settings
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest-parse")
        self.ahead = ahead
        self.local = threading.local()
        self.connections: list[duckdb.DuckDBPyConnection] = []

    def _parse(self, batch: pa.Table, landing_file: LandingFile) -> tuple[pa.Table, pa.Table]:
        batch = mark_too_deep(batch, self.settings.max_json_depth)
        if landing_file.kind != "events":
            return _parse_python(batch, landing_file)
        con = getattr(self.local, "con", None)
        if con is None:
            con = self.local.con = duckdb.connect(config={"threads": 1})
            self.connections.append(con)
        try:
            return parse_event_lines(con, batch, landing_file.relative)
        except duckdb.Error:  # something in the batch broke a query: find the line, quarantine only it
            return _parse_events_one_by_one(con, batch, landing_file)

    def batches(self, files: list[LandingFile]) -> Iterator[tuple]:
        """(file index, lines, good, bad) per batch; (file index, 0, problem, None) when the file, or
        the rest of it, cannot be read; (file index, 0, None, None) after a file's last."""
        queued: deque[tuple[int, int, Future | str | None]] = deque()
        try:
            for index, landing_file in enumerate(files):
                for item in self._read(index, landing_file):
                    queued.append(item)
                    while len(queued) > self.ahead:
                        yield self._result(queued.popleft())
                queued.append((index, 0, None))
            while queued:
                yield self._result(queued.popleft())
        finally:
            for _, _, future in queued:
                if isinstance(future, Future):
                    future.cancel()

    def _read(self, index: int, landing_file: LandingFile) -> Iterator[tuple]:
        if landing_file.problem is not None:
            yield index, 0, landing_file.problem
            return
        try:
            for batch in read_line_batches(landing_file.path, self.settings.max_line_bytes, self.settings.batch_lines):
                yield index, batch.num_rows, self.pool.submit(self._parse, batch, landing_file)
        except READ_ERRORS as error:
            if not is_poison(error):
                raise IngestError(f"reading {landing_file.relative} failed ({type(error).__name__}: {error}), a fault "
                                  "of the machine rather than of the file: it is read again by the next ingest, "
                                  "and each line added once") from error
            yield index, 0, describe_read_error(error)

    @staticmethod
    def _result(item: tuple[int, int, Future | str | None]) -> tuple:
        index, lines, future = item
        if not isinstance(future, Future):
            return index, lines, future, None
        return (index, lines, *future.result())

    def __enter__(self) -> "_Parsers":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for con in self.connections:
            con.close()


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


def _parse_python(batch: pa.Table, landing_file: LandingFile) -> tuple[pa.Table, pa.Table]:
    now = utcnow()
    good: list[dict] = []
    bad: list[dict] = []
    parse = parse_trajectory if landing_file.kind == "trajectories" else parse_annotation
    for number, raw, problem, truncated in zip(*(batch.column(c).to_pylist() for c in batch.column_names)):
        try:
            row = _parse_line(parse, raw, problem, now)
        except BadLine as bad_line:
            bad.append(_quarantine_row(landing_file, number, raw, truncated, bad_line, now))
            continue
        row.update(source_file=landing_file.relative, source_line=number, ingested_at=now)
        good.append(row)
    table = TARGETS[landing_file.kind]
    try:
        good_table = _rows_to_arrow(good, table)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):  # a row no check foresaw: find it
        kept = []
        for row in good:
            try:
                _rows_to_arrow([row], table)
            except (pa.ArrowException, ValueError, TypeError, OverflowError) as error:
                bad.append(_quarantine_row(landing_file, row["source_line"], _raw_of(batch, row["source_line"]), False,
                                           BadLine("unparseable", f"{type(error).__name__} while storing the line: "
                                                                  f"{error}"), now))
                continue
            kept.append(row)
        good = kept
        good_table = _rows_to_arrow(good, table)
    seen: set[str] = set()
    key = table.key[0]
    keep = [i for i, r in enumerate(good) if not (r[key] in seen or seen.add(r[key]))]
    good_table = good_table.take(keep) if len(keep) != len(good) else good_table
    return good_table, conform(pa.Table.from_pylist(bad) if bad else QUARANTINE.schema.empty_table(), QUARANTINE)


def _rows_to_arrow(rows: list[dict], table: Table) -> pa.Table:
    if table is TRAJECTORIES:
        return to_arrow(rows)
    return conform(pa.Table.from_pylist(rows) if rows else table.schema.empty_table(), table)


def _raw_of(batch: pa.Table, line: int) -> str:
    numbers = batch.column("source_line").to_pylist()
    return batch.column("raw")[numbers.index(line)].as_py()


def _parse_line(parse: Callable, raw: str, problem: str | None, now: datetime) -> dict:
    if problem is not None:
        raise BadLine(problem, PROBLEM_REASONS.get(problem, problem))
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as error:
        raise BadLine("malformed_json", f"line is not valid JSON: {error.msg} at column {error.colno}") from None
    try:
        # a lone surrogate (\ud800) is valid JSON but not storable text: every later write would fail
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return parse(obj, now)
    except BadLine:
        raise
    except UnicodeEncodeError:
        raise BadLine("not_utf8", "line holds a lone UTF-16 surrogate escape (such as \\ud800): not storable text") from None
    except (RecursionError, ValueError, TypeError, OverflowError, AttributeError, KeyError) as error:
        # a shape no check foresaw: this line is quarantined, the batch goes on
        raise BadLine("unparseable", f"{type(error).__name__} while reading the line: {error}") from None


def _parse_events_one_by_one(con: duckdb.DuckDBPyConnection, batch: pa.Table,
                             landing_file: LandingFile) -> tuple[pa.Table, pa.Table]:
    """The reference parser line by line; a line that still breaks it is quarantined as unparseable."""
    goods, bads = [], []
    now = utcnow()
    for i in range(batch.num_rows):
        line = batch.slice(i, 1)
        try:
            good, bad = parse_event_lines_reference(con, line, landing_file.relative)
        except duckdb.Error as error:
            number, raw, _, truncated = (line.column(c)[0].as_py() for c in line.column_names)
            bads.append(conform(pa.Table.from_pylist([_quarantine_row(
                landing_file, number, raw, truncated,
                BadLine("unparseable", f"{type(error).__name__} while reading the line: {error}"), now)]), QUARANTINE))
            continue
        goods.append(good)
        bads.append(conform(bad, QUARANTINE))
    good = pa.concat_tables([conform(g, SESSION_EVENTS) for g in goods]) if goods else SESSION_EVENTS.schema.empty_table()
    ids = good.column("event_id").to_pylist()
    seen: set[str] = set()
    first = [i for i, event_id in enumerate(ids) if not (event_id in seen or seen.add(event_id))]  # as parse_event_lines
    if len(first) != len(ids):
        good = good.take(pa.array(first, pa.int64()))
    return conform(good, SESSION_EVENTS), pa.concat_tables(bads)


def _quarantine_row(landing_file, number, raw, truncated, bad_line: BadLine, now: datetime) -> dict:
    return {
        "quarantine_id": hashlib.md5(f"{landing_file.relative}:{number}".encode()).hexdigest(),
        "kind": landing_file.kind, "reason_code": bad_line.code, "reason": bad_line.reason,
        "raw": raw, "raw_truncated": truncated, "source_file": landing_file.relative,
        "source_line": number, "ingested_at": now,
    }
