"""lake_maintenance: compaction and vacuum of every table, daily after the refresh (lib/storage/maintenance.py)."""

from typing import Optional

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource


class MaintenanceRunConfig(dg.Config):
    retention_hours: Optional[float] = None  # maintenance.vacuum_retention_hours when empty


@dg.op(description="Compacts every table's small files and vacuums the files that neither the current version "
                   "nor a dataset manifest's pinned version reads.")
def maintain_lake(context: dg.OpExecutionContext, config: MaintenanceRunConfig, flywheel: FlywheelResource) -> None:
    from flywheel_assets.lib.storage.maintenance import maintain

    done = maintain(flywheel.config(), flywheel.lake(), config.retention_hours, log=context.log.info)
    before, after = sum(u.bytes_before for u in done), sum(u.bytes_after for u in done)
    lines = ["| table | files | MB | compacted | vacuumed | pinned versions |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {u.table} | {u.files_before} → {u.files_after} | {u.bytes_before / 1e6:.2f} → {u.bytes_after / 1e6:.2f} "
              f"| {u.compacted} | {u.vacuumed} | {', '.join(map(str, u.pinned)) or '-'}{' ' + u.error if u.error else ''} |"
              for u in done]
    context.log.info(f"lake: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB\n" + "\n".join(lines))


@dg.job(description="Lake upkeep: compaction and vacuum of every table (pinned dataset versions kept readable).")
def lake_maintenance_job():
    maintain_lake()


lake_maintenance = dg.ScheduleDefinition(
    name="lake_maintenance", job=lake_maintenance_job, cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily at 03:00, after daily_refresh: compaction and vacuum, so tables rewritten by every "
                "ingest stop growing.",
)
