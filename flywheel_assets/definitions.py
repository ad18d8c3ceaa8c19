"""The one entry point: every Dagster object under defs/, with the executor for this environment."""

from pathlib import Path

import dagster as dg

from flywheel_assets.defs.resources import get_env


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    if get_env() == "LOCAL":
        # Two cores: one step at a time keeps training and DuckDB from fighting for them, and in
        # the run's own process: a process per step cost 8-10 s of start-up for ~1 s of work.
        return dg.Definitions.merge(loaded, dg.Definitions(executor=dg.in_process_executor))
    return loaded
