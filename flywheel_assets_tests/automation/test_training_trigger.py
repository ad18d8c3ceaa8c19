"""training_trigger through build_sensor_context, on an injected clock."""

from datetime import datetime, timedelta, timezone

import dagster as dg
import pyarrow as pa

from flywheel_assets.defs.automation.sensors import training_trigger
from flywheel_assets.lib.tenancy import next_cycle
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.clock import set_now
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import DATASET_MANIFESTS, TRAJECTORY_SCORES

NOW = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)


def _scores(n: int, high: int, at: datetime) -> pa.Table:
    return conform(pa.Table.from_pylist([
        {"trajectory_id": f"t{i}-{at.isoformat()}", "origin": "usage", "created_at": at,
         "combined_score": 0.9 if i < high else 0.1} for i in range(n)]), TRAJECTORY_SCORES)


def test_the_trigger_starts_a_cycle_only_when_the_rules_say_so(home, config, lake):
    resources = {"flywheel": FlywheelResource(home=str(home))}
    instance = dg.DagsterInstance.ephemeral()

    def tick():
        # direct invocation: the daemon adds the partition and launches the run from this result
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            result = training_trigger(context)
        return result if isinstance(result, dg.SensorResult) else dg.SensorResult(skip_reason=result)

    set_now(config, NOW)
    assert "no champion yet" in tick().skip_reason.skip_message
    ModelRegistry(lake).register("base-x", base="base-x", base_path="models/base-x", reason="test", actor="test")
    lake.append(TRAJECTORY_SCORES, _scores(300, 200, NOW - timedelta(days=1)))
    assert tick().skip_reason.skip_message.startswith("phase 0: 300 real trajectories")

    lake.append(TRAJECTORY_SCORES, _scores(2000, 1000, NOW - timedelta(hours=1)))
    lake.append(DATASET_MANIFESTS, conform(pa.Table.from_pylist([
        {"cycle": "cycle-0001", "created_at": NOW - timedelta(days=2), "n_rows": 1}]), DATASET_MANIFESTS))
    ModelRegistry(lake).register("cycle-0001-lora", base="base-x", base_path="models/base-x",
                                 adapter_path="models/cycle-0001-lora", parent="base-x", cycle="cycle-0001",
                                 reason="test", actor="test")
    instance.add_dynamic_partitions("cycle", ["cycle-0001"])
    assert tick().skip_reason.skip_message.startswith("cycle-0001-lora is still being evaluated or A/B tested")
    ModelRegistry(lake).transition("cycle-0001-lora", "retired", reason="test: lost its A/B test", actor="test")
    assert "only 2.0d since last training" in tick().skip_reason.skip_message

    set_now(config, NOW + timedelta(days=2))  # the clock moves; nothing else does
    result = tick()
    assert [r.partition_key for r in result.run_requests] == ["cycle-0002"]
    assert result.run_requests[0].tags["flywheel/trigger"] == "2300 new trajectories (52.2% high quality)"
    assert result.dynamic_partitions_requests[0].partition_keys == ["cycle-0002"]


def test_cycle_keys_count_up():
    assert next_cycle([]) == "cycle-0001"
    assert next_cycle(["cycle-0001", "cycle-0009", "manual"]) == "cycle-0010"


def test_every_lane_is_triggered_on_its_own_data(home, config, lake):
    """An isolated tenant's lane counts its tenant's new data only and trains beside the shared lane;
    the shared lane no longer counts that tenant's data."""
    (home / "config.json").write_text('{"tenancy": {"policies": {"globex": "isolated"}}}')
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    instance = dg.DagsterInstance.ephemeral()
    set_now(config, NOW)
    ModelRegistry(lake).register("base-x", base="base-x", base_path="models/base-x", reason="test", actor="test")
    for tenant, n, high in (("acme", 2100, 1200), ("globex", 2050, 1500)):
        scores = _scores(n, high, NOW - timedelta(hours=1)).to_pylist()
        lake.append(TRAJECTORY_SCORES, conform(pa.Table.from_pylist(
            [{**row, "trajectory_id": f"{tenant}-{row['trajectory_id']}", "tenant_id": tenant} for row in scores]),
            TRAJECTORY_SCORES))
    for cycle in ("cycle-0001", "cycle-0001@globex"):  # each lane trained once, four days ago; both lost
        lake.append(DATASET_MANIFESTS, conform(pa.Table.from_pylist([
            {"cycle": cycle, "created_at": NOW - timedelta(days=4), "n_rows": 1}]), DATASET_MANIFESTS))
        ModelRegistry(lake).register(f"{cycle}-lora", base="base-x", base_path="models/base-x", parent="base-x",
                                     adapter_path=f"models/{cycle}-lora", cycle=cycle, reason="test", actor="test")
        ModelRegistry(lake).transition(f"{cycle}-lora", "retired", reason="test: lost its A/B test", actor="test")
    instance.add_dynamic_partitions("cycle", ["cycle-0001", "cycle-0001@globex"])
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = training_trigger(context)
    assert [r.partition_key for r in result.run_requests] == ["cycle-0002", "cycle-0002@globex"]
    assert [r.tags["flywheel/lane"] for r in result.run_requests] == ["shared", "globex"]
    assert [r.tags["flywheel/trigger"] for r in result.run_requests] == [
        "2100 new trajectories (57.1% high quality)", "2050 new trajectories (73.2% high quality)"]
