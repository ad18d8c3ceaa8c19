"""Every table in the catalog: a promotion by hand, a CLI ingest and a run's side tables are
materializations in the Dagster instance, with what changed."""

import dagster as dg
import pytest
from typer.testing import CliRunner

from flywheel_assets.cli import app
from flywheel_assets.definitions import defs
from flywheel_assets_tests.cli.test_cli import registry, trajectory  # noqa: F401  (the registry fixture)
from flywheel_assets_tests.helpers import write_lines


@pytest.fixture
def instance(home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.get() as instance:
        yield instance


def _latest(instance, key: str):
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return None if event is None else event.asset_materialization


def test_a_promotion_by_hand_and_a_cli_ingest_show_in_the_catalog(registry, instance, tmp_path):  # noqa: F811
    assert _latest(instance, "model_registry") is None
    result = CliRunner().invoke(app, ["promote", "cycle-0001-lora", "--to", "canary", "--reason", "try it"])
    assert result.exit_code == 0, result.output
    change = _latest(instance, "model_registry")
    assert change is not None and "cycle-0001-lora | canary" in change.metadata["changes"].value
    assert "try it" in change.metadata["changes"].value

    source = write_lines(tmp_path / "by-hand.jsonl", [trajectory("t-hand")])
    assert CliRunner().invoke(app, ["ingest", str(source)]).exit_code == 0
    assert _latest(instance, "trajectories").metadata["rows_new"].value == 1


def test_the_tables_a_step_writes_beside_its_asset_are_assets_too():
    keys = {key.to_user_string() for key in defs().get_repository_def().asset_graph.get_all_asset_keys()}
    assert {"model_registry", "ab_results", "offline_evaluations", "dataset_manifests"} <= keys


def test_without_an_instance_the_change_still_happens(registry, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "not-made-yet"))  # what make exports on a fresh clone
    result = CliRunner().invoke(app, ["promote", "cycle-0001-lora", "--to", "canary", "--reason", "try it"])
    assert result.exit_code == 0, result.output
    assert registry.get("cycle-0001-lora")["status"] == "canary"
