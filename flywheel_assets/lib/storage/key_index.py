"""Lookups by key that read the history's keys as 8-byte hashes, each data file's decoded once.

A refresh looks up the stored rows of a few hundred thousand keys (the sessions and
trajectories that new data touched) in tables of millions. Decoding every data file's key
strings for each lookup cost about 75 ns per stored row, a dozen times per daily refresh: the
refresh's cost grew with the history. A Delta data file never changes once written (a rewrite,
compaction or forget, is a new file), so the distinct 64-bit hashes of its key values are
computed once and kept under FLYWHEEL_HOME/cache/key_index/ (one .npy per file, key column and
hash scheme); a lookup reads those and tests them against its keys' hashes, then reads only the
files a hash points at and matches their rows exactly. A collision costs a file read, never a
wrong row; a missing or unreadable index file is computed again from the data file. Files read
from object storage are indexed on the machine that reads them. `prune` (run by lake_maintenance)
deletes the index files of data files the tables no longer hold.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_ds

from flywheel_assets.lib.tables import Table

_SEED = 0x5EED
# polars' hash is stable within a version only: a new one starts a new index
SCHEME = f"v1-polars-{pl.__version__}"
KEY_BATCH_ROWS = 16_000_000  # key hashes tested at once by a lookup (128 MB; each batch builds the keys' set again)


def keyed(con: duckdb.DuckDBPyConnection, lake, table: Table, column: str, keys: str,
          columns: list[str] | None = None, version: int | None = None) -> pa.Table:
    """`columns` (all by default) of the rows of `table` (at `version`) whose `column` is in the
    view `keys` (one column named key); a list column matches when any of its values is.

    Every data file's key hashes first (from the index, a few million at a time), then the files
    a hash points at, whole, their rows matched exactly. A refresh's keys are mostly of recent
    rows, so the history costs 8 bytes a distinct key (a join over the table had read every
    column asked for of every row; decoding every file's key strings, 75 ns a row)."""
    dataset = lake.dataset(table, version)
    schema = table.schema if dataset is None else dataset.schema
    names = list(columns or schema.names)
    empty = pa.schema([schema.field(name) for name in names]).empty_table()
    fragments = [] if dataset is None else \
        [fragment for part in getattr(dataset, "children", [dataset]) for fragment in part.get_fragments()]
    wanted = con.execute(f"SELECT DISTINCT key FROM {keys} WHERE key IS NOT NULL").to_arrow_table().column(0)
    if not fragments or not len(wanted):
        return empty
    key_type = schema.field(column).type
    value_type = key_type.value_type if pa.types.is_list(key_type) or pa.types.is_large_list(key_type) else key_type
    values = pl.Series(wanted.cast(value_type))
    hashes = _Hashes(values.hash(_SEED).unique().to_numpy())
    folder = _folder(lake, table, column)
    parts: list[pa.Table] = []
    batch: list[tuple[pa_ds.Fragment, np.ndarray]] = []
    held = 0
    for index, fragment in enumerate(fragments):
        batch.append((fragment, _hashes(fragment, schema, column, folder)))
        held += len(batch[-1][1])
        if held >= KEY_BATCH_ROWS or index == len(fragments) - 1:
            ends = np.cumsum([len(found) for _, found in batch])
            hits = np.flatnonzero(hashes.among(np.concatenate([found for _, found in batch])))
            for position in np.unique(np.searchsorted(ends, hits, side="right")).tolist():
                read = batch[position][0].to_table(schema=schema, columns=list(dict.fromkeys([*names, column])))
                if (matched := read.filter(_matches(read.column(column), values))).num_rows:
                    parts.append(matched.select(names))
            batch, held = [], 0
    return pa.concat_tables(parts) if parts else empty


class _Hashes:
    """A set of 64-bit hashes tested against many: first a table of their top bits (16 slots a
    hash, at most 2^26: about one stored hash in 16 passes by chance), then what passes exactly."""

    def __init__(self, hashes: np.ndarray):
        self.bits = int(np.clip(np.ceil(np.log2(max(len(hashes), 1) * 16)), 16, 26))
        self.table = np.zeros(1 << self.bits, bool)
        self.table[hashes >> np.uint64(64 - self.bits)] = True
        # (from numpy: polars tests against its own hash column's unique() about three times slower)
        self.exact = pl.Series(hashes).implode()

    def among(self, stored: np.ndarray) -> np.ndarray:
        hits = self.table[stored >> np.uint64(64 - self.bits)]
        hits[hits] = pl.Series(stored[hits]).is_in(self.exact).to_numpy()
        return hits


def _matches(read: pa.ChunkedArray, values: pl.Series) -> pa.Array:
    """Which rows hold one of `values` (a list: any of its items)."""
    if not (pa.types.is_list(read.type) or pa.types.is_large_list(read.type)):
        return pl.Series(read).is_in(values.implode()).fill_null(False).to_arrow()
    lists = read.combine_chunks()
    found = pl.Series(pc.list_flatten(lists)).is_in(values.implode()).to_numpy()
    mask = np.zeros(len(lists), bool)
    mask[pc.list_parent_indices(lists).to_numpy()[found]] = True
    return pa.array(mask)


def _hashes(fragment: pa_ds.Fragment, schema: pa.Schema, column: str, folder: Path | None) -> np.ndarray:
    """The distinct hashes of a data file's key values (nulls left out), from the index when it
    holds them. Rows held in memory (a tier's filtered rows) are hashed each time."""
    path = getattr(fragment, "path", None)
    stored = None if folder is None or path is None else folder / f"{_file_id(fragment, path)}.npy"
    if stored is not None:
        try:
            return np.load(stored)
        except (OSError, ValueError):
            pass  # not indexed yet, or unreadable: computed again
    read = fragment.to_table(schema=schema, columns=[column]).column(0)
    if pa.types.is_list(read.type) or pa.types.is_large_list(read.type):
        read = pc.list_flatten(read)
    found = pl.Series(read).drop_nulls().hash(_SEED).unique().sort().to_numpy()
    if stored is not None:
        _save(stored, found)
    return found


def _save(stored: Path, found: np.ndarray) -> None:
    staging = stored.with_name(f".{stored.name}.{os.getpid()}.tmp")
    try:
        stored.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, "wb") as out:
            np.save(out, found)
        os.replace(staging, stored)
    except OSError:  # a full or read-only disk: the lookup goes on without indexing this file
        staging.unlink(missing_ok=True)


