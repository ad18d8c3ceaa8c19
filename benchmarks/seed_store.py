"""The seed's per-session path, for the data benchmark: its score fold and its store.

The seed keeps session events in a database and scores a session with one query
(`SELECT event_type, event_data FROM session_events WHERE session_id = ?`) and a
Python fold. The benchmark prices that against the vectorised scoring twice: over the
lake (a query per session scans the Delta table: session ids carry no order, so no
file can be skipped) and over the store the seed would have had, SQLite with an index
on session_id. Both run SESSION_QUERY, the same SQL text.

The SQLite table keeps the lake's typed columns (edit_ratio, trajectory_id) rather
than the seed's JSON `event_data`, so both stores return the same rows and the same
fold scores them; that spares SQLite a json.loads per row, a small favour to it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

SESSION_QUERY = ("SELECT event_type, edit_ratio, trajectory_id FROM session_events "
                 "WHERE session_id = ? ORDER BY ts")


def seed_quality_score(rows: list[tuple[str, float | None, str | None]]) -> float:
    """The seed's ImplicitFeedback.quality_score over a session's (event_type, edit_ratio,
    trajectory_id) rows, folded in the order given (the last edit wins, as in the seed)."""
    accepted = continued = error = False
    retries = 0
    edit_ratio = 0.0
    for event_type, ratio, _trajectory in rows:
        if event_type == "output_accepted":
            accepted = True
        elif event_type == "retry_requested":
            retries += 1
        elif event_type == "output_edited":
            edit_ratio = ratio or 0.0
        elif event_type == "session_continued":
            continued = True
        elif event_type == "error_reported":
            error = True
    score = 0.5
    score += 0.3 if accepted else -0.3
    if retries == 0:
        score += 0.1
    elif retries >= 3:
        score -= 0.2
    score -= edit_ratio * 0.3
    if continued:
        score += 0.1
    if error:
        score -= 0.4
    return max(-1.0, min(1.0, score))


@dataclass
class IndexedStore:
    """A SQLite copy of session_events and what it cost to build."""

    path: Path
    connection: sqlite3.Connection
    rows: int
    load_s: float    # reading the lake's rows and inserting them, index not yet built
    insert_s: float  # the part of load_s spent in SQLite's executemany
    index_s: float
    table_bytes: int
    index_bytes: int

    def session_rows(self, session_id: str) -> list[tuple]:
        return self.connection.execute(SESSION_QUERY, [session_id]).fetchall()

    def query_plan(self) -> str:
        """SQLite's plan for SESSION_QUERY: it names the index when the lookup uses it."""
        plan = self.connection.execute("EXPLAIN QUERY PLAN " + SESSION_QUERY, ["?"]).fetchall()
        return "; ".join(str(row[-1]) for row in plan)


def build_indexed_store(con: duckdb.DuckDBPyConnection, path: Path, batch_rows: int = 500_000) -> IndexedStore:
    """Copy the `session_events` view of `con` into a new SQLite file at `path`, then index session_id.

    Bulk load into a table without an index, then one CREATE INDEX: SQLite's fastest
    way, and kinder to it than the seed's one INSERT per event. Journal and fsync are off
    (a benchmark copy, rebuilt if lost), which also favours SQLite's load time."""
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = OFF")
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute("CREATE TABLE session_events (session_id TEXT, trajectory_id TEXT, event_type TEXT, "
                       "edit_ratio REAL, ts INTEGER)")
    rows = 0
    insert_s = 0.0
    started = time.perf_counter()
    reader = con.execute("SELECT session_id, trajectory_id, event_type, edit_ratio, epoch_us(ts) "
                         "FROM session_events").fetch_record_batch(batch_rows)
    for batch in reader:
        values = zip(*(column.to_pylist() for column in batch.columns))
        insert_started = time.perf_counter()
        connection.executemany("INSERT INTO session_events VALUES (?, ?, ?, ?, ?)", values)
        insert_s += time.perf_counter() - insert_started
        rows += batch.num_rows
    connection.commit()
    load_s = time.perf_counter() - started
    table_bytes = os.path.getsize(path)

    started = time.perf_counter()
    connection.execute("CREATE INDEX session_events_session_id ON session_events (session_id)")
    connection.commit()
    index_s = time.perf_counter() - started
    index_bytes = os.path.getsize(path) - table_bytes
    return IndexedStore(path, connection, rows, load_s, insert_s, index_s, table_bytes, index_bytes)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under a folder (a Delta table's data files and log)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
