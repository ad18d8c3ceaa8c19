"""Keep the lake's footprint to what is read and kept: retention, tiers, compaction, vacuum.

Every ingest rewrites some tables' day partitions (the score tables', curated_trajectories'),
and Delta keeps every earlier version's files until a vacuum. `maintain` runs, in order:

- retention (only when a retention is configured): every tenant's sessions past its
  retention erased everywhere (lib/privacy/retention.py);
- tiers: the tiered tables' rows ingested more than `maintenance.cold_after_days` ago moved to
  the cold tier, and their hot rows Z-ordered on session_id (lib/storage/tiers.py);

then per table:

- compaction (OPTIMIZE): small files rewritten into few, per partition; no row changes;
- vacuum: the files that neither the current version nor a pinned one reads, once they have been
  out of the log for `maintenance.vacuum_retention_hours` (a run reading a snapshot older than
  that could fail: the retention is the longest a read may take). Pinned: the Delta versions every
  dataset manifest recorded for its inputs, so each cycle's data can still be read as it was
  (the comparison arms of lib/evaluation/arms.py time-travel to them). The Delta log itself is
  kept (small; it is what lets those versions be read);
- a checkpoint, so an open replays only the commits after it (the Lake's own writes checkpoint
  each lake.CHECKPOINT_EVERY versions too).

and last, the key index's files of data files no table holds any more are deleted and each
indexed column's files merged into one sorted run (lookups binary-search it; only the files
written since stay on their own).

It holds the ingest lock and the refresh locks, so no ingest or score refresh commits between its
read of a table and its own commits; a curation run that does is detected by Delta (the
compaction then fails for that table and is tried again at the next run). With a retention set it
also holds the writers' lock, as a forget does (no curation or training reads what it deletes).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from deltalake.exceptions import DeltaError

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.ingest.lock import every_lock, no_writers
from flywheel_assets.lib.lake import SMALL_FILE_BYTES, ColdTierMissing, Lake, utcnow
from flywheel_assets.lib.storage import key_index
from flywheel_assets.lib.storage.tiers import COLD_WRITER, TierMove, move_to_cold, zorder
from flywheel_assets.lib.tables import ALL_TABLES, DATASET_MANIFESTS, Table

@dataclass
class TableUpkeep:
    table: str
    files_before: int
    bytes_before: int
    files_after: int
    bytes_after: int
    compacted: int  # files rewritten by the compaction
    vacuumed: int  # files deleted
    pinned: list[int]  # versions kept readable
    error: str | None = None
    moved: TierMove | None = None  # a tiered table: rows moved to the cold tier
    zordered: bool = False
    cold_files: int = 0  # a tiered table's cold tier after the run
    cold_bytes: int = 0


@dataclass
class Upkeep:
    tables: list[TableUpkeep] = field(default_factory=list)
    expired: dict = field(default_factory=dict)  # tenant -> ForgetReport of its expired sessions
    retention_error: str | None = None  # retention failed (the rest ran)
    index_files_deleted: int = 0  # the key index's files of data files no table holds now (lib/storage/key_index.py)
    index_entries_merged: int = 0  # key hashes this run wrote to the index's merged runs (key_index.merge)

    @property
    def moved(self) -> int:
        return sum(t.moved.rows for t in self.tables if t.moved is not None)


def pinned_versions(lake: Lake) -> dict[str, set[int]]:
    """Per table, the versions dataset manifests recorded (what a cycle was built from)."""
    pinned: dict[str, set[int]] = {}
    for row in lake.read(DATASET_MANIFESTS, columns=["input_versions_json"]).to_pylist():
        for name, version in json.loads(row["input_versions_json"] or "{}").items():
            if version is not None:
                pinned.setdefault(name, set()).add(int(version))
    return pinned


def maintain(config: FlywheelConfig, lake: Lake, retention_hours: float | None = None,
             log: Callable[[str], None] = lambda message: None, now: datetime | None = None,
             cold_before: datetime | None = None) -> Upkeep:
    """`now`: the clock retention ages sessions against (the flywheel's: their events' `ts` are
    in it; default the wall clock). The tiers age rows by `ingested_at`, which the ingest writes
    from the wall clock: rows move once ingested before `cold_before` (default the wall clock
    minus maintenance.cold_after_days)."""
    settings = config.maintenance
    hours = settings.vacuum_retention_hours if retention_hours is None else retention_hours
    now = now or utcnow()
    if cold_before is None and settings.cold_after_days is not None:
        cold_before = utcnow() - timedelta(days=settings.cold_after_days)
    done = Upkeep()
    if settings.expires or any((config.home / "privacy").glob("pending-expire-*.json")):  # or a failed run's left
        done.expired, done.retention_error = _expire(config, lake, now, log)
    with every_lock(config.landing, config.ingest.lock_timeout_s, owner="lake maintenance", log=log):
        pinned = pinned_versions(lake)
        for table in ALL_TABLES:
            if (upkeep := _maintain_table(lake, table, sorted(pinned.get(table.name, ())), hours,
                                          cold_before, settings.zorder)) is not None:
                log(f"{table.layer}/{table.name}: {upkeep.files_before} files {upkeep.bytes_before / 1e6:.1f} MB -> "
                    f"{upkeep.files_after} files {upkeep.bytes_after / 1e6:.1f} MB"
                    + (f"; {upkeep.moved.rows} rows moved to the cold tier ({upkeep.cold_files} files "
                       f"{upkeep.cold_bytes / 1e6:.1f} MB)" if upkeep.moved and upkeep.moved.rows else "")
                    + (f" ({upkeep.error})" if upkeep.error else ""))
                done.tables.append(upkeep)
        done.index_files_deleted = key_index.prune(lake, ALL_TABLES)
        done.index_entries_merged = key_index.merge(lake, ALL_TABLES)
    return done


def _expire(config: FlywheelConfig, lake: Lake, now: datetime, log: Callable[[str], None]) -> tuple[dict, str | None]:
    """Retention, under the locks a forget takes (it deletes what curation and training read: it
    waits for them). A failure is reported, and the rest of the upkeep runs all the same."""
    from flywheel_assets.lib.privacy.retention import expire

    try:
        with no_writers(config.landing, config.privacy.lock_timeout_s, owner="lake maintenance", log=log), \
                every_lock(config.landing, config.ingest.lock_timeout_s, owner="lake maintenance", log=log):
            done, errors = expire(config, lake, now, log=log)
    except Exception as error:  # noqa: BLE001  (a lock timeout: retried at the next run)
        done, errors = {}, {"*": f"{type(error).__name__}: {error}"}
    for tenant, error in errors.items():
        log(f"retention failed for tenant {tenant}, tried again at the next run: {error}")
    return done, "; ".join(f"{tenant}: {error}" for tenant, error in errors.items()) or None


def _maintain_table(lake: Lake, table: Table, pinned: list[int], hours: float, cold_before: datetime | None,
                    zorder_hot: bool) -> TableUpkeep | None:
    dt = lake.delta(table)
    if dt is None:
        return None
    files, size = footprint(lake, table)
    upkeep = TableUpkeep(f"{table.layer}/{table.name}", files, size, files, size, 0, 0, pinned)
    if table.tiered and cold_before is not None:
        try:
            upkeep.moved = move_to_cold(lake, table, cold_before)
        except Exception as error:  # noqa: BLE001  (reported in the run's table; compaction and vacuum go on)
            upkeep.error = f"no tier move: {type(error).__name__}: {error}"
    try:
        dt = lake.delta(table)
        metrics = dt.optimize.compact(target_size=SMALL_FILE_BYTES)
        upkeep.compacted = int(metrics.get("numFilesRemoved", 0))
        upkeep.zordered = table.tiered and zorder_hot and zorder(lake, table)
        dt = lake.delta(table)
        # keep_versions: those versions stay readable whatever their age
        upkeep.vacuumed = len(dt.vacuum(retention_hours=int(hours), enforce_retention_duration=False, dry_run=False,
                                        keep_versions=_readable(lake, table, pinned) or None))
        with contextlib.suppress(DeltaError, OSError):  # an open replays only what is committed after it
            lake.delta(table).create_checkpoint()
    except DeltaError as error:  # a concurrent commit (a curation run): tried again at the next run
        upkeep.error = "; ".join(filter(None, (upkeep.error, f"skipped: {error}")))
    if table.tiered and upkeep.error is None:
        upkeep.error = _compact_cold(lake, table, hours)
    upkeep.files_after, upkeep.bytes_after = footprint(lake, table)
    if table.tiered:
        with contextlib.suppress(ColdTierMissing):
            upkeep.cold_files, upkeep.cold_bytes = footprint(lake, table, cold=True)
    return upkeep


def _compact_cold(lake: Lake, table: Table, hours: float) -> str | None:
    """The cold tier's day files compacted (zstd again) and the replaced ones vacuumed: a read of
    an older hot version filters the cold rows themselves (lib/lake.py), never an older cold
    version, so nothing is pinned there."""
    try:
        if (cold := lake.cold(table)) is None:
            return None
        cold.optimize.compact(target_size=SMALL_FILE_BYTES, writer_properties=COLD_WRITER)
        cold = lake.cold(table)
        cold.vacuum(retention_hours=int(hours), enforce_retention_duration=False, dry_run=False)
    except Exception as error:  # noqa: BLE001  (reported; tried again at the next run)
        return f"cold tier not compacted: {type(error).__name__}: {error}"
    return None


def _readable(lake: Lake, table: Table, versions: list[int]) -> list[int]:
    """The pinned versions still in the log: a forget or a retention purges a table's history,
    and a vacuum asked to keep a version no longer there fails."""
    kept = []
    for version in versions:
        try:
            if lake.delta(table, version) is not None:
                kept.append(version)
        except DeltaError:
            continue
    return kept


def footprint(lake: Lake, table: Table, cold: bool = False) -> tuple[int, int]:
    """(data files, bytes) the table (`cold`: its cold tier) holds in storage, read or not: on a
    local lake the folder's Parquet files; on object storage the files the current version reads
    (a listing would cost)."""
    uri = lake.cold_uri(table) if cold else lake.uri(table)
    if "://" not in uri:
        paths = [p for p in Path(uri).rglob("*.parquet") if "_delta_log" not in p.parts]
        return len(paths), sum(p.stat().st_size for p in paths)
    dt = lake.cold(table) if cold else lake.delta(table)
    if dt is None:
        return 0, 0
    sizes = dt.get_add_actions(flatten=True).column("size_bytes").to_pylist()
    return len(sizes), sum(sizes)
