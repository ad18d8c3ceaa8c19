"""lake_maintenance: retention, tiers, compaction and vacuum of every table, daily after the refresh
(lib/storage/maintenance.py)."""

from pathlib import Path
from typing import Optional

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from flywheel_assets.defs.resources import FlywheelResource


class MaintenanceRunConfig(dg.Config):
    retention_hours: Optional[float] = None  # maintenance.vacuum_retention_hours when empty


@dg.op(description="Erases the sessions past each tenant's retention, moves old rows of the tiered tables to the "
                   "cold tier, compacts every table's small files (Z-orders the hot ones on session_id) and vacuums "
                   "the files that neither the current version nor a dataset manifest's pinned version reads.")
def maintain_lake(context: dg.OpExecutionContext, config: MaintenanceRunConfig, flywheel: FlywheelResource,
                  catalog: DuckDBResource) -> None:
    from flywheel_assets.lib.catalog import refresh_catalog
    from flywheel_assets.lib.storage.maintenance import maintain

    lake = flywheel.lake()
    done = maintain(flywheel.config(), lake, config.retention_hours, log=context.log.info, now=flywheel.now())
    before, after = sum(u.bytes_before for u in done.tables), sum(u.bytes_after for u in done.tables)
    lines = ["| table | files | MB | compacted | vacuumed | pinned versions | moved to cold | cold tier |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {u.table} | {u.files_before} → {u.files_after} | {u.bytes_before / 1e6:.2f} → {u.bytes_after / 1e6:.2f} "
              f"| {u.compacted} | {u.vacuumed} | {', '.join(map(str, u.pinned)) or '-'}{' ' + u.error if u.error else ''} "
              f"| {u.moved.rows if u.moved else '-'} | {f'{u.cold_files} files, {u.cold_bytes / 1e6:.2f} MB' if u.cold_files else '-'} |"
              for u in done.tables]
    expired = "".join(f"\nretention: tenant {tenant}: {report.total_rows} rows deleted"
                      for tenant, report in done.expired.items())
    context.log.info(f"lake: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB{expired}\n" + "\n".join(lines)
                     + f"\nkey index: {done.index_files_deleted} files deleted (their data files are gone), "
                       f"{done.index_entries_merged:,} key hashes merged into its runs")
    if done.moved and Path(catalog.database).exists():  # a view made before the table had a cold tier reads hot rows only
        try:
            with catalog.get_connection() as con:
                refresh_catalog(con, lake)
        except duckdb.IOException as busy:
            context.log.warning(f"{catalog.database} is open elsewhere: its views of the tiered tables miss the "
                                f"cold rows until duckdb_catalog runs again: {busy}")
    if done.retention_error:  # the rest of the upkeep ran; the run says retention did not
        raise dg.Failure(f"retention failed: {done.retention_error}")


@dg.job(description="Lake upkeep: retention, tiers, compaction and vacuum of every table (pinned dataset versions "
                    "kept readable).")
def lake_maintenance_job():
    maintain_lake()


lake_maintenance = dg.ScheduleDefinition(
    name="lake_maintenance", job=lake_maintenance_job, cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily at 03:00, after daily_refresh: retention, the cold tier, compaction and vacuum, so tables "
                "rewritten by every ingest stop growing and old rows move to cheaper storage.",
)
