"""The run launcher the local dagster.yaml names: Dagster's default one, plus a worker health
check, so that run monitoring marks a run FAILURE once the process running it is gone.

Dagster 1.13's DefaultRunLauncher cannot tell run monitoring whether a run's worker lives
(supports_check_run_worker_health is False), and its code server notices a dead worker only
while that code server lives. A run whose processes were all killed (kill -9 of `make dev`,
the OOM killer) therefore stayed STARTED for ever, and with max_concurrent_runs: 1 every later
run queued behind it. Every run logs its worker's pid in an engine event ("Started process for
run (pid: N)", or the in-process executor's "Executing steps in process"); run monitoring, whose
first pass runs as the daemon starts, now asks whether that process still exists.

Local only: a pid names a process on this machine. A cluster's dagster.yaml names a launcher
with its own health check (Kubernetes, ECS, Docker).
"""

from __future__ import annotations

import psutil
from dagster import DagsterEventType, DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

# create_time and event timestamps are both wall-clock seconds, the former from clock ticks since
# boot, so a step of the wall clock (NTP, a VM resuming) moves one and not the other. Calling a live
# worker dead would start the next run beside it; calling a reused pid alive only waits for the
# run's own timeout. So the slack is generous: a pid is reused only after its process died, and
# within ten minutes of being logged that is rare.
CLOCK_SLACK_S = 600.0


class LocalRunLauncher(DefaultRunLauncher):
    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        logged = worker_pid(self._instance, run.run_id)
        if logged is None:
            # nothing to check yet (the in-process executor logs its pid just after RUN_START): left alone
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no worker pid logged yet")
        pid, logged_at = logged
        if process_alive(pid, logged_at):
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"worker process {pid} is alive")
        return CheckRunHealthResult(WorkerStatus.FAILED, f"worker process {pid} is gone (killed, or its machine "
                                                         "restarted) and the run never finished")


def worker_pid(instance, run_id: str) -> tuple[int, float] | None:
    """The pid the run's worker logged first, and when: later pids are its step processes, if any."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT).records
    for record in records:
        data = record.event_log_entry.dagster_event.engine_event_data
        pid = data.metadata.get("pid") if data and data.metadata else None
        if pid is not None:
            return int(pid.value), record.event_log_entry.timestamp
    return None


def process_alive(pid: int, logged_at: float) -> bool:
    """A process with this pid runs and is the one that logged it (it existed by then: a pid is
    reused only after its process died)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= logged_at + CLOCK_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process holds the pid: it exists, which is all we can tell
        return True
