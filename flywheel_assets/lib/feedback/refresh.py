"""Refreshes that follow new data: fold in what arrived since the last run, upsert what changed.

Each input is read from a watermark: the bronze tables by ingested_at (the ingest's wall
clock; ingests hold the ingest lock, so it grows in commit order), llm_judgments by
judged_at, the silver tables by updated_at. The watermarks, the rows folded in so far and a
fingerprint of the settings the output depends on are stored in the output's own Delta
commit as app transactions (Delta's idempotent-writer record: txn actions survive
checkpoints and compaction), so rows and watermarks move in one commit: a run killed
before it commits is redone whole, never half.

A full recompute (the same code from an empty state) happens when the output is missing
or has no marks; the fingerprint changed (weights, fusion, tiers, a new calibration, the
output's columns, or WRITE_FORMAT: how its files are written); an
append-only input's row count is not what was folded plus what is new (rows deleted or
rewritten, or appended without the watermark column); an upstream silver table was
recomputed in full since (its generation changed); or the caller asks (full=True).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.lake import OPERATION, TIER_MOVE, Lake, rows_where, sql_literal
from flywheel_assets.lib.tables import Table

GENERATION = "generation"  # µs time of the output's last full recompute: what readers of it compare
_FINGERPRINT = "fingerprint"
# Part of every fingerprint: raised when the way the outputs' files are written changes, so an
# existing lake is recomputed (rewritten) in full once. 2: plain string types (Lake.upsert),
# replacing a MERGE's string_view files, which failed filters when mixed with plain ones.
WRITE_FORMAT = 2
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def micros(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def fingerprint(*parts) -> int:
    """63 bits of the sha256 of the settings (an app transaction version is a signed 64-bit int)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


@dataclass(frozen=True)
class Feed:
    """An input read from a watermark. `append_only` inputs are also checked by row count;
    the others (silver tables updated in place) by their generation."""

    table: Table
    column: str
    append_only: bool = True


