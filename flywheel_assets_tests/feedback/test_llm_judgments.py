"""The LLM judge grades each trajectory once, newest first within a budget, on scrubbed text."""

from __future__ import annotations

import dagster as dg

from flywheel_assets_tests.helpers import completion, openai_stand_in, write_lines
from flywheel_assets_tests.ingest.test_ingest import OPENAI
from flywheel_assets.defs.feedback.assets import judge_scores, llm_judgments
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.tables import JUDGE_SCORES, LLM_JUDGMENTS


def trajectory(i: int, day: int, text: str = "Capital of Peru?") -> dict:
    return {**OPENAI, "trajectory_id": f"t{i}", "created_at": f"2026-11-{day:02d}T10:00:00Z",
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Lima."}]}


def test_each_trajectory_is_judged_once_newest_first_on_scrubbed_text(home, config, lake, monkeypatch):
    write_lines(config.landing / "trajectories" / "a.jsonl", [
        trajectory(1, 10), trajectory(2, 20, "Mail jane.doe@example.com the capital of Peru"), trajectory(3, 15)])
    ingest_landing(config, lake, log=lambda _: None)
    with openai_stand_in(default=(200, completion({"score": 10, "reason": "right"}))) as server:
        monkeypatch.setenv("FLYWHEEL_LLM_JUDGE_URL", server.url)
        monkeypatch.setenv("FLYWHEEL_CONFIG", str(_config_file(home, {"llm_judge": {"max_trajectories_per_run": 2}})))
        resources = {"flywheel": FlywheelResource(home=str(home))}

        def run():
            assert dg.materialize([llm_judgments, judge_scores], resources=resources).success

        run()
        asked = [request["body"]["messages"][1]["content"] for request in server.requests]
        assert len(asked) == 2 and "Mail" in asked[0] and "jane.doe@example.com" not in asked[0]
        graded = {r["trajectory_id"]: r for r in lake.read(LLM_JUDGMENTS).to_pylist()}
        assert set(graded) == {"t2", "t3"} and graded["t2"]["pii_redacted"] == 1  # the two newest
        run()
        assert len(server.requests) == 3 and set(lake.read(LLM_JUDGMENTS).column("trajectory_id").to_pylist()) == {
            "t1", "t2", "t3"}
        run()
        assert len(server.requests) == 3  # nothing left to judge: no request
    scores = {r["trajectory_id"]: r for r in lake.read(JUDGE_SCORES).to_pylist()}
    assert all(scores[t]["llm_score"] == 1.0 for t in ("t1", "t2", "t3"))
    weight = config.fusion.llm_judge_weight
    t1 = scores["t1"]
    assert abs(t1["judge_score"] - ((1 - weight) * t1["heuristic_score"] + weight)) < 1e-9


def test_a_failed_grade_is_tried_again_by_the_next_run(home, config, lake, monkeypatch):
    write_lines(config.landing / "trajectories" / "a.jsonl", [trajectory(1, 10)])
    ingest_landing(config, lake, log=lambda _: None)
    with openai_stand_in(default=(200, completion({"score": 1, "reason": "wrong"}))) as server:
        server.reply(completion({"score": "eleven"}))  # unusable: not stored
        monkeypatch.setenv("FLYWHEEL_LLM_JUDGE_URL", server.url)
        resources = {"flywheel": FlywheelResource(home=str(home))}
        assert dg.materialize([llm_judgments], resources=resources).success
        assert lake.row_count(LLM_JUDGMENTS) == 0
        assert dg.materialize([llm_judgments], resources=resources).success
    assert lake.read(LLM_JUDGMENTS).column("llm_score").to_pylist() == [-1.0]


def _config_file(home, settings: dict):
    import json

    path = home / "flywheel.json"
    path.write_text(json.dumps(settings))
    return path
