"""The tables a step writes beside its own asset (the registry, A/B looks, evaluations, dataset
manifests) as assets of their own, so the catalog and lineage show every table; each write is
recorded as a materialization: inside the run that made it, or as a runless event from the CLI."""

import dagster as dg

from flywheel_assets.lib.tables import (
    AB_RESULTS, DATASET_MANIFESTS, FORGET_REQUESTS, MODEL_REGISTRY, OFFLINE_EVALUATIONS, Table,
)

RECORDS = {
    MODEL_REGISTRY.name: ("experiments", ["base_model", "lora_adapter", "offline_eval"]),
    AB_RESULTS.name: ("experiments", ["offline_eval"]),
    OFFLINE_EVALUATIONS.name: ("evaluation", ["lora_adapter"]),
    DATASET_MANIFESTS.name: ("curation", ["curated_trajectories"]),
    FORGET_REQUESTS.name: ("privacy", []),  # written by forget_job and `flywheel forget`
}
TABLES = {t.name: t for t in (MODEL_REGISTRY, AB_RESULTS, OFFLINE_EVALUATIONS, DATASET_MANIFESTS, FORGET_REQUESTS)}

record_specs = [
    dg.AssetSpec(name, group_name=group, deps=deps, kinds={"delta"},
                 description=f"{TABLES[name].layer}/{name}: {TABLES[name].description.splitlines()[0]}",
                 metadata={"table": f"{TABLES[name].layer}/{name}"})
    for name, (group, deps) in RECORDS.items()
]


def materialization(table: Table, **metadata) -> dg.AssetMaterialization:
    return dg.AssetMaterialization(asset_key=table.name, metadata={k: v for k, v in metadata.items() if v is not None})


def registry_changed(rows: list[dict]) -> dg.AssetMaterialization:
    """A registry change: each version's new status, share, reason and who made it."""
    return materialization(MODEL_REGISTRY, changes=dg.MetadataValue.md("\n".join(
        ["| version | status | traffic | by | reason |", "|---|---|---:|---|---|"]
        + [f"| {r['version']} | {r['status']} | {r['traffic_share']:.0%} | {r['actor']} | {r['reason']} |" for r in rows])),
        versions=", ".join(r["version"] for r in rows))


def record_in_run(context, table: Table, **metadata) -> None:
    """Inside a run: its event log then shows the table's new state beside the step's own asset."""
    context.log_event(materialization(table, **metadata))


def report_runless(event: dg.AssetMaterialization) -> bool:
    """From the CLI: a runless event in the Dagster instance (DAGSTER_HOME), when there is one.
    Best effort: the change itself is already in the lake, so no instance (or a DAGSTER_HOME
    that is not a folder yet) only leaves the catalog without the event."""
    import os

    if not os.path.isdir(os.environ.get("DAGSTER_HOME") or ""):
        return False
    try:
        with dg.DagsterInstance.get() as instance:
            instance.report_runless_asset_event(event)
    except Exception:  # noqa: BLE001  (an instance that cannot be opened must not fail the command)
        return False
    return True
