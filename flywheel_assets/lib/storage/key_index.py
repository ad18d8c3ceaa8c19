"""Lookups by key that read the history's keys as 8-byte hashes, each data file's decoded once.

A refresh looks up the stored rows of a few hundred thousand keys (the sessions and
trajectories that new data touched) in tables of millions. Decoding every data file's key
strings for each lookup cost about 75 ns per stored row, a dozen times per daily refresh: the
refresh's cost grew with the history. A Delta data file never changes once written (a rewrite,
compaction or forget, is a new file), so the distinct 64-bit hashes of its key values are
computed once and kept under FLYWHEEL_HOME/cache/key_index/ (one .npy per file and key column);
a lookup reads those and tests them against its keys' hashes, then reads only the files a hash
points at and matches their rows exactly. A collision costs a file read, never a wrong row. An
index file is written whole (staged, fsynced, renamed) with a checksum; one that is missing or
fails its checks is computed again from its data file.

Lake maintenance merges each column's index files into one sorted run (`merge`, nightly;
merged_run.py): a lookup then binary-searches the blocks of that run its keys fall in instead of
testing every stored hash, and tests only the files written since on their own.

The folder names the hash scheme (polars' hash is stable within one version and platform only)
and the number of forgets and retention runs recorded in audit/forget_requests: after a forget
anywhere, every machine's next lookup starts a new index and deletes the old one, so no hash of
a forgotten row outlives it on a machine that had indexed it. `prune` (lake_maintenance, forget)
deletes the index files of data files the tables no longer hold.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pa_ds
from deltalake.exceptions import DeltaError

from flywheel_assets.lib.arrays import items_among
from flywheel_assets.lib.lake import ColdTierMissing
from flywheel_assets.lib.storage import merged_run
from flywheel_assets.lib.storage.merged_run import staged
from flywheel_assets.lib.tables import FORGET_REQUESTS, Table

_SEED = 0x5EED
_PROBE = pl.Series(["flywheel", "key index", ""]).hash(_SEED).to_numpy().tobytes()
# a hash scheme per polars version, platform and hash output (a shared cache/ serves every machine
# whose hashes agree)
SCHEME = f"v2-polars-{pl.__version__}-{platform.machine()}-{hashlib.sha256(_PROBE).hexdigest()[:8]}"
KEY_BATCH_ROWS = 8_000_000  # key hashes tested at once by a lookup (64 MB, a few times that in flight)
_STAGING_HOURS = 1  # prune: staging files older than this were left by a crash
# A lookup of at most this many distinct keys searches each file's sorted hashes (about
# FEW_KEYS * 20 comparisons a file) instead of testing every stored hash against its keys
FEW_KEYS = 4_096
_CHECKED: dict[Path, tuple[int, int, int]] = {}  # index files this process found intact, as they were then


def keyed(con: duckdb.DuckDBPyConnection, lake, table: Table, column: str, keys: str,
          columns: list[str] | None = None, version: int | None = None) -> pa.Table:
    """`columns` (all by default) of the rows of `table` (at `version`) whose `column` is in the
    view `keys` (one column named key); a list column matches when any of its values is.

    The files holding one of the keys' hashes first: those the column's merged run covers by a
    binary search of it (the blocks the keys fall in), the others (written since the last merge)
    by testing their own index files' hashes (KEY_BATCH_ROWS at a time; a lookup of at most
    FEW_KEYS keys binary-searches each file's sorted hashes instead). Then those files, whole,
    their rows matched exactly. (A join over the table had read every column asked for of every
    row; decoding every file's key strings cost 75 ns a row; testing every stored hash, ~7 ns.)"""
    dataset = lake.dataset(table, version)
    schema = table.schema if dataset is None else dataset.schema
    names = list(columns or schema.names)
    empty = pa.schema([schema.field(name) for name in names]).empty_table()
    fragments = _fragments(dataset)
    wanted = con.execute(f"SELECT DISTINCT key FROM {keys} WHERE key IS NOT NULL").to_arrow_table().column(0)
    if not fragments or not len(wanted):
        return empty
    key_type = schema.field(column).type
    value_type = key_type.value_type if pa.types.is_list(key_type) or pa.types.is_large_list(key_type) else key_type
    values = pl.Series(wanted.cast(value_type))
    query = values.hash(_SEED).unique().to_numpy()
    folder = _folder(lake, table, column)
    parts: list[pa.Table] = []
    for fragment in _holding(fragments, schema, column, folder, np.sort(query)):
        _read_matching(fragment, schema, names, column, values, parts)
    return pa.concat_tables(parts) if parts else empty


def _holding(fragments: list, schema: pa.Schema, column: str, folder: Path | None, query: np.ndarray) -> list:
    """The fragments whose key hashes hold one of the sorted hashes `query` (in order): those the
    folder's merged run covers found by it, the others by their own index files."""
    owners: dict[int, int] = {}
    hit: set[int] = set()
    if folder is not None:
        try:
            with open(folder / merged_run.NAME, "rb") as run:
                if (merged := merged_run.MergedRun.read(run)) is not None:
                    owners = merged.owners_of([_file_id(fragment, fragment.path) if getattr(fragment, "path", None)
                                               else None for fragment in fragments])
                    if owners and (hit := merged.holding(run, query)) is None:  # failed its checks: files on their own
                        owners = {}
        except OSError:  # no merged run yet
            owners = {}
    found = {position for position, owner in owners.items() if owner in hit} if owners else set()
    loose = [(position, fragment) for position, fragment in enumerate(fragments) if position not in owners]
    if len(query) <= FEW_KEYS:  # each file's sorted hashes searched
        found.update(position for position, fragment in loose
                     if _holds_any(_hashes(fragment, schema, column, folder), query))
    else:
        hashes = _Hashes(query)
        batch: list[tuple[int, np.ndarray]] = []
        held = 0
        for index, (position, fragment) in enumerate(loose):
            batch.append((position, _hashes(fragment, schema, column, folder)))
            held += len(batch[-1][1])
            if held >= KEY_BATCH_ROWS or index == len(loose) - 1:
                ends = np.cumsum([len(stored) for _, stored in batch])
                hits = np.flatnonzero(hashes.among(np.concatenate([stored for _, stored in batch])))
                found.update(batch[at][0] for at in np.unique(np.searchsorted(ends, hits, side="right")).tolist())
                batch, held = [], 0
    return [fragments[position] for position in sorted(found)]


def _read_matching(fragment: pa_ds.Fragment, schema: pa.Schema, names: list[str], column: str, values: pl.Series,
                   parts: list[pa.Table]) -> None:
    read = fragment.to_table(schema=schema, columns=list(dict.fromkeys([*names, column])))
    if (matched := read.filter(_matches(read.column(column), values))).num_rows:
        parts.append(matched.select(names))


def _holds_any(found: np.ndarray, query: np.ndarray) -> bool:
    """Whether sorted hashes `found` hold one of the sorted hashes `query`."""
    if not len(found):
        return False
    position = np.searchsorted(found, query)
    return bool((found[np.minimum(position, len(found) - 1)] == query).any())


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
    mask = np.zeros(len(read), bool)
    mask[items_among(read, values)[0]] = True
    return pa.array(mask)


def _hashes(fragment: pa_ds.Fragment, schema: pa.Schema, column: str, folder: Path | None) -> np.ndarray:
    """The distinct hashes of a data file's key values (nulls left out), sorted, from the index
    when it holds them intact. Rows held in memory (a tier's filtered rows) are hashed each time."""
    path = getattr(fragment, "path", None)
    stored = None if folder is None or path is None else folder / f"{_file_id(fragment, path)}.npy"
    if stored is not None and (found := _load(stored)) is not None:
        return found
    read = fragment.to_table(schema=schema, columns=[column]).column(0)
    if pa.types.is_list(read.type) or pa.types.is_large_list(read.type):
        read = pa.chunked_array([chunk.flatten() for chunk in read.chunks], read.type.value_type)
    found = pl.Series(read).drop_nulls().hash(_SEED).unique().sort().to_numpy()
    if stored is not None:
        _save(stored, found)
    return found


def merge(lake, tables: list[Table]) -> int:
    """Merge each indexed column's files into its folder's merged run, covering every file the
    table's current version holds (their index files computed where missing); the entries
    written. lake_maintenance's last step: the files written after it stay loose until the next
    run, and the entries of files a table no longer holds (rewritten, compacted) are passed over
    by lookups. A table or column that cannot be read is skipped (its old run, if any, kept: it
    is checked as it is read). Memory: the column's hashes (8 bytes each) and a range of them at a
    time merged."""
    written, current = 0, _current(lake)
    for table in tables:
        folder = current / table.layer / table.name
        columns = sorted(path.name for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
        for column in columns:
            try:
                dataset = lake.dataset(table)
                if dataset is None or column not in dataset.schema.names:
                    (folder / column / merged_run.NAME).unlink(missing_ok=True)
                    continue
                fragments = [fragment for fragment in _fragments(dataset) if getattr(fragment, "path", None)]
                found = [_hashes(fragment, dataset.schema, column, folder / column) for fragment in fragments]
                written += merged_run.write(folder / column / merged_run.NAME,
                                            [_file_id(fragment, fragment.path) for fragment in fragments], found)
            except (OSError, pa.ArrowException, DeltaError, ColdTierMissing):  # the next run tries again
                continue
    return written


def _checksum(found: np.ndarray) -> np.uint64:
    with np.errstate(over="ignore"):
        return np.uint64(found.sum(dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                         + np.uint64(len(found) + 1) * np.uint64(0xBF58476D1CE4E5B9))


def _load(stored: Path) -> np.ndarray | None:
    """An index file's hashes, or None when it is absent or fails its checks (type, order,
    checksum: a file cut short or zeroed by a crash). A file this process checked already, and
    that is the same file still (inode, size, modification time), is read unchecked. (Read whole,
    never memory-mapped: a map holds a file handle each, and on a shared network volume a file
    another host deletes would fault the pages read later, outside any error handling.)"""
    try:
        status = os.stat(stored)
        seen = (status.st_ino, status.st_size, status.st_mtime_ns)
        held = np.load(stored)
        if _CHECKED.get(stored) == seen:
            return held[:-1]
    except Exception:  # absent, cut short, not an array
        return None
    if held.dtype != np.uint64 or held.ndim != 1 or not len(held):
        return None
    found = held[:-1]
    if held[-1] != _checksum(found) or (len(found) > 1 and not bool(np.all(found[1:] > found[:-1]))):
        return None
    _CHECKED[stored] = seen
    return found


def _save(stored: Path, found: np.ndarray) -> None:
    with contextlib.suppress(OSError):  # a full or read-only disk: the lookup goes on without indexing this file
        with staged(stored) as out:
            np.save(out, np.append(found, _checksum(found)))


def _file_id(fragment: pa_ds.Fragment, path: str) -> str:
    """A data file's name in the index: its location (a Delta file name is never reused)."""
    base = getattr(fragment.filesystem, "base_path", "")
    return hashlib.sha256(f"{base}|{path}".encode()).hexdigest()[:32]


def _folder(lake, table: Table, column: str) -> Path | None:
    """This table column's index folder, in the current scheme and forget generation; older
    ones are deleted first."""
    if getattr(lake.config, "home", None) is None:
        return None
    return _current(lake) / table.layer / table.name / column


def _current(lake) -> Path:
    """The index folder of this scheme and forget generation; every other one is deleted."""
    current = Path(lake.config.home) / "cache" / "key_index" / SCHEME / f"forgets-{lake.row_count(FORGET_REQUESTS)}"
    _delete_other(current.parent, current.name)
    _delete_other(current.parent.parent, current.parent.name)
    return current


def _fragments(dataset) -> list:
    """A dataset's parts' fragments (a tiered table's: the hot files, then the cold ones)."""
    return [] if dataset is None else \
        [fragment for part in getattr(dataset, "children", [dataset]) for fragment in part.get_fragments()]


def _delete_other(folder: Path, keep: str) -> None:
    for other in (folder.iterdir() if folder.is_dir() else []):
        if other.name != keep:
            shutil.rmtree(other, ignore_errors=True)


def live_names(lake, table: Table) -> set[str]:
    """The index file names of the data files the table's current version reads."""
    return {f"{_file_id(fragment, fragment.path)}.npy" for fragment in _fragments(lake.dataset(table))
            if getattr(fragment, "path", None)}


def prune(lake, tables: list[Table]) -> int:
    """Delete the index files of data files that `tables` no longer hold at their current
    version (an older version's files are indexed again if read), staging files a crash left,
    and every other scheme's and forget generation's index; the number of index files deleted.
    A table that cannot be read now is skipped (maintenance reports it elsewhere)."""
    current = _current(lake)
    deleted = 0
    for table in tables:
        folder = current / table.layer / table.name
        if not folder.is_dir():
            continue
        try:
            live = live_names(lake, table)
            for stored in folder.glob("*/*.npy"):
                if stored.name not in live:
                    stored.unlink(missing_ok=True)
                    deleted += 1
            for staging in folder.glob("*/.*.tmp"):
                if staging.stat().st_mtime < time.time() - _STAGING_HOURS * 3600:
                    staging.unlink(missing_ok=True)
        except Exception:  # noqa: BLE001  (a missing cold tier, a read-only home: the next run tries again)
            continue
    return deleted
