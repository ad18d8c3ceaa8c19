"""The executor and the training runs' tags come from the environment (README: Scaling out), and the demo
driver launches through the executor chosen: with a process per step, no step runs in the driver."""

from __future__ import annotations

import json
import os

import dagster as dg
import pytest

from flywheel_assets.defs.resources import executor, training_run_tags


def test_the_executor_follows_flywheel_executor(monkeypatch):
    monkeypatch.delenv("FLYWHEEL_EXECUTOR", raising=False)
    monkeypatch.delenv("DAGSTER_DEPLOYMENT", raising=False)
    assert executor() is dg.in_process_executor
    monkeypatch.setenv("DAGSTER_DEPLOYMENT", "cluster")
    assert executor() is None  # Dagster's default, a process per step
    monkeypatch.setenv("FLYWHEEL_EXECUTOR", "in_process")
    assert executor() is dg.in_process_executor
    monkeypatch.setenv("FLYWHEEL_EXECUTOR", "celery")
    with pytest.raises(ValueError, match="in_process, multiprocess, dask"):
        executor()
    monkeypatch.setenv("FLYWHEEL_EXECUTOR", "dask")
    monkeypatch.delenv("FLYWHEEL_DASK_SCHEDULER", raising=False)
    with pytest.raises(ValueError, match="FLYWHEEL_DASK_SCHEDULER"):
        executor()


def test_training_runs_carry_the_tags_the_environment_gives(monkeypatch):
    monkeypatch.delenv("FLYWHEEL_TRAINING_RUN_TAGS", raising=False)
    assert training_run_tags() == {}
    pod = {"pod_spec_config": {"node_selector": {"pool": "gpu"}},
           "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
    monkeypatch.setenv("FLYWHEEL_TRAINING_RUN_TAGS", json.dumps({"dagster-k8s/config": pod, "team": "ml"}))
    assert training_run_tags() == {"dagster-k8s/config": json.dumps(pod), "team": "ml"}
    monkeypatch.setenv("FLYWHEEL_TRAINING_RUN_TAGS", "[1]")
    with pytest.raises(ValueError, match="JSON object"):
        training_run_tags()


def test_the_driver_runs_a_job_on_the_chosen_executor_not_in_its_own_process(home, tmp_path, monkeypatch):
    from flywheel_assets.definitions import defs
    from flywheel_assets.flywheel import run_job

    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("FLYWHEEL_EXECUTOR", "multiprocess")
    with dg.DagsterInstance.get() as instance:
        result = run_job(defs(), instance, "bootstrap_job")
        assert result.success
        starts = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_START)
        assert [e.step_key for e in starts] == ["cold_start_trajectories"]
        assert starts[0].dagster_event.pid != os.getpid()
    assert any((home / "landing" / "trajectories").iterdir())
