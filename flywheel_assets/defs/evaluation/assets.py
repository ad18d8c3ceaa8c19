"""Offline evaluation of each cycle's candidate against the champion, and the promotion gate."""

import json

import dagster as dg
import pyarrow as pa

from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.records import record_in_run
from flywheel_assets.lib.evaluation.offline import evaluate_versions
from flywheel_assets.lib.tables import OFFLINE_EVALUATIONS
from flywheel_assets.lib.training.pipeline import set_threads


@dg.asset(group_name="evaluation", kinds={"torch", "delta"}, deps=["lora_adapter"], partitions_def=cycle_partitions)
def offline_eval(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Candidate (base + adapter) vs champion on the held-out task set: success, tool and argument accuracy."""
    config, lake = flywheel.config(), flywheel.lake()
    registry = flywheel.registry()
    cycle = context.partition_key
    candidate = registry.get(f"{cycle}-lora")
    if candidate is None:
        raise dg.Failure(f"no candidate for {cycle}: materialize lora_adapter first")
    # the version serving the candidate's lane when it was trained (a hybrid lane's own champion, not
    # the shared one it was trained over); its parent for versions registered before lanes
    champion = registry.get(json.loads(candidate["metadata_json"] or "{}").get("reference") or candidate["parent"])
    set_threads()
    report = evaluate_versions(config, candidate, champion, log=context.log.info)
    now = flywheel.now()
    rows = [{**row, "cycle": cycle, "evaluated_at": now} for row in report["rows"]]
    version = lake.overwrite(OFFLINE_EVALUATIONS, pa.Table.from_pylist(rows, schema=OFFLINE_EVALUATIONS.schema),
                             predicate=f"cycle = '{cycle}'")
    record_in_run(context, OFFLINE_EVALUATIONS, cycle=cycle, rows=len(rows), delta_version=version,
                  gate_passed=report["gate_passed"])
    return dg.MaterializeResult(metadata={
        "candidate": candidate["version"], "champion": champion["version"],
        "candidate_success": report["candidate"]["overall"]["success"],
        "champion_success": report["champion"]["overall"]["success"],
        "difference": report["difference"]["difference"],
        "gate": report["gate_reason"], "gate_passed": report["gate_passed"],
        "results": dg.MetadataValue.md(report["markdown"]),
    })


@dg.asset_check(asset=offline_eval, blocking=True, partitions_def=cycle_partitions,
                description="Promotion gate: the candidate may not be worse than the champion by more than "
                            "evaluation.gate_margin on the held-out tasks.")
def promotion_gate(context: dg.AssetCheckExecutionContext, flywheel: FlywheelResource) -> dg.AssetCheckResult:
    rows = flywheel.lake().read(OFFLINE_EVALUATIONS, filter_sql=(
        f"cycle = '{context.partition_key}' AND role = 'candidate' AND scope = 'overall'")).to_pylist()
    if not rows:
        return dg.AssetCheckResult(passed=False, description="no evaluation recorded for this cycle")
    row = rows[0]
    return dg.AssetCheckResult(passed=bool(row["gate_passed"]), description=row["gate_reason"], metadata={
        "difference": row["difference"], "difference_low": row["difference_low"],
        "difference_high": row["difference_high"], "candidate_success": row["success"]})
