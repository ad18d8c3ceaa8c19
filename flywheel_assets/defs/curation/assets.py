"""Gold: scrubbed, de-duplicated trajectories and each cycle's immutable training set."""

import json
import shutil

import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.records import record_in_run
from flywheel_assets.defs.resources import (
    FlywheelResource, RefreshConfig, markdown_counts, refresh_metadata, table_metadata,
)
from flywheel_assets.lib.curation.refresh_curated import refresh_curated_trajectories
from flywheel_assets.lib.curation.select import count_by, export_chat_jsonl, select_training_rows
from flywheel_assets.lib.storage.artifacts import artifact_store, publish
from flywheel_assets.lib.tables import (
    CURATED_TRAJECTORIES, DATASET_MANIFESTS, SESSION_EVENTS, TRAINING_DATASET, TRAJECTORIES, TRAJECTORY_SCORES,
)


@dg.asset(group_name="curation", kinds={"duckdb", "delta"}, deps=["trajectory_scores", "trajectories", "session_events"],
          metadata=table_metadata(CURATED_TRAJECTORIES))
def curated_trajectories(config: RefreshConfig, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Every scored trajectory as chat messages (an edited answer replaced by the user's edit), PII scrubbed,
    duplicates marked, split train/holdout: what changed since the last run, and its duplicate groups."""
    with flywheel.writing("curated_trajectories"):
        outcome = refresh_curated_trajectories(flywheel.lake(), flywheel.config(), full=config.full)

        def counts(con) -> dict:
            return {name: markdown_counts(dict(con.execute(f"SELECT {column}, count(*) FROM t GROUP BY 1 ORDER BY 1")
                                               .fetchall()), label, "trajectories")
                    for name, column, label in (("dedup", "dedup_status", "status"), ("split", "split", "split"))}

        return dg.MaterializeResult(metadata=refresh_metadata(
            CURATED_TRAJECTORIES, outcome,
            """SELECT count(*) FILTER (pii_replacements > 0) AS trajectories_with_pii,
                      coalesce(sum(pii_replacements), 0) AS pii_spans_replaced,
                      count(*) FILTER (user_edited) AS answers_replaced_by_user_edits FROM t""",
            flywheel, more=counts))


@dg.asset(group_name="curation", kinds={"duckdb", "delta"}, deps=["curated_trajectories"],
          partitions_def=cycle_partitions, metadata=table_metadata(TRAINING_DATASET))
def training_dataset(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """The cycle's training set: the seed's tier budgets, balanced across task types, exported as chat JSONL."""
    with flywheel.writing("training_dataset", context):
        config, lake = flywheel.config(), flywheel.lake()
        cycle = context.partition_key
        existing = lake.read(DATASET_MANIFESTS, filter_sql=f"cycle = '{cycle}'")
        if existing.num_rows:
            # A cycle's dataset is immutable: the adapter trained on it must stay traceable.
            manifest = existing.to_pylist()[0]
            context.log.warning(f"cycle {cycle} already has a dataset ({manifest['n_rows']} rows); kept unchanged")
            return dg.MaterializeResult(metadata=_dataset_metadata(manifest, unchanged=True))
        inputs = lake.versions(CURATED_TRAJECTORIES, TRAJECTORY_SCORES, TRAJECTORIES, SESSION_EVENTS)
        rows = select_training_rows(lake.read(CURATED_TRAJECTORIES), cycle, config)
        if rows.num_rows == 0:
            raise dg.Failure(f"no trajectory is eligible for cycle {cycle}: ingest and score data first")
        export = config.datasets / cycle / "train.jsonl"
        sha = export_chat_jsonl(rows, export)
        manifest = {
            "cycle": cycle, "created_at": flywheel.now(), "seed": config.curation.seed,
            "target_size": config.curation.target_size, "n_rows": rows.num_rows,
            "tier_counts_json": json.dumps(count_by(rows, "tier")),
            "task_type_counts_json": json.dumps(count_by(rows, "task_type")),
            "input_versions_json": json.dumps(inputs), "trajectory_ids": rows.column("trajectory_id").to_pylist(),
            "export_path": str(export.relative_to(config.home)), "content_sha256": sha,
        }
        (export.parent / "manifest.json").write_text(json.dumps(manifest, default=str, indent=2))
        publish(config.home, export.parent)  # the artifact store's copy (when one is set) before the manifest row
        if artifact_store(config.home) is not None:  # there, forget rewrites it; a copy left here it would not reach
            shutil.rmtree(export.parent)
        # Rows first, then the manifest that makes the cycle "done": a crash in between
        # leaves no manifest, and the retry replaces the partial partition.
        lake.overwrite(TRAINING_DATASET, rows, predicate=f"cycle = '{cycle}'")
        lake.append(DATASET_MANIFESTS, _manifest_table(manifest))
        record_in_run(context, DATASET_MANIFESTS, cycle=cycle, n_rows=rows.num_rows, content_sha256=sha)
        context.log.info(f"cycle {cycle}: {rows.num_rows} rows, tiers {manifest['tier_counts_json']}")
        return dg.MaterializeResult(metadata=_dataset_metadata(manifest, unchanged=False))


def _manifest_table(manifest: dict):
    import pyarrow as pa

    return pa.Table.from_pylist([manifest], schema=DATASET_MANIFESTS.schema)


def _dataset_metadata(manifest: dict, unchanged: bool) -> dict:
    tiers = json.loads(manifest["tier_counts_json"])
    return table_metadata(
        TRAINING_DATASET,
        **{"dagster/row_count": manifest["n_rows"], "tier_mix": markdown_counts(tiers, "tier", "rows"),
           "task_types": markdown_counts(json.loads(manifest["task_type_counts_json"]), "task type", "rows"),
           "input_delta_versions": dg.MetadataValue.json(json.loads(manifest["input_versions_json"])),
           "export_path": manifest["export_path"], "content_sha256": manifest["content_sha256"],
           "unchanged": unchanged},
    )
