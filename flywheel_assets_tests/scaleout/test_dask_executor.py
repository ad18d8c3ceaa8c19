"""The Dask executor (flywheel_assets/dask_executor.py) on a real local Dask cluster: a partitioned
run executes (dagster-dask's own executor failed it before the first step), every step runs on a
worker, and a step whose blocking check failed keeps its downstream from running, as in process.
Needs the `scaleout` extra (make test-scaleout); skipped without it."""

from __future__ import annotations

import os

import dagster as dg
import pytest

pytest.importorskip("dagster_dask")

parts = dg.StaticPartitionsDefinition(["p1"])


@dg.asset(partitions_def=parts)
def dataset(context) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"pid": os.getpid(), "partition": context.partition_key})


@dg.asset_check(asset=dataset, blocking=True)
def dataset_is_clean(context) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=open(os.environ["TEST_DATASET_FLAG"]).read() == "clean")


@dg.asset(deps=[dataset], partitions_def=parts)
def adapter(context) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"pid": os.getpid()})


def dask_job() -> dg.JobDefinition:
    from flywheel_assets.dask_executor import dask_executor

    address = os.environ["TEST_DASK_SCHEDULER"]
    defs = dg.Definitions(assets=[dataset, adapter], asset_checks=[dataset_is_clean],
                          jobs=[dg.define_asset_job("train", partitions_def=parts)],
                          executor=dask_executor.configured({"address": address}, name="dask"))
    return defs.resolve_job_def("train")


def test_a_partitioned_run_on_dask_stops_below_a_failed_blocking_check(tmp_path, monkeypatch):
    from distributed import LocalCluster

    from flywheel_assets_tests.scaleout.test_scaleout import _free_port

    flag = tmp_path / "flag"
    port = _free_port()
    # set before the workers start: they rebuild the job from this module with their environment
    monkeypatch.setenv("TEST_DASK_SCHEDULER", f"tcp://127.0.0.1:{port}")
    monkeypatch.setenv("TEST_DATASET_FLAG", str(flag))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, scheduler_port=port, host="127.0.0.1",
                      dashboard_address=None), dg.DagsterInstance.get() as instance:
        for state, adapter_ran in (("clean", True), ("pii found", False)):
            flag.write_text(state)
            with dg.execute_job(dg.reconstructable(dask_job), instance, tags={"dagster/partition": "p1"}) as result:
                succeeded = {e.step_key for e in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
                started = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_START)
                assert result.success is adapter_ran
                assert "dataset" in succeeded and ("adapter" in succeeded) is adapter_ran
                assert ("adapter" in {e.step_key for e in started}) is adapter_ran  # not even started
                assert os.getpid() not in {e.dagster_event.pid for e in started}
