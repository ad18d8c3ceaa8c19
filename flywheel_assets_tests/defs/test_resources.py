"""The resource: settings parsed once per run, the lake's root and credentials and the LLM
judge's key as resource fields (from environment variables, named in the UI, never shown)."""

import dagster as dg

from flywheel_assets.defs import resources as resources_module
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback
from flywheel_assets.defs.resources import FlywheelResource, resources


def test_the_settings_are_parsed_once_per_run(home, monkeypatch):
    calls = []
    real = resources_module.load_config
    monkeypatch.setattr(resources_module, "load_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = dg.materialize([session_feedback, judge_scores], resources={"flywheel": FlywheelResource(home=str(home))})
    assert result.success and len(calls) == 1


def test_settings_from_the_environment_are_env_vars_and_reach_the_lake(home, monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_LLM_JUDGE_API_KEY", "sk-secret")
    monkeypatch.setenv("FLYWHEEL_LAKE_URI", str(tmp_path / "elsewhere"))
    flywheel = resources().resources["flywheel"]
    assert isinstance(flywheel.llm_judge_api_key, dg.EnvVar) and flywheel.llm_judge_api_key.env_var_name == \
        "FLYWHEEL_LLM_JUDGE_API_KEY"
    configured = FlywheelResource(home=str(home), lake_uri=str(tmp_path / "lake2"), llm_judge_api_key="sk-x")
    assert configured.lake().root == str(tmp_path / "lake2")  # the field wins over the environment
    assert configured.config().llm_judge.api_key == "sk-x"
