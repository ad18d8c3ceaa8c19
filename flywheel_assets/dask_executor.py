"""Every step of a run as a task on a Dask cluster (FLYWHEEL_EXECUTOR=dask; README: Scaling out).

dagster-dask's own executor does the work on the worker (`query_on_dask_worker`: rebuild the job,
plan the one step, execute it against the instance). Two things in how it submits the task are
ours instead:
- the step's arguments travel as one pickled payload: Dask 2025+ walks every tuple among a task's
  arguments, and a partitioned run's known state holds Dagster records, which refuse iteration —
  every `cycle_job` run failed before its first step;
- each task's key carries the run id: dagster-dask names it `<job>.<step>`, so two runs of one job
  at the same time share a key and the second is answered with the first's result
  (dagster-io/dagster#21418);
- a task that fails as a task (a worker killed, the job not loadable there) fails the run at once
  and cancels the others, with the reason; Dask does not run it again (retries=0, though the
  scheduler re-runs a task whose worker died under it, `distributed.scheduler.allowed-failures`:
  set it to 0 for a cluster of flywheel steps);
- a step is submitted only once the steps it depends on succeeded: dagster-dask submits them all
  at once, and a step whose upstream failed then ran anyway — lora_adapter trained although the
  blocking PII check on its dataset had failed.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import dagster as dg
from dagster._core.execution.retries import RetryMode

# dagster-dask, distributed and cloudpickle come with the `scaleout` extra: imported when a run uses them


def run_step(dependencies: list, payload: bytes) -> bytes:
    """On a worker: the step's events (dagster-dask's function; `dependencies` unused), pickled: Dask's
    sizeof cannot measure Dagster records and warned three times a step (dagster-io/dagster#33771)."""
    from dagster_dask.executor import query_on_dask_worker

    return pickle.dumps(list(query_on_dask_worker(dependencies, *pickle.loads(payload))))


class DaskExecutor(dg.Executor):
    def __init__(self, address: str):
        self.address = address

    @property
    def retries(self):
        return RetryMode.DISABLED

    def execute(self, plan_context, execution_plan) -> Iterator[dg.DagsterEvent]:
        import cloudpickle
        from dagster_dask.executor import get_dask_resource_requirements
        from distributed import Client, as_completed

        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("the dask executor needs a persistent instance (DAGSTER_HOME)")
        run = plan_context.dagster_run
        shared = (plan_context.reconstructable_job, run, plan_context.run_config)
        instance_ref = plan_context.instance.get_ref()
        plan_context.log.info(f"executing steps on the Dask cluster at {self.address}")
        with Client(self.address) as client:
            stopped: dict[str, str] = {}  # step key -> why it did not succeed (its own failure, or upstream's)
            for level in execution_plan.get_steps_to_execute_by_level():
                futures = {}
                for step in level:
                    upstream = {key for step_input in step.step_inputs for key in step_input.dependency_keys}
                    if blocked := sorted(upstream & stopped.keys()):
                        stopped[step.key] = f"upstream {', '.join(blocked)} did not succeed"
                        plan_context.log.warning(f"step {step.key} not run: {stopped[step.key]}")
                        continue
                    payload = cloudpickle.dumps((*shared, [step.key], instance_ref, execution_plan.known_state))
                    futures[client.submit(run_step, [], payload, key=f"{run.run_id}.{step.key}", retries=0,
                                          resources=get_dask_resource_requirements(step.tags), pure=False)] = step.key
                # a level at a time: a step starts only once every step it depends on succeeded, as in
                # process (a failed blocking check keeps lora_adapter from training on what it caught)
                for future, result in as_completed(list(futures), with_results=True, raise_errors=False):
                    if future.status != "finished":  # the task itself failed: a worker died, the job did not load
                        client.cancel(list(futures))
                        raise RuntimeError(
                            f"step {futures[future]} could not run on the Dask cluster: {result!r}") from None
                    events = pickle.loads(result)
                    if not any(event.event_type_value == "STEP_SUCCESS" for event in events):
                        stopped[futures[future]] = "failed"
                    yield from events


@dg.executor(name="dask", config_schema={"address": dg.Field(str, description="the scheduler, tcp://host:8786")},
             requirements=dg.multiple_process_executor_requirements())
def dask_executor(init_context) -> DaskExecutor:
    return DaskExecutor(init_context.executor_config["address"])
