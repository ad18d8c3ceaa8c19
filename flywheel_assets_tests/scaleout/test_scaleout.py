"""The loop on production engines, each started here and stopped after: the Dagster instance
(runs, event log, schedules) on PostgreSQL, the lake on S3-compatible object storage (moto's
server) and every step of every run on a Dask cluster (a scheduler and two worker processes).
One whole cycle — simulated users, ingest, scoring, curation, training, gate, canary, A/B test,
promotion — then the same checks as the local loop test.

`make test-scaleout` installs what it needs (Debian's postgresql, the `scaleout` extra:
dagster-postgres, dagster-dask) and runs this module; `make test` skips it (FLYWHEEL_SCALEOUT unset)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("FLYWHEEL_SCALEOUT"),
                                reason="scale-out engines: run `make test-scaleout`")


def _binary(name: str) -> str:
    found = shutil.which(name) or next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"{name} not found: `make test-scaleout` installs Debian's postgresql")
    return found


def _as_postgres(args: list[str]) -> list[str]:
    """Postgres refuses to run as root: as root, run it as the postgres user Debian's package made."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    # not under pytest's tmp folder: as root that is mode 700, and the server runs as postgres
    data = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    data.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([_binary("initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "flywheel"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([_binary("pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "start",
                                 "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1"]),
                   check=True, capture_output=True)
    try:
        # psycopg2 named: SQLAlchemy 2.1 takes postgresql:// for psycopg 3, and dagster-postgres ships psycopg2
        yield f"postgresql+psycopg2://flywheel@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([_binary("pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def dask_cluster(address: str, logs: Path, workers: int = 2) -> Iterator[subprocess.Popen]:
    """A Dask scheduler at `address` and `workers` worker processes (one thread each), as a deployment
    runs them (`dask scheduler`, `dask worker`), with this process's environment: FLYWHEEL_* (the
    executor's settings included: a worker rebuilds the job) and DAGSTER_HOME."""
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler = subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                  "--no-dashboard"], stdout=(logs / "scheduler.log").open("w"), stderr=subprocess.STDOUT)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", str(workers),
                               "--nthreads", "1", "--memory-limit", "0", "--no-dashboard"],
                              stdout=(logs / "workers.log").open("w"), stderr=subprocess.STDOUT)
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield worker
    finally:
        for process in (worker, scheduler):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


from flywheel_assets_tests.storage.s3_server import BUCKET, s3  # noqa: E402,F401  (the moto fixture)


def test_one_cycle_on_postgres_object_storage_and_dask(postgres, s3, tmp_path, monkeypatch, capsys):
    import dagster as dg

    from flywheel_assets import flywheel
    from flywheel_assets.lib.config import load_config
    from flywheel_assets.lib.experiments.registry import ModelRegistry
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.tables import AB_RESULTS, SESSION_EVENTS, TRAJECTORIES
    from flywheel_assets_tests.test_flywheel_loop import SMALL_LOOP

    client, options = s3
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {postgres}\ntelemetry:\n  enabled: false\n")
    (tmp_path / "config.json").write_text(json.dumps(SMALL_LOOP))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("FLYWHEEL_LAKE_URI", f"s3://{BUCKET}/scaleout")
    monkeypatch.setenv("FLYWHEEL_STORAGE_OPTIONS", options)
    # models, datasets and reports in the bucket too; and a landing bucket an agent writes to directly
    monkeypatch.setenv("FLYWHEEL_ARTIFACTS_URI", f"s3://{BUCKET}/scaleout-artifacts")
    monkeypatch.setenv("FLYWHEEL_ARTIFACTS_STORAGE_OPTIONS", options)
    monkeypatch.setenv("FLYWHEEL_LANDING_URI", f"s3://{BUCKET}/scaleout-landing")
    monkeypatch.setenv("FLYWHEEL_LANDING_STORAGE_OPTIONS", options)
    client.put_object(Bucket=BUCKET, Key="scaleout-landing/events/agent/part-0001.jsonl", Body=json.dumps({
        "event_id": "from-the-bucket", "session_id": "s-bucket", "user_id": "u-bucket",
        "event_type": "session_continued", "ts": "2026-11-01T10:00:00Z"}).encode() + b"\n")
    monkeypatch.setenv("FLYWHEEL_EXECUTOR", "dask")
    monkeypatch.setenv("FLYWHEEL_DASK_SCHEDULER", f"tcp://127.0.0.1:{_free_port()}")
    with dask_cluster(os.environ["FLYWHEEL_DASK_SCHEDULER"], tmp_path) as workers:
        started = time.monotonic()
        assert flywheel.main(["--days", "8", "--users", "200", "--cycles", "1", "--no-arms"]) == 0
        print(f"one cycle on Postgres + S3 + Dask: {time.monotonic() - started:.0f} s")
        import psutil

        worker_pids = {p.pid for p in psutil.Process(workers.pid).children(recursive=True)}

    lake = Lake(load_config())
    assert lake.root.startswith("s3://") and not (tmp_path / "home" / "lake").exists()
    shipped = [r for r in lake.read(AB_RESULTS).to_pylist() if r["stage"] == "treatment" and r["outcome"] == "SHIP"]
    assert shipped and ModelRegistry(lake).champion()["version"] == shipped[0]["treatment"]
    assert lake.row_count(TRAJECTORIES) > 0
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="scaleout/bronze/trajectories/")["Contents"]]
    assert any(k.endswith(".parquet") for k in keys)
    # the landing bucket's object was ingested; the adapter, its dataset and the reports are in the bucket
    assert lake.read(SESSION_EVENTS, filter_sql="event_id = 'from-the-bucket'").num_rows == 1
    stored = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="scaleout-artifacts/")["Contents"]]
    assert {"scaleout-artifacts/models/cycle-0001-lora/.flywheel-complete.json",
            "scaleout-artifacts/datasets/cycle-0001/train.jsonl"} <= set(stored), stored
    assert any(k.startswith("scaleout-artifacts/reports/") for k in stored)

    # every run, its events and the cycle partitions are in Postgres: a new instance over the same
    # database (another process, another host) sees them
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs = instance.get_runs()
        assert len(runs) >= 5 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs
                                      if r.job_name == "cycle_job")
        assert instance.get_dynamic_partitions("cycle") == ["cycle-0001"]
        assert instance.get_latest_materialization_event(dg.AssetKey("lora_adapter")) is not None
        # every step of every run executed on a Dask worker, none in this (the orchestrating) process
        step_pids = {event.dagster_event.pid for run in runs for event in instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.STEP_START)}
        trained = next(r for r in runs if r.job_name == "cycle_job")
        assert step_pids and step_pids <= worker_pids and os.getpid() not in step_pids
        assert any(e.step_key == "lora_adapter" for e in instance.all_logs(
            trained.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS))