def _file_id(fragment: pa_ds.Fragment, path: str) -> str:
    """A data file's name in the index: its location (a Delta file name is never reused)."""
    base = getattr(fragment.filesystem, "base_path", "")
    return hashlib.sha256(f"{base}|{path}".encode()).hexdigest()[:32]


def _folder(lake, table: Table, column: str) -> Path | None:
    home = getattr(lake.config, "home", None)
    return None if home is None else Path(home) / "cache" / "key_index" / SCHEME / table.layer / table.name / column


def prune(lake, tables: list[Table]) -> int:
    """Delete the index files of data files that `tables` no longer hold at their current
    version (older versions' files are indexed again if read), and every older scheme's index;
    the number of files deleted."""
    root = Path(lake.config.home) / "cache" / "key_index"
    deleted = 0
    for other in (root.iterdir() if root.is_dir() else []):
        if other.name != SCHEME:
            shutil.rmtree(other, ignore_errors=True)
    for table in tables:
        folder = root / SCHEME / table.layer / table.name
        if not folder.is_dir():
            continue
        dataset = lake.dataset(table)
        fragments = [] if dataset is None else \
            [fragment for part in getattr(dataset, "children", [dataset]) for fragment in part.get_fragments()]
        live = {f"{_file_id(fragment, fragment.path)}.npy" for fragment in fragments if getattr(fragment, "path", None)}
        for stored in folder.glob("*/*.npy"):
            if stored.name not in live:
                stored.unlink(missing_ok=True)
                deleted += 1
    return deleted
