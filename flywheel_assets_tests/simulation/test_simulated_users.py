"""Demo mode's simulated days: the simulated_users sensor through build_sensor_context, and
simulated_usage through dg.materialize on a temporary FLYWHEEL_HOME with a real tiny base."""

import json
from datetime import datetime, timedelta, timezone
from random import Random

import dagster as dg
import pyarrow as pa
import pytest

from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.simulation.assets import simulated_usage
from flywheel_assets.defs.simulation.jobs import simulated_usage_job
from flywheel_assets.defs.simulation.sensors import simulated_users
from flywheel_assets.lib.clock import now, set_now
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.simulation.tasks import expert_messages, generate_tasks
from flywheel_assets.lib.tables import QUARANTINE, SESSION_EVENTS, TRAJECTORIES
from flywheel_assets.lib.training.pipeline import set_threads, train_base

NOW = datetime(2026, 11, 26, 15, 30, tzinfo=timezone.utc)


def _resources(home, settings: dict) -> dict:
    (home / "config.json").write_text(json.dumps(settings))
    return {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}


def _tick(instance, resources):
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        return simulated_users(context)


def _champion(lake) -> None:
    ModelRegistry(lake).register("base-tiny", base="base-tiny", base_path="models/base-tiny", reason="test",
                                 actor="test")


def _run(instance, status: dg.DagsterRunStatus) -> None:
    instance.add_run(dg.DagsterRun(job_name=simulated_usage_job.name, status=status))


@pytest.mark.parametrize("settings, reason", [
    ({"simulation": {"enabled": False}}, "simulated users are off: simulation.enabled is false"),
    ({"base_model": {"model_id": "Qwen/Qwen2.5-0.5B"}},
     "simulated users are off: a real model is configured (base_model.model_id = Qwen/Qwen2.5-0.5B) "
     "and simulation.enabled is not true"),
    ({"base_model": {"model_id": "Qwen/Qwen2.5-0.5B"}, "simulation": {"enabled": False}},
     "simulated users are off: simulation.enabled is false"),
])
def test_off_outside_demo_mode(home, lake, settings, reason):
    _champion(lake)
    assert _tick(dg.DagsterInstance.ephemeral(), _resources(home, settings)).skip_message == reason


def test_the_sensor_waits_for_a_champion_and_for_the_previous_day(home, config, lake):
    resources = _resources(home, {"simulation": {"users_per_tick": 40, "interval_minutes": 5}})
    instance = dg.DagsterInstance.ephemeral()
    set_now(config, NOW)
    assert _tick(instance, resources).skip_message == (
        "no champion yet: base_model starts once landing_sensor has ingested the cold start")
    lake.append(TRAJECTORIES, conform(pa.Table.from_pylist([{"trajectory_id": "t-golden", "origin": "golden"}]),
                                      TRAJECTORIES))
    request = _tick(instance, resources)  # demo mode trains its base itself
    assert request.job_name == "base_model_job"
    for status, said in ((dg.DagsterRunStatus.STARTED, "base_model is training"),
                         (dg.DagsterRunStatus.FAILURE, "ended FAILURE")):
        other = dg.DagsterInstance.ephemeral()
        other.add_run(dg.DagsterRun(job_name="base_model_job", status=status))
        assert said in _tick(other, resources).skip_message  # never a second run, never a retry loop

    _champion(lake)
    request = _tick(instance, resources)
    assert isinstance(request, dg.RunRequest) and request.job_name == "simulated_usage_job"
    assert request.run_config["ops"] == {"simulated_usage": {"config": {"day": "2026-11-26"}}}
    assert request.tags == {"flywheel/simulated_day": "2026-11-26", "flywheel/users": "40"}

    for status in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTED):
        in_flight = dg.DagsterInstance.ephemeral()
        _run(in_flight, status)
        assert _tick(in_flight, resources).skip_message.startswith("the previous simulated day is still running")

    _run(instance, dg.DagsterRunStatus.SUCCESS)  # just ended: the next day waits for the interval
    waiting = _tick(instance, resources).skip_message
    assert waiting.startswith("next simulated day in ") and waiting.endswith("(simulation.interval_minutes = 5)")
    assert 290 <= int(waiting.split()[4]) <= 300

    resources = _resources(home, {"simulation": {"interval_minutes": 0}})
    assert _tick(instance, resources).tags["flywheel/simulated_day"] == "2026-11-26"


@pytest.fixture
def tiny_base(home, config, lake):
    """A real (weak) base registered as champion: a second of pretraining."""
    set_threads()
    config.base_model = config.base_model.model_copy(
        update={"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "pretrain_steps": 2,
                "batch_size": 4})
    rng = Random(0)
    train_base(config, [expert_messages(task, rng) for task in generate_tasks(40, seed=3)],
               config.models / "base-tiny")
    _champion(lake)


def test_a_simulated_day_lands_usage_that_ingests_cleanly(home, config, lake, tiny_base):
    resources = _resources(home, {"simulation": {"users_per_tick": 3, "sessions_per_user": [1, 1]}})
    instance = dg.DagsterInstance.ephemeral()
    set_now(config, NOW)
    request = _tick(instance, resources)
    result = dg.materialize([simulated_usage], resources=resources, instance=instance, run_config=request.run_config)
    assert result.success
    metadata = result.asset_materializations_for_node("simulated_usage")[0].metadata
    assert (metadata["day"].value, metadata["users"].value, metadata["sessions"].value) == ("2026-11-26", 3, 3)
    # the clock moved past the day: every trajectory of it is in the past for the sensors
    assert now(config) == datetime(2026, 11, 27, tzinfo=timezone.utc) and metadata["clock"].value == now(config).isoformat()
    files = sorted(p.relative_to(config.landing).as_posix() for p in config.landing.rglob("*.jsonl*"))
    assert [f.split("/")[0] for f in files] == ["events", "trajectories"]

    assert dg.materialize([bronze_ingest], resources=resources, instance=instance).success
    trajectories = lake.read(TRAJECTORIES).to_pylist()
    assert len(trajectories) == metadata["trajectories"].value >= 3
    assert {(t["origin"], t["model_version"]) for t in trajectories} == {("usage", "base-tiny")}
    day = datetime(2026, 11, 26, tzinfo=timezone.utc)
    assert all(day <= t["created_at"] < day + timedelta(days=1) for t in trajectories)
    assert {t["user_id"] for t in trajectories} == {"user-0", "user-1", "user-2"}
    assert lake.row_count(SESSION_EVENTS) == metadata["events"].value > 0
    assert lake.row_count(QUARANTINE) == 0

    # the next tick simulates the next day
    assert _tick(dg.DagsterInstance.ephemeral(), resources).tags["flywheel/simulated_day"] == "2026-11-27"


def test_the_asset_refuses_outside_demo_mode(home, lake):
    _champion(lake)
    resources = _resources(home, {"simulation": {"enabled": False}})
    result = dg.materialize([simulated_usage], resources=resources, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "simulated users are off: simulation.enabled is false" in failure
    assert not (load_config(home).landing).exists()


def test_wired_into_the_definitions():
    from flywheel_assets.definitions import defs

    loaded = defs()
    sensor = loaded.resolve_sensor_def("simulated_users")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert {job.name for job in sensor.jobs} == {"simulated_usage_job", "base_model_job"}
    assert loaded.resolve_asset_graph().get(dg.AssetKey("simulated_usage")).group_name == "simulation"
    job = loaded.resolve_job_def("simulated_usage_job")
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} == {"simulated_usage"}
