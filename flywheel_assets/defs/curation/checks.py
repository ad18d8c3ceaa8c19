"""Nothing unsafe or leaked may reach a training set (blocking: training waits on these)."""

import json

import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.curation.scrub import find_pii
from flywheel_assets.lib.domains import load_domain, prompt_key
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, TRAINING_DATASET, TRAJECTORIES
from flywheel_assets.lib.tenancy import lane_of_cycle


@dg.asset_check(asset="training_dataset", partitions_def=cycle_partitions, blocking=True,
                description="No email, phone, card, IP address or secret pattern is left in the cycle's rows.")
def no_pii_in_training_set(context: dg.AssetCheckExecutionContext, flywheel: FlywheelResource) -> dg.AssetCheckResult:
    rows = flywheel.lake().read(TRAINING_DATASET, columns=["trajectory_id", "messages_json"],
                                filter_sql=f"cycle = '{context.partition_key}'")
    leaks = {t: kinds for t, m in zip(rows.column("trajectory_id").to_pylist(), rows.column("messages_json").to_pylist())
             if (kinds := find_pii(m))}
    return dg.AssetCheckResult(passed=rows.num_rows > 0 and not leaks, metadata={
        "rows_checked": rows.num_rows, "rows_with_pii": len(leaks), "examples": str(list(leaks.items())[:5]) or "none"})


@dg.asset_check(asset="training_dataset", partitions_def=cycle_partitions, blocking=True,
                description="No trajectory, and no prompt, of the held-out evaluation split is in the training set.")
def no_holdout_leakage(context: dg.AssetCheckExecutionContext, flywheel: FlywheelResource) -> dg.AssetCheckResult:
    lake = flywheel.lake()
    with flywheel.sql() as con:
        lake.register(con, TRAINING_DATASET)
        lake.register(con, CURATED_TRAJECTORIES)
        overlap, prompt_overlap = con.execute("""
            WITH train AS (SELECT d.trajectory_id, c.prompt_key FROM training_dataset d
                           JOIN curated_trajectories c USING (trajectory_id) WHERE d.cycle = $cycle),
                 holdout AS (SELECT trajectory_id, prompt_key FROM curated_trajectories WHERE split = 'holdout')
            SELECT (SELECT count(*) FROM train WHERE trajectory_id IN (SELECT trajectory_id FROM holdout)),
                   (SELECT count(*) FROM train WHERE prompt_key IN (SELECT prompt_key FROM holdout))
        """, {"cycle": context.partition_key}).fetchone()
    return dg.AssetCheckResult(passed=overlap == 0 and prompt_overlap == 0, metadata={
        "trajectories_in_both": overlap, "prompts_in_both": prompt_overlap})


@dg.asset_check(asset="training_dataset", partitions_def=cycle_partitions, blocking=True,
                description="No question of the domain's held-out evaluation tasks is asked in the cycle's "
                            "training rows (the gate would measure memory, not skill).")
def no_evaluation_task_in_training_set(context: dg.AssetCheckExecutionContext,
                                       flywheel: FlywheelResource) -> dg.AssetCheckResult:
    config = flywheel.config()
    heldout = load_domain(config.domain).heldout_keys()
    rows = flywheel.lake().read(TRAINING_DATASET, columns=["trajectory_id", "messages_json"],
                                filter_sql=f"cycle = '{context.partition_key}'").to_pylist()
    leaked = [row["trajectory_id"] for row in rows if _asks_any(row["messages_json"], heldout)]
    return dg.AssetCheckResult(passed=not leaked, metadata={
        "domain": config.domain.name, "heldout_tasks": len(heldout), "rows_checked": len(rows),
        "rows_asking_a_heldout_task": len(leaked), "examples": ", ".join(leaked[:5]) or "none"})


@dg.asset_check(asset="training_dataset", partitions_def=cycle_partitions, blocking=True,
                description="Every row of the cycle's training set is of a tenant its lane may train on (tenancy: "
                            "the shared lane's pooled tenants, or an isolated or hybrid tenant's own lane); "
                            "each row's tenant read from bronze trajectories.")
def training_set_tenancy(context: dg.AssetCheckExecutionContext, flywheel: FlywheelResource) -> dg.AssetCheckResult:
    config, lake = flywheel.config(), flywheel.lake()
    lane = lane_of_cycle(context.partition_key)
    forbidden_row = f"NOT ({config.tenancy.lane_sql(lane, 't.tenant_id')})"
    with flywheel.sql() as con:
        lake.register(con, TRAINING_DATASET)
        lake.register(con, TRAJECTORIES)
        rows, forbidden, tenants = con.execute(f"""
            SELECT count(*), count(*) FILTER (WHERE {forbidden_row}),
                   string_agg(DISTINCT coalesce(t.tenant_id, 'default'), ', ' ORDER BY coalesce(t.tenant_id, 'default'))
                       FILTER (WHERE {forbidden_row})
            FROM training_dataset d LEFT JOIN trajectories t USING (trajectory_id) WHERE d.cycle = $cycle
        """, {"cycle": context.partition_key}).fetchone()
    return dg.AssetCheckResult(passed=forbidden == 0, metadata={
        "lane": lane or "shared", "rows_checked": rows, "rows_of_other_tenants": forbidden,
        "tenants": tenants or "none", "policy": dg.MetadataValue.json(config.tenancy.model_dump())})


def _asks_any(messages_json: str, keys: frozenset[str]) -> bool:
    """Whether the conversation's user turns, together or any one alone, are a held-out request."""
    messages = json.loads(messages_json or "[]")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return prompt_key(users) in keys or any(prompt_key(str(m.get("content") or "")) in keys for m in users)
