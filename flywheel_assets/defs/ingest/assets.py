"""Bronze: the landing zone's files as Delta tables, with every bad line quarantined."""

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource, markdown_counts, table_metadata
from flywheel_assets.lib.ingest.lock import IngestBusy
from flywheel_assets.lib.ingest.pipeline import IngestError, ingest_landing
from flywheel_assets.lib.tables import ANNOTATIONS, INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES

BRONZE = (SESSION_EVENTS, TRAJECTORIES, ANNOTATIONS, QUARANTINE, INGESTED_FILES)


@dg.multi_asset(
    name="bronze_ingest",
    specs=[
        dg.AssetSpec(t.name, description=t.description, group_name="ingest", kinds={"delta", "duckdb"},
                     metadata=table_metadata(t), deps=["cold_start_trajectories"] if t is TRAJECTORIES else [])
        for t in BRONZE
    ],
    description="Ingest every landing file not yet in the ledger into the bronze Delta tables.",
)
def bronze_ingest(context: dg.AssetExecutionContext, flywheel: FlywheelResource):
    lake = flywheel.lake()
    try:
        report = ingest_landing(flywheel.config(), lake, log=context.log.info, owner=f"dagster run {context.run_id}")
    except (IngestBusy, IngestError) as error:
        # a clear message, no retry storm: the next landing_sensor tick starts a fresh run
        raise dg.Failure(description=str(error), allow_retries=False) from error
    for path in report.cleaned:
        context.log.info(f"deleted a stale leftover of a failed ingest: {path}")
    files = dg.MetadataValue.md("\n".join(
        ["| file | lines | new | duplicates | quarantined | problem |", "|---|---:|---:|---:|---:|---|"]
        + [f"| {f['file']} | {f['lines']} | {f['new']} | {f['duplicates']} | {f['quarantined']} | "
           f"{f.get('problem') or ''} |" for f in report.files]
    ))
    new_rows = {SESSION_EVENTS: report.rows_new["events"], TRAJECTORIES: report.rows_new["trajectories"],
                ANNOTATIONS: report.rows_new["annotations"], QUARANTINE: report.lines_quarantined,
                INGESTED_FILES: len(report.files)}
    for table in BRONZE:
        extra = {"rows_added": dg.MetadataValue.int(new_rows[table]), "delta_version": lake.version(table) or 0}
        if table is QUARANTINE:
            extra["quarantined_by_reason"] = markdown_counts(dict(report.quarantined), "reason", "lines")
        if table is INGESTED_FILES:
            extra["files"] = files
            extra["rows_resumed"] = dg.MetadataValue.int(sum(report.resumed.values()))
            extra["stale_files_deleted"] = dg.MetadataValue.int(len(report.cleaned))
            extra["objects_copied_in"] = dg.MetadataValue.int(report.pulled)  # from FLYWHEEL_LANDING_URI
        if table is SESSION_EVENTS:
            extra["unscored_event_types"] = markdown_counts(
                {name or "(empty)": n for name, n in report.unscored_event_types.items()}, "event_type", "events")
        yield dg.MaterializeResult(
            asset_key=table.name,
            metadata=table_metadata(table, **extra) | {"dagster/row_count": lake.row_count(table)},
        )
