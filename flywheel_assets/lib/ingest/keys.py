"""Keys already in the lake, so that no row is added twice (see _KeyIndex)."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.arrays import distinct
from flywheel_assets.lib.ingest.events import with_event_hash
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import ANNOTATIONS, QUARANTINE, SESSION_EVENTS, TRAJECTORIES, Table


class KeyIndex:
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
            candidates = distinct(hashes[known])
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
