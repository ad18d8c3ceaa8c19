"""Line batches into rows and quarantine rows: events by DuckDB, trajectories and annotations in
Python, on worker threads, with every per-line failure a quarantine row (never a failed batch)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import IngestConfig
from flywheel_assets.lib.ingest.annotations import parse_annotation
from flywheel_assets.lib.ingest.events import parse_event_lines, parse_event_lines_reference
from flywheel_assets.lib.ingest.landing import (
    READ_ERRORS, LandingFile, describe_read_error, is_poison, read_line_batches,
)
from flywheel_assets.lib.ingest.limits import PROBLEM_REASONS, mark_too_deep
from flywheel_assets.lib.ingest.trajectories import BadLine, parse_trajectory, to_arrow
from flywheel_assets.lib.lake import conform, utcnow
from flywheel_assets.lib.tables import ANNOTATIONS, QUARANTINE, SESSION_EVENTS, TRAJECTORIES, Table

TARGETS: dict[str, Table] = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}


class IngestError(RuntimeError):
    """A read or a write failed for a reason of the machine, not of the input: the run stops, and the
    files not yet recorded are read again next time."""


class Parsers:
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
            return parse_python(batch, landing_file)
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

    def __enter__(self) -> "Parsers":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for con in self.connections:
            con.close()


def parse_python(batch: pa.Table, landing_file: LandingFile) -> tuple[pa.Table, pa.Table]:
    now = utcnow()
    good: list[dict] = []
    bad: list[dict] = []
    parse = parse_trajectory if landing_file.kind == "trajectories" else parse_annotation
    for number, raw, problem, truncated in zip(*(batch.column(c).to_pylist() for c in batch.column_names)):
        try:
            row = _parse_line(parse, raw, problem, now)
        except BadLine as bad_line:
            bad.append(quarantine_row(landing_file, number, raw, truncated, bad_line, now))
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
                bad.append(quarantine_row(landing_file, row["source_line"], _raw_of(batch, row["source_line"]), False,
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
            bads.append(conform(pa.Table.from_pylist([quarantine_row(
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


def quarantine_row(landing_file, number, raw, truncated, bad_line: BadLine, now: datetime) -> dict:
    return {
        "quarantine_id": hashlib.md5(f"{landing_file.relative}:{number}".encode()).hexdigest(),
        "kind": landing_file.kind, "reason_code": bad_line.code, "reason": bad_line.reason,
        "raw": raw, "raw_truncated": truncated, "source_file": landing_file.relative,
        "source_line": number, "ingested_at": now,
    }
