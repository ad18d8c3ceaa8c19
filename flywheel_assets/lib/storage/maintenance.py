"""Keep the lake's footprint to what is read: compact small files, vacuum the files no kept version reads.

Every ingest rewrites some tables (the score tables' day partitions, curated_trajectories in
full), and Delta keeps every earlier version's files until a vacuum. `maintain` runs per table:

- compaction (OPTIMIZE): small files rewritten into few, per partition; no row changes;
- vacuum: the files that neither the current version nor a pinned one reads, once they have been
  out of the log for `maintenance.vacuum_retention_hours` (a run reading a snapshot older than
  that could fail: the retention is the longest a read may take). Pinned: the Delta versions every
  dataset manifest recorded for its inputs, so each cycle's data can still be read as it was
  (the comparison arms of lib/evaluation/arms.py time-travel to them). The Delta log itself is
  kept (small; it is what lets those versions be read).

It holds the ingest lock and the refresh locks, so no ingest or score refresh commits between its
read of a table and its own commits; a curation run that does is detected by Delta (the
compaction then fails for that table and is tried again at the next run).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltalake.exceptions import DeltaError

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.ingest.lock import every_lock
from flywheel_assets.lib.lake import SMALL_FILE_BYTES, Lake
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


def pinned_versions(lake: Lake) -> dict[str, set[int]]:
    """Per table, the versions dataset manifests recorded (what a cycle was built from)."""
    pinned: dict[str, set[int]] = {}
    for row in lake.read(DATASET_MANIFESTS, columns=["input_versions_json"]).to_pylist():
        for name, version in json.loads(row["input_versions_json"] or "{}").items():
            if version is not None:
                pinned.setdefault(name, set()).add(int(version))
    return pinned


def maintain(config: FlywheelConfig, lake: Lake, retention_hours: float | None = None,
             log: Callable[[str], None] = lambda message: None) -> list[TableUpkeep]:
    hours = config.maintenance.vacuum_retention_hours if retention_hours is None else retention_hours
    done = []
    with every_lock(config.landing, config.ingest.lock_timeout_s, owner="lake maintenance", log=log):
        pinned = pinned_versions(lake)
        for table in ALL_TABLES:
            if (upkeep := _maintain_table(lake, table, sorted(pinned.get(table.name, ())), hours)) is not None:
                log(f"{table.layer}/{table.name}: {upkeep.files_before} files {upkeep.bytes_before / 1e6:.1f} MB -> "
                    f"{upkeep.files_after} files {upkeep.bytes_after / 1e6:.1f} MB"
                    + (f" ({upkeep.error})" if upkeep.error else ""))
                done.append(upkeep)
    return done


def _maintain_table(lake: Lake, table: Table, pinned: list[int], hours: float) -> TableUpkeep | None:
    dt = lake.delta(table)
    if dt is None:
        return None
    files, size = footprint(lake, table)
    upkeep = TableUpkeep(f"{table.layer}/{table.name}", files, size, files, size, 0, 0, pinned)
    try:
        metrics = dt.optimize.compact(target_size=SMALL_FILE_BYTES)
        upkeep.compacted = int(metrics.get("numFilesRemoved", 0))
        dt = lake.delta(table)
        # keep_versions: those versions stay readable whatever their age
        upkeep.vacuumed = len(dt.vacuum(retention_hours=int(hours), enforce_retention_duration=False, dry_run=False,
                                        keep_versions=[v for v in pinned if v <= dt.version()] or None))
    except DeltaError as error:  # a concurrent commit (a curation run): tried again at the next run
        upkeep.error = f"skipped: {error}"
    upkeep.files_after, upkeep.bytes_after = footprint(lake, table)
    return upkeep


def footprint(lake: Lake, table: Table) -> tuple[int, int]:
    """(data files, bytes) the table holds in storage, read or not: on a local lake the folder's
    Parquet files; on object storage the files the current version reads (a listing would cost)."""
    if "://" not in lake.root:
        paths = [p for p in Path(lake.uri(table)).rglob("*.parquet") if "_delta_log" not in p.parts]
        return len(paths), sum(p.stat().st_size for p in paths)
    dt = lake.delta(table)
    sizes = dt.get_add_actions(flatten=True).column("size_bytes").to_pylist()
    return len(sizes), sum(sizes)
