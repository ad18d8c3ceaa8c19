"""Declarative automation: velocity, loop health and the DuckDB catalog are requested once after an
upstream table changes (an ingest's trajectory_scores, a cycle's adapter), not again until the next
change, and a cycle partition that never materialized does not hold them back."""

import dagster as dg

from flywheel_assets.definitions import defs

OBSERVABILITY = {dg.AssetKey(name) for name in ("flywheel_velocity", "loop_health", "duckdb_catalog")}


def _requested(instance, cursor=None, definitions=None):
    result = dg.evaluate_automation_conditions(defs=definitions, instance=instance, cursor=cursor,
                                               asset_selection=dg.AssetSelection.groups("observability"))
    return {key for key in OBSERVABILITY if result.get_num_requested(key)}, result.cursor


def _materialized(instance, *names, partition=None):
    for name in names:
        instance.report_runless_asset_event(dg.AssetMaterialization(name, partition=partition))


def test_refreshed_once_after_an_upstream_change_even_with_cycles_missing(home):
    instance, definitions = dg.DagsterInstance.ephemeral(), defs()  # one: the cursor is the definitions'
    instance.add_dynamic_partitions("cycle", ["cycle-0001", "cycle-0002"])
    requested, cursor = _requested(instance, None, definitions)
    assert requested == set()  # nothing changed upstream yet

    _materialized(instance, "trajectory_scores")  # an ingest
    requested, cursor = _requested(instance, cursor, definitions)
    assert requested == OBSERVABILITY
    _materialized(instance, "flywheel_velocity", "loop_health", "duckdb_catalog")
    requested, cursor = _requested(instance, cursor, definitions)
    assert requested == set()  # handled: not again until the next change

    # cycle-0001 trains (cycle-0002 never does): the adapter is not a catalog table
    _materialized(instance, "lora_adapter", partition="cycle-0001")
    requested, cursor = _requested(instance, cursor, definitions)
    assert requested == {dg.AssetKey("flywheel_velocity"), dg.AssetKey("loop_health")}


def test_the_sensor_that_evaluates_it_runs_from_the_start():
    sensor = defs().resolve_sensor_def("observability_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
