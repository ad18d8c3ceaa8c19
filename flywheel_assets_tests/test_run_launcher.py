"""A run whose process is killed is marked FAILURE by run monitoring's next pass (the daemon
makes one as it starts), with the dagster.yaml that `make` writes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.workspace.load_target import EmptyWorkspaceTarget
from dagster._daemon.monitoring import execute_run_monitoring_iteration

from flywheel_assets.run_launcher import CLOCK_SLACK_S, LocalRunLauncher, process_alive, worker_pid

ROOT = Path(__file__).resolve().parents[1]

# A run that would take minutes, executed like `make demo` does: in the process that asked for it.
SLOW_RUN = textwrap.dedent("""
    import time
    import dagster as dg

    @dg.op
    def wait():
        time.sleep(300)

    @dg.job
    def slow_job():
        wait()

    slow_job.execute_in_process(instance=dg.DagsterInstance.get())
""")


def _makefile_dagster_yaml() -> str:
    """The text the Makefile's `$(DAGSTER_HOME)/dagster.yaml` target writes."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if line.startswith("$(DAGSTER_HOME)/dagster.yaml:"))
    printf = next(line for line in lines[target + 1:] if line.strip().startswith("printf"))
    return printf.split("'")[1].replace("\\n", "\n")


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(_makefile_dagster_yaml())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _monitoring_pass(instance: dg.DagsterInstance) -> None:
    with create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as workspace:
        errors = [e for e in execute_run_monitoring_iteration(workspace, logging.getLogger("test")) if e]
    assert not errors


def _started_run(instance: dg.DagsterInstance, timeout_s: float = 60) -> dg.DagsterRun:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        runs = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        if runs and worker_pid(instance, runs[0].run_id):
            return runs[0]
        time.sleep(0.2)
    raise AssertionError("the run never started")


def test_a_killed_run_is_failed_by_the_next_monitoring_pass(dagster_home):
    instance = dg.DagsterInstance.get()
    assert isinstance(instance.run_launcher, LocalRunLauncher) and instance.run_monitoring_enabled
    worker = subprocess.Popen([sys.executable, "-c", SLOW_RUN], env={**os.environ, "DAGSTER_HOME": str(dagster_home)})
    try:
        run = _started_run(instance)
        assert worker_pid(instance, run.run_id)[0] == worker.pid
        _monitoring_pass(instance)  # alive: left alone
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    finally:
        worker.kill()
        worker.wait()
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # nobody noticed

    _monitoring_pass(instance)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    failure = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    assert f"worker process {worker.pid} is gone" in failure[0].event_log_entry.dagster_event.message


def test_a_run_with_no_worker_pid_yet_is_left_alone(dagster_home):
    instance = dg.DagsterInstance.get()
    run = instance.create_run_for_job(dg.GraphDefinition("g").to_job(), status=dg.DagsterRunStatus.STARTED)
    _monitoring_pass(instance)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED


def test_a_reused_pid_is_not_the_worker():
    assert process_alive(os.getpid(), logged_at=time.time())
    assert process_alive(os.getpid(), logged_at=time.time() - 60)  # a wall clock stepped forward a minute
    later = subprocess.Popen(["sleep", "30"])
    try:
        # this pid's process started after the worker logged it: the worker died and the pid went to another
        assert not process_alive(later.pid, logged_at=time.time() - CLOCK_SLACK_S - 10)
        assert process_alive(later.pid, logged_at=time.time())
    finally:
        later.kill()
        later.wait()
    assert not process_alive(later.pid, logged_at=time.time())


def test_a_fresh_demo_forgets_the_cycles_an_earlier_run_left_in_the_instance():
    import dagster as dg

    from flywheel_assets.defs.partitions import cycle_partitions
    from flywheel_assets.flywheel import forget_cycles

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(cycle_partitions.name, ["cycle-0001", "cycle-0002"])
    assert forget_cycles(instance) == ["cycle-0001", "cycle-0002"]
    assert instance.get_dynamic_partitions(cycle_partitions.name) == []
