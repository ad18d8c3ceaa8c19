"""regression_watch: a worse champion after promotion is rolled back, visibly in the registry."""

from datetime import datetime, timedelta, timezone

import dagster as dg
import pyarrow as pa

from flywheel_assets.defs.automation.jobs import regression_rollback_job
from flywheel_assets.defs.automation.sensors import regression_watch
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.clock import set_now
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import MODEL_REGISTRY, SESSION_FEEDBACK, TRAJECTORIES

T0 = datetime(2026, 11, 20, tzinfo=timezone.utc)


def _sessions(version: str, quality: float, n: int, at: datetime) -> tuple[pa.Table, pa.Table]:
    feedback = [{"session_id": f"{version}-{at:%j}-{i}", "quality_score": quality, "last_ts": at,
                 "final_trajectory_id": f"t-{version}-{at:%j}-{i}"} for i in range(n)]
    trajectories = [{"trajectory_id": f["final_trajectory_id"], "model_version": version, "created_at": at}
                    for f in feedback]
    return conform(pa.Table.from_pylist(feedback), SESSION_FEEDBACK), conform(pa.Table.from_pylist(trajectories), TRAJECTORIES)


def _land(lake, *pairs):
    lake.append(SESSION_FEEDBACK, pa.concat_tables([p[0] for p in pairs]))
    lake.append(TRAJECTORIES, pa.concat_tables([p[1] for p in pairs]))


def test_a_regressing_champion_is_rolled_back(home, config, lake):
    clock = {"now": T0}
    registry = ModelRegistry(lake, clock=lambda: clock["now"])
    registry.register("base", base="base", base_path="models/base", reason="start", actor="test")
    registry.register("bad", base="base", base_path="models/base", adapter_path="models/bad", parent="base",
                      reason="cycle 1", actor="test")
    _land(lake, _sessions("base", 0.8, 100, T0 + timedelta(hours=12)))
    clock["now"] = T0 + timedelta(days=1)
    registry.transition("bad", "treatment", reason="forced past the gate", actor="test")
    registry.transition("bad", "champion", reason="forced past the A/B test", actor="test")
    resources = {"flywheel": FlywheelResource(home=str(home))}

    def tick():
        with dg.build_sensor_context(resources=resources) as context:
            return regression_watch(context)

    set_now(config, T0 + timedelta(days=1, hours=6))
    assert "waiting for data" in tick().skip_message
    _land(lake, _sessions("bad", 0.5, 100, T0 + timedelta(days=1, hours=3)))
    registry_version = lake.version(MODEL_REGISTRY)
    request = tick()
    # the tick decides and writes nothing; the run it requests rolls back, with the reason in its tags
    assert lake.version(MODEL_REGISTRY) == registry_version and ModelRegistry(lake).champion()["version"] == "bad"
    assert request.tags["flywheel/decision"] == "ROLLBACK" and "bad quality 0.500" in request.tags["flywheel/reason"]
    result = regression_rollback_job.execute_in_process(run_config=request.run_config, resources=resources,
                                                        tags=request.tags)
    assert result.success
    changes = [m for m in result.get_asset_materialization_events() if m.asset_key.to_user_string() == "model_registry"]
    assert len(changes) == 1 and "bad | rolled_back" in changes[0].materialization.metadata["changes"].value
    latest = {r["version"]: r["status"] for r in ModelRegistry(lake).current()}
    assert latest == {"base": "champion", "bad": "rolled_back"}
    reasons = [r["reason"] for r in ModelRegistry(lake).history()]
    assert any(r.startswith("regression: bad quality 0.500 vs base 0.800") for r in reasons)


def test_a_champion_that_holds_is_kept(home, config, lake):
    clock = {"now": T0}
    registry = ModelRegistry(lake, clock=lambda: clock["now"])
    registry.register("base", base="base", base_path="models/base", reason="start", actor="test")
    registry.register("good", base="base", base_path="models/base", adapter_path="models/good", parent="base",
                      reason="cycle 1", actor="test")
    clock["now"] = T0 + timedelta(days=1)
    registry.transition("good", "treatment", reason="passed the gate", actor="test")
    registry.transition("good", "champion", reason="won the A/B test", actor="test")
    _land(lake, _sessions("base", 0.6, 80, T0 + timedelta(hours=12)),
          _sessions("good", 0.7, 80, T0 + timedelta(days=1, hours=3)))
    set_now(config, T0 + timedelta(days=1, hours=6))
    with dg.build_sensor_context(resources={"flywheel": FlywheelResource(home=str(home))}) as context:
        assert "good holds: +16.7%" in regression_watch(context).skip_message
    assert ModelRegistry(lake).champion()["version"] == "good"
