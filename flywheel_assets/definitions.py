"""The one entry point: every Dagster object under defs/, with the executor for this environment."""

from pathlib import Path

import dagster as dg

from flywheel_assets.defs.resources import executor


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    chosen = executor()
    return dg.Definitions.merge(loaded, dg.Definitions(executor=chosen)) if chosen is not None else loaded


def job(name: str) -> dg.JobDefinition:
    """One job by name, for a run whose steps execute in other processes or hosts (dg.execute_job
    rebuilds it there from this module: flywheel.run_job under FLYWHEEL_EXECUTOR=dask)."""
    return defs().resolve_job_def(name)
