"""The Dagster graph as a reviewed diff: asset keys, groups, partitions and dependencies, checks,
jobs with their assets, sensors and schedules, against graph_snapshot.json. A change to the
graph changes the file (FLYWHEEL_UPDATE_SNAPSHOT=1 rewrites it), so a review sees it."""

import json
import os
from pathlib import Path

from flywheel_assets.definitions import defs

SNAPSHOT = Path(__file__).with_name("graph_snapshot.json")


def graph() -> dict:
    repository = defs().get_repository_def()
    asset_graph = repository.asset_graph
    checks: dict = {}
    for check in asset_graph.asset_check_keys:
        checks.setdefault(check.asset_key, []).append(check.name)
    assets = {}
    for key in sorted(asset_graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = asset_graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name, "partitioned": node.partitions_def is not None,
            "deps": sorted(parent.to_user_string() for parent in node.parent_keys),
            "checks": sorted(checks.get(key, [])),
        }
    jobs = {}
    for job in repository.get_all_jobs():
        if job.name.startswith("__"):
            continue
        jobs[job.name] = sorted(key.to_user_string() for key in job.asset_layer.executable_asset_keys) \
            if job.asset_layer else []
    return {
        "assets": assets, "jobs": dict(sorted(jobs.items())),
        "sensors": sorted(sensor.name for sensor in repository.sensor_defs),
        "schedules": {s.name: s.cron_schedule for s in sorted(repository.schedule_defs, key=lambda s: s.name)},
    }


def test_the_graph_is_the_reviewed_one():
    current = graph()
    if os.environ.get("FLYWHEEL_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text()), \
        "the Dagster graph changed: review the diff, then rerun with FLYWHEEL_UPDATE_SNAPSHOT=1"