@dataclass
class Refresh:
    lake: Lake
    output: Table
    feeds: tuple[Feed, ...]
    settings: int
    full: bool = False
    reason: str = "incremental"
    versions: dict[str, int | None] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)  # what the commit will record
    new_rows: dict[str, int] = field(default_factory=dict)
    _after: dict[str, datetime | None] = field(default_factory=dict)

    @classmethod
    def plan(cls, lake: Lake, output: Table, feeds: tuple[Feed, ...], settings: int, full: bool = False) -> Refresh:
        settings = fingerprint(settings, WRITE_FORMAT, output.schema.to_string())
        refresh = cls(lake, output, feeds, settings)
        apps = [_FINGERPRINT, GENERATION] + [app for feed in feeds for app in _apps(feed)]
        stored = lake.marks(output, *apps)
        reason = "asked for a full recompute" if full else None
        if reason is None and stored[_FINGERPRINT] is None:
            reason = "no earlier refresh"
        elif reason is None and stored[_FINGERPRINT] != settings:
            reason = "settings changed"
        for feed in feeds:
            dt = lake.delta(feed.table)
            refresh.versions[feed.table.name] = None if dt is None else dt.version()
            after, count, generation, _ = (stored[app] for app in _apps(feed))
            if reason is None and after is None and dt is not None:
                reason = f"{feed.table.name} never read"
            if reason is None and feed.append_only and count is not None \
                    and count > lake.row_count(feed.table, refresh.versions[feed.table.name]):
                reason = f"{feed.table.name} lost rows since the last refresh"
            folded = stored[f"{feed.table.name}.version"]
            if reason is None and feed.append_only and dt is not None and (
                    changed := _rewrites(dt, folded)):
                reason = f"{feed.table.name} was changed in place since the last refresh ({changed})"
            upstream = lake.marks(feed.table, GENERATION, version=refresh.versions[feed.table.name])[GENERATION]
            if reason is None and not feed.append_only and generation != upstream:
                reason = f"{feed.table.name} was recomputed in full"
            refresh._after[feed.table.name] = None if after is None else from_micros(after)
            if feed.append_only:
                refresh.marks[f"{feed.table.name}.rows"] = count or 0
        refresh.full, refresh.reason = reason is not None, reason or "incremental"
        if refresh.full:
            refresh._after = {name: None for name in refresh._after}
            refresh.marks = {app: 0 for app in refresh.marks}
        for feed in feeds:
            if feed.append_only:
                refresh.marks[f"{feed.table.name}.version"] = refresh.versions[feed.table.name] or 0
        refresh.marks[_FINGERPRINT] = settings
        refresh.marks[GENERATION] = stored[GENERATION] if not refresh.full and stored[GENERATION] else 0
        return refresh

    def read_new(self, feed: Feed, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        """The rows of `feed` past its watermark (every row in a full recompute), at the version
        planned, and moves the watermark to the newest row read. `where` narrows the rows
        returned, not the rows counted."""
        name = feed.table.name
        after = self._after.get(name)
        since = None if after is None else f"{feed.column} > {sql_literal(after.isoformat())}"
        wanted = sorted(set(columns or feed.table.schema.names) | {feed.column})
        rows = self.lake.read(feed.table, columns=wanted, filter_sql=since, version=self.versions.get(name),
                              prune=since)
        newest = pc.max(rows.column(feed.column)).as_py() if rows.num_rows else None
        if newest is not None:
            self.marks[f"{name}.after"] = micros(newest)
        else:  # nothing new (or no table yet): read from where it was, or from the start
            self.marks[f"{name}.after"] = 0 if after is None else micros(after)
        if feed.append_only:
            total = self.lake.row_count(feed.table, self.versions.get(name))
            counted = self.marks[f"{name}.rows"] + rows.num_rows
            if counted != total and not self.full:
                raise StaleWatermark(f"{name}: {total} rows, but {counted} folded and new "
                                     f"(rows without {feed.column}, or older than the watermark)")
            self.marks[f"{name}.rows"] = total if self.full else counted
        if not feed.append_only:
            self.marks[f"{name}.generation"] = self.lake.marks(feed.table, GENERATION, version=self.versions.get(name))[GENERATION] or 0
        self.new_rows[name] = rows.num_rows
        if where is not None and rows.num_rows:
            rows = rows_where(rows, where)
        return rows.select([c for c in wanted if columns is None or c in columns])

    def commit(self, rows: pa.Table, partitions: set[str] | None, now: datetime) -> int | None:
        """Write the changed rows and the marks in one commit (the whole table in a full recompute)."""
        if self.full:
            self.marks[GENERATION] = micros(now)
        return self.lake.upsert(self.output, rows, partitions, self.marks, replace=self.full)


class StaleWatermark(RuntimeError):
    """An append-only input does not add up: the caller recomputes in full instead."""


def _apps(feed: Feed) -> tuple[str, str, str, str]:
    name = feed.table.name
    return f"{name}.after", f"{name}.rows", f"{name}.generation", f"{name}.version"


# What an append-only input's log may hold between two refreshes: appends, and compactions
# and vacuums, which change no row. Anything else (an UPDATE, DELETE, MERGE, overwrite) may
# have rewritten rows the watermark will never see again.
_HARMLESS = {"OPTIMIZE", "VACUUM START", "VACUUM END"}


def _rewrites(dt, folded: int | None) -> str | None:
    """The first operation since version `folded` that may have rewritten rows, or None."""
    if folded is None or dt.version() <= folded:
        return None
    for commit in dt.history(limit=dt.version() - folded):
        operation = commit.get("operation", "")
        if operation in _HARMLESS or commit.get(OPERATION) == TIER_MOVE:  # a tier move changes no row read
            continue
        if operation == "WRITE" and (commit.get("operationParameters") or {}).get("mode") == "Append":
            continue
        return f"{operation} at version {commit.get('version')}"
    return None


