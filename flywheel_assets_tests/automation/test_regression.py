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


def _sessions(version: str, quality: float, n: int, at: datetime, tenant: str = "acme") -> tuple[pa.Table, pa.Table]:
    feedback = [{"session_id": f"{tenant}-{version}-{at:%j}-{i}", "quality_score": quality, "last_ts": at,
                 "final_trajectory_id": f"t-{tenant}-{version}-{at:%j}-{i}"} for i in range(n)]
    trajectories = [{"trajectory_id": f["final_trajectory_id"], "model_version": version, "created_at": at,
                     "tenant_id": tenant} for f in feedback]
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
    [request] = tick()
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


def test_each_lane_is_watched_on_its_own_users(home, config, lake):
    """An isolated tenant's second champion regresses on its users while the shared champion holds on
    its own: only the lane's champion is rolled back, to the lane's previous one. (Compared across
    lanes, the shared champion's better numbers would have rolled back the wrong model.)"""
    (home / "config.json").write_text('{"tenancy": {"policies": {"globex": "isolated"}}}')
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    clock = {"now": T0}
    registry = ModelRegistry(lake, clock=lambda: clock["now"])
    registry.register("base", base="base", base_path="models/base", reason="start", actor="test")
    for day, version in ((0, "cycle-0001@globex-lora"), (1, "cycle-0002@globex-lora")):
        clock["now"] = T0 + timedelta(days=day)
        registry.register(version, base="base", base_path="models/base", adapter_path=f"models/{version}",
                          parent="base", cycle=version[:-5], reason="trained", actor="test")
        registry.transition(version, "treatment", reason="A/B", actor="test")
        registry.transition(version, "champion", reason="won", actor="test")
    clock["now"] = T0 + timedelta(days=1, hours=1)  # the shared lane promotes last: the latest promotion overall
    registry.register("cycle-0001-lora", base="base", base_path="models/base", adapter_path="models/cycle-0001-lora",
                      parent="base", cycle="cycle-0001", reason="trained", actor="test")
    registry.transition("cycle-0001-lora", "treatment", reason="A/B", actor="test")
    registry.transition("cycle-0001-lora", "champion", reason="won", actor="test")
    _land(lake, _sessions("base", 0.9, 100, T0 + timedelta(hours=12)),
          _sessions("cycle-0001@globex-lora", 0.6, 100, T0 + timedelta(hours=12), "globex"),
          _sessions("cycle-0001-lora", 0.92, 100, T0 + timedelta(days=1, hours=3)),
          _sessions("cycle-0002@globex-lora", 0.45, 100, T0 + timedelta(days=1, hours=3), "globex"))
    set_now(config, T0 + timedelta(days=1, hours=6))
    with dg.build_sensor_context(resources=resources) as context:
        [request] = regression_watch(context)
    assert request.tags["flywheel/version"] == "cycle-0002@globex-lora"
    assert "quality 0.450 vs cycle-0001@globex-lora 0.600" in request.tags["flywheel/reason"]
    assert regression_rollback_job.execute_in_process(run_config=request.run_config, resources=resources).success
    assert ModelRegistry(lake).champion("globex")["version"] == "cycle-0001@globex-lora"
    assert ModelRegistry(lake).champion()["version"] == "cycle-0001-lora"
