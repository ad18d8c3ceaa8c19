"""The closed loop end to end, small: simulated users → sensors → a cycle → gate → canary →
A/B test → promotion, through real Dagster runs (flywheel_assets/flywheel.py, `make demo`)."""

from __future__ import annotations

import json

from flywheel_assets import flywheel
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import AB_RESULTS, OFFLINE_EVALUATIONS, TRAJECTORIES

SMALL_LOOP = {  # the embedded model as make demo builds it, pretrained half as long; one cycle, a smaller
    # population and held-out set (the suite's longest test: ~6.5 min with the demo's 400 pretraining steps)
    "base_model": {"pretrain_steps": 200},
    "evaluation": {"tasks": 200},
    "corrections": {"daily_budget": 200},
    "ab": {"min_users_per_arm": 60, "planned_users": 200, "max_days": 6},
    "rollout": {"canary_share": 0.1, "treatment_share": 0.5, "canary_min_users": 10},
    "trigger": {"phase2": {"min_days_between_training": 1, "min_new_trajectories": 100,
                           "min_high_quality_rate": 0.25}},
}


def test_the_loop_promotes_a_better_candidate_by_its_ab_test(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_LOOP))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert flywheel.main(["--days", "8", "--users", "200", "--cycles", "1", "--no-arms"]) == 0

    config = load_config()
    lake = Lake(config)
    decisions = [r for r in lake.read(AB_RESULTS).to_pylist() if r["stage"] == "treatment"]
    shipped = [r for r in decisions if r["outcome"] == "SHIP"]
    assert shipped, [(r["outcome"], r["reason"]) for r in decisions]
    assert shipped[0]["effect_low"] > 0  # the anytime-valid interval excludes no effect

    registry = ModelRegistry(lake)
    champion = registry.champion()
    assert champion["version"] == shipped[0]["treatment"]
    path = [h["status"] for h in registry.history(champion["version"])]
    assert path[:1] == ["candidate"] and "canary" in path and "treatment" in path and path[-1] == "champion"

    overall = {r["role"]: r for r in lake.read(OFFLINE_EVALUATIONS, filter_sql="scope = 'overall'").to_pylist()
               if r["cycle"] == champion["cycle"]}
    assert overall["candidate"]["success"] > overall["champion"]["success"]  # held-out success rose
    assert overall["candidate"]["gate_passed"]

    origins = {r["origin"] for r in lake.read(TRAJECTORIES, columns=["origin"]).to_pylist()}
    assert {"usage", "correction", "golden", "synthetic"} <= origins
    printed = capsys.readouterr().out
    assert f"| {champion['cycle']} |" in printed and "SHIP" in printed
