"""Sensors decide, runs act: an ab_monitor tick writes nothing and requests the run that moves
the candidate, with the decision and its reason in the run's tags."""

from datetime import datetime, timezone

import dagster as dg
import pyarrow as pa

from flywheel_assets.defs.automation.sensors import ab_monitor
from flywheel_assets.defs.experiments.assets import rollout_step
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.clock import set_now
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import AB_RESULTS, MODEL_REGISTRY, OFFLINE_EVALUATIONS

NOW = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)


def test_a_tick_writes_nothing_and_the_run_it_requests_moves_the_candidate(home, config, lake):
    set_now(config, NOW)
    registry = ModelRegistry(lake, clock=lambda: NOW)
    registry.register("base-v0", base="base-v0", base_path="models/base-v0", reason="pretrained", actor="test")
    registry.register("cycle-0001-lora", base="base-v0", base_path="models/base-v0", adapter_path="models/a",
                      parent="base-v0", cycle="cycle-0001", reason="trained", actor="test")
    lake.append(OFFLINE_EVALUATIONS, conform(pa.Table.from_pylist([{
        "cycle": "cycle-0001", "version": "cycle-0001-lora", "role": "candidate", "scope": "overall",
        "gate_passed": True, "gate_reason": "+4.0 points over the champion"}]), OFFLINE_EVALUATIONS))
    resources = {"flywheel": FlywheelResource(home=str(home))}
    before = lake.versions(MODEL_REGISTRY, AB_RESULTS)

    with dg.build_sensor_context(resources=resources) as context:
        requests = ab_monitor(context)
    assert lake.versions(MODEL_REGISTRY, AB_RESULTS) == before  # the tick wrote nothing
    assert ModelRegistry(lake).get("cycle-0001-lora")["status"] == "candidate"
    [request] = requests
    assert request.partition_key == "cycle-0001"
    assert request.tags["flywheel/decision"] == "gate PROCEED" and "+4.0 points" in request.tags["flywheel/reason"]

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("cycle", ["cycle-0001"])
    result = dg.materialize([rollout_step], partition_key="cycle-0001", resources=resources, instance=instance,
                            tags=request.tags)
    assert result.success
    assert ModelRegistry(lake).get("cycle-0001-lora")["status"] == "canary"
    assert [r["outcome"] for r in lake.read(AB_RESULTS).to_pylist()] == ["PROCEED"]
    keys = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert {"rollout_step", "model_registry", "ab_results"} <= keys
    [metadata] = [m.metadata for m in result.asset_materializations_for_node("rollout_step")
                  if m.asset_key.to_user_string() == "rollout_step"]
    assert metadata["sensor_decision"].value == "gate PROCEED" and metadata["outcome"].value == "PROCEED"
