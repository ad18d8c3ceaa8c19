"""The observability assets load with the rest and refresh as the loop turns."""

import dagster as dg

from flywheel_assets.definitions import defs

OBSERVABILITY = {"flywheel_velocity", "loop_health"}


def _assets(job: dg.JobDefinition) -> set[str]:
    return {key.to_user_string() for key in job.asset_layer.executable_asset_keys}


def test_observability_group_and_the_jobs_that_refresh_it():
    loaded = defs()
    graph = loaded.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert {groups[name] for name in OBSERVABILITY} == {"observability"}
    for name in ("cycle_job", "ab_report_job", "daily_refresh_job"):
        assert OBSERVABILITY <= _assets(loaded.resolve_job_def(name)), name
    assert not OBSERVABILITY & _assets(loaded.resolve_job_def("ingest_job"))  # landing files stay a lean run
    assert loaded.resolve_schedule_def("daily_refresh").job_name == "daily_refresh_job"
    assert {"bronze_ingest", "curated_trajectories"} <= {
        node for node in loaded.resolve_job_def("daily_refresh_job").graph.node_dict}
