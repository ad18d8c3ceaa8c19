"""The resources: the profile parsed once per run; the lake, the model store and the LLM judge's
and teacher's endpoints as typed resources whose settings come from environment variables
(named in the UI, never shown) and reach the stores."""

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from flywheel_assets.defs import resources as resources_module
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback
from flywheel_assets.defs.resources import (
    EndpointResource, FlywheelResource, LakeResource, ModelStoreResource, resources,
)


def test_the_settings_are_parsed_once_per_run(home, monkeypatch):
    calls = []
    real = resources_module.load_config
    monkeypatch.setattr(resources_module, "load_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = dg.materialize([session_feedback, judge_scores], resources={"flywheel": FlywheelResource(home=str(home))})
    assert result.success and len(calls) == 1


def test_each_store_is_its_own_resource_with_its_variables_as_env_vars(home, monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_LLM_JUDGE_API_KEY", "sk-secret")
    monkeypatch.setenv("FLYWHEEL_TEACHER_URL", "http://teacher.example/v1")
    monkeypatch.setenv("FLYWHEEL_LAKE_URI", str(tmp_path / "elsewhere"))
    defined = resources().resources
    assert {"flywheel", "lake", "model_store", "llm_judge", "teacher", "duckdb", "catalog"} <= set(defined)
    for resource, field, variable in ((defined["llm_judge"], "api_key", "FLYWHEEL_LLM_JUDGE_API_KEY"),
                                      (defined["teacher"], "url", "FLYWHEEL_TEACHER_URL"),
                                      (defined["lake"], "uri", "FLYWHEEL_LAKE_URI")):
        value = getattr(resource, field)
        assert isinstance(value, dg.EnvVar) and value.env_var_name == variable
    assert defined["model_store"].root is None and defined["llm_judge"].url is None  # unset: the default
    assert defined["flywheel"].lake_store is defined["lake"]  # one instance: the profile's stores
    assert defined["flywheel"].engine is defined["duckdb"] and defined["duckdb"].database == ":memory:"


def test_the_assets_sql_runs_on_the_duckdb_resource_with_its_settings(home):
    flywheel = FlywheelResource(home=str(home), engine=DuckDBResource(database=":memory:",
                                                                      connection_config={"threads": 1}))
    with flywheel.sql() as con:
        assert con.sql("SELECT current_setting('threads')").fetchone() == (1,)
    with pytest.raises(duckdb.ConnectionException):
        con.sql("SELECT 1")  # closed after


def test_a_run_reads_the_variables_when_it_starts_and_the_fields_reach_the_stores(home, monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_LAKE_URI", str(tmp_path / "elsewhere"))
    defined = resources().resources
    result = dg.materialize([session_feedback], resources={key: defined[key] for key in ("flywheel", "lake")})
    assert result.success and (tmp_path / "elsewhere" / "silver" / "session_feedback" / "_delta_log").is_dir()
    assert not (home / "lake" / "silver" / "session_feedback").exists()

    monkeypatch.delenv("FLYWHEEL_LAKE_URI")
    configured = FlywheelResource(
        home=str(home), lake_store=LakeResource(uri=str(tmp_path / "lake2")),
        model_store=ModelStoreResource(root=str(tmp_path / "models2")),
        llm_judge=EndpointResource(api_key="sk-x"), teacher=EndpointResource(url="http://t/v1", model="qwen"))
    assert configured.lake().root == str(tmp_path / "lake2")
    config = configured.config()
    assert config.llm_judge.api_key == "sk-x" and config.llm_judge.model == "gpt-4o-mini"  # the rest kept
    assert (config.teacher.url, config.teacher.model) == ("http://t/v1", "qwen")
    assert config.models == tmp_path / "models2"
    assert FlywheelResource(home=str(home)).config().models == home / "models"


def test_outside_a_run_the_variables_are_read_too(home, monkeypatch, tmp_path):
    """The demo driver and the CLI use the resources outside a run, where Dagster has not resolved
    the EnvVars: the values must still be the variables', not their names."""
    monkeypatch.setenv("FLYWHEEL_LAKE_URI", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("FLYWHEEL_LLM_JUDGE_URL", "http://judge.example/v1")
    monkeypatch.setenv("FLYWHEEL_MODELS_DIR", str(tmp_path / "store"))
    flywheel = resources().resources["flywheel"]
    assert flywheel.lake().root == str(tmp_path / "elsewhere")
    config = flywheel.config()
    assert config.llm_judge.url == "http://judge.example/v1" and config.models == tmp_path / "store"


def test_a_model_store_outside_home_is_kept_as_absolute_paths(home, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")  # beside home, not in it
    config = FlywheelResource(home=str(home), model_store=ModelStoreResource(root=str(store))).config()
    outside, inside = config.models / "base-v0", home / "models" / "base-v0"
    assert config.stored_path(outside) == str(outside) and config.home / config.stored_path(outside) == outside
    assert config.stored_path(inside) == "models/base-v0"
