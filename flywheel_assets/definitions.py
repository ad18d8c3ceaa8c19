"""The one entry point: every Dagster object under defs/, with the executor for this environment."""

from pathlib import Path

import dagster as dg

from flywheel_assets.defs.resources import get_env


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    if get_env() == "LOCAL":
        # Two cores: one step at a time keeps training and DuckDB from fighting for them.
        executor = dg.multiprocess_executor.configured({"max_concurrent": 1})
        return dg.Definitions.merge(loaded, dg.Definitions(executor=executor))
    return loaded
