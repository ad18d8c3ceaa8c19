"""Heuristic judges against hand-made trajectories with hand-computed values."""

from __future__ import annotations

import math

import polars as pl
import pytest

from flywheel_assets.lib.config import FusionConfig
from flywheel_assets.lib.feedback.judges import INPUT_SCHEMA, OUTPUT_SCHEMA, heuristic_judges

SEARCH = '{"query": "weather in Paris"}'


def call(name="search", arguments=SEARCH, valid=True, success=True):
    result = "ok" if success else "Error: failed"
    return {"turn_index": 2, "name": name, "arguments": arguments, "arguments_valid": valid,
            "result": result, "success": success}


def turn(role, content):
    return {"role": role, "content": content}


def trajectory(trajectory_id="t", *, task_type="qa", tool_calls=(), tools_offered=("search", "calc"),
               final_response="It is sunny.", replies=("It is sunny.",), user_prompt="Weather in Paris?"):
    turns = [turn("system", "You are helpful."), turn("user", user_prompt)]
    turns += [turn("assistant", reply) for reply in replies]
    return {"trajectory_id": trajectory_id, "task_type": task_type, "turns": turns,
            "tool_calls": list(tool_calls), "final_response": final_response,
            "tools_offered": None if tools_offered is None else list(tools_offered)}


def judge(*rows, fusion=None) -> dict[str, dict]:
    scores = heuristic_judges(pl.DataFrame(list(rows), schema=INPUT_SCHEMA), fusion or FusionConfig())
    return {row["trajectory_id"]: row for row in scores.iter_rows(named=True)}


def judge_one(row, fusion=None) -> dict:
    return judge(row, fusion=fusion)[row["trajectory_id"]]


def test_valid_calls_pass_every_judge():
    scores = judge_one(trajectory(tool_calls=[call(), call("calc", '{"expr": "1+1"}')]))
    assert scores == {
        "trajectory_id": "t", "task_type": "qa", "total_chars": 45, "tool_call_validity": 1.0, "tool_success_rate": 1.0,
        "final_answer_present": 1.0, "loop_free": 1.0, "length_ok": 1.0,
        "heuristic_score": 1.0, "failed_judges": "",
    }


@pytest.mark.parametrize(
    ("calls", "tools_offered", "validity"),
    [
        ([call(valid=False), call()], ("search",), 0.5),
        ([call(valid=False), call(), call("calc"), call("calc", "{}")], ("search", "calc"), 0.75),
        ([call(valid=None)], ("search",), 0.0),
        ([call("delete_all")], ("search",), 0.0),
        ([call("delete_all"), call(), call(), call("search", "{}")], ("search",), 0.75),
        ([call("anything")], (), 1.0),
        ([call("anything")], None, 1.0),
        ([call(""), call("  "), call("calc")], (), 1 / 3),
        ([call("anything", valid=False)], (), 0.0),
    ],
    ids=["invalid-json-half", "invalid-json-quarter", "validity-unknown", "not-offered",
         "not-offered-quarter", "nothing-offered", "offered-null", "blank-names", "nothing-offered-invalid"],
)
def test_tool_call_validity(calls, tools_offered, validity):
    scores = judge_one(trajectory(tool_calls=calls, tools_offered=tools_offered))
    assert scores["tool_call_validity"] == pytest.approx(validity)


@pytest.mark.parametrize(
    ("successes", "rate"),
    [([True, True], 1.0), ([True, False, False, None], 0.25), ([False], 0.0)],
)
def test_tool_success_rate(successes, rate):
    calls = [call("search", f'{{"page": {i}}}', success=ok) for i, ok in enumerate(successes)]
    assert judge_one(trajectory(tool_calls=calls))["tool_success_rate"] == rate


def test_no_tool_calls_leaves_tool_judges_null():
    without, null_list = judge(trajectory("empty", tool_calls=[]), {**trajectory("null"), "tool_calls": None}).values()
    for scores in (without, null_list):
        assert scores["tool_call_validity"] is None
        assert scores["tool_success_rate"] is None
        assert scores["heuristic_score"] == 1.0


@pytest.mark.parametrize(("final_response", "present"), [("It is sunny.", 1.0), ("  \n\t", 0.0), ("", 0.0), (None, 0.0)])
def test_final_answer_present(final_response, present):
    assert judge_one(trajectory(final_response=final_response))["final_answer_present"] == present


@pytest.mark.parametrize(
    ("calls", "replies", "loop_free"),
    [
        ([call()] * 3, (), 0.0),
        ([call()] * 2 + [call("calc")], (), 1.0),
        ([call("search", f'{{"page": {i}}}') for i in range(3)], (), 1.0),
        ([call()] * 4, (), 0.0),
        ([], ("Let me check.",) * 3, 0.0),
        ([], ("Let me check.",) * 2 + ("It is sunny.",), 1.0),
        ([], ("",) * 3 + ("  ",) * 3, 1.0),
        ([], ("First.", "Second.", "Third.") + ("",) * 3, 1.0),
    ],
    ids=["three-identical-calls", "two-identical-calls", "same-tool-other-args", "four-identical-calls",
         "three-identical-replies", "two-identical-replies", "blank-replies",
         "blank-replies-among-others"],
)
def test_loop_free(calls, replies, loop_free):
    assert judge_one(trajectory(tool_calls=calls, replies=replies))["loop_free"] == loop_free


def test_loop_repeats_comes_from_config():
    looping = trajectory(tool_calls=[call()] * 2)
    assert judge_one(looping)["loop_free"] == 1.0
    assert judge_one(looping, fusion=FusionConfig(loop_repeats=2))["loop_free"] == 0.0


def test_length_outlier_within_its_task_type():
    # 20 rows: a single outlier can reach |z| = 19 / sqrt(20) = 4.25 > 3 (with 10 rows at most 2.85).
    typical = [trajectory(f"qa{i}", user_prompt="x" * (80 + i)) for i in range(19)]
    huge = trajectory("huge", user_prompt="x" * 100_000)
    # The same length is ordinary among long-form tasks.
    essays = [trajectory(f"essay{i}", task_type="essay", user_prompt="x" * (100_000 + 10 * i)) for i in range(6)]
    scores = judge(*typical, huge, *essays)
    assert scores["huge"]["length_ok"] == 0.0
    assert scores["huge"]["failed_judges"] == "length_ok"
    assert {scores[row["trajectory_id"]]["length_ok"] for row in typical + essays} == {1.0}


def test_length_outlier_threshold_comes_from_config():
    rows = [trajectory(f"qa{i}", user_prompt="x" * (80 + i)) for i in range(19)]
    rows.append(trajectory("huge", user_prompt="x" * 100_000))
    assert judge(*rows, fusion=FusionConfig(length_outlier_z=5.0))["huge"]["length_ok"] == 1.0


def test_length_stats_are_the_populations_bit_for_bit_however_it_is_split_or_ordered():
    import random
    import statistics

    from flywheel_assets.lib.feedback.judges import length_stats

    rng = random.Random(8)
    rows = [{"task_type": rng.choice(["calc", "qa", None]), "total_chars": rng.choice([None, *range(1, 400)])
             if rng.random() < 0.05 else int(rng.lognormvariate(5, 1))} for _ in range(3000)]
    whole = length_stats(pl.DataFrame(rows)).sort("task_type", nulls_last=True)
    for task_type, n, mean, std in whole.iter_rows():
        logs = [math.log1p(row["total_chars"]) for row in rows
                if row["task_type"] == task_type and row["total_chars"] is not None]
        assert n == sum(row["task_type"] == task_type for row in rows)
        assert mean == pytest.approx(statistics.fmean(logs), rel=1e-12)
        assert std == pytest.approx(statistics.stdev(logs), rel=1e-12)
    # a refresh's population: the stored rows counted per length, then the new rows, in another order
    rng.shuffle(rows)
    stored = pl.DataFrame(rows[:2000]).group_by("task_type", "total_chars").agg(n=pl.len().cast(pl.Int64))
    split = pl.concat([stored, pl.DataFrame(rows[2000:]).with_columns(n=pl.lit(1, pl.Int64))], how="diagonal")
    assert length_stats(split).sort("task_type", nulls_last=True).equals(whole)
    assert length_stats(pl.DataFrame(rows[::-1])).sort("task_type", nulls_last=True).equals(whole)


@pytest.mark.parametrize(
    "lengths",
    [[80, 81, 82, 100_000], [100] * 6],
    ids=["fewer-than-five-rows", "zero-std"],
)
def test_length_ok_without_a_distribution(lengths):
    # A low threshold, so that only the missing distribution keeps 100_000 from being an outlier.
    rows = [trajectory(f"r{i}", user_prompt="x" * n) for i, n in enumerate(lengths)]
    scores = judge(*rows, fusion=FusionConfig(length_outlier_z=1.0))
    assert {row["length_ok"] for row in scores.values()} == {1.0}


@pytest.mark.parametrize(
    ("row", "heuristic_score"),
    [
        # (0.5 + 0.25 + 1 + 1 + 1) / 5 = 0.75 -> 2 * 0.75 - 1
        (trajectory(tool_calls=[call(valid=False, success=False), call("calc", "{}", success=False),
                                call("search", "{}", success=False), call("search", "[]", valid=False)]), 0.5),
        # no calls: (0 + 1 + 1) / 3 -> 2 * 2/3 - 1
        (trajectory(final_response=""), 1 / 3),
        # (0 + 0 + 0 + 0 + 1) / 5 -> -0.6
        (trajectory(tool_calls=[call("rm", valid=False, success=False)] * 3, final_response=None), -0.6),
    ],
)
def test_heuristic_score_arithmetic(row, heuristic_score):
    assert judge_one(row)["heuristic_score"] == pytest.approx(heuristic_score)


@pytest.mark.parametrize(
    ("row", "failed"),
    [
        (trajectory(tool_calls=[call("rm", valid=False, success=True)] * 3, final_response=" "),
         "tool_call_validity,final_answer_present,loop_free"),
        (trajectory(tool_calls=[call(valid=False, success=False), call(success=False)]), "tool_success_rate"),
        (trajectory(tool_calls=[call(valid=False), call("calc")]), ""),  # 0.5 is not a failure
    ],
)
def test_failed_judges(row, failed):
    assert judge_one(row)["failed_judges"] == failed


def test_one_row_per_trajectory_in_input_order():
    ids = [f"t{i}" for i in (3, 1, 2, 0)]
    rows = [trajectory(i, tool_calls=[call()] if i != "t1" else []) for i in ids]
    scores = heuristic_judges(pl.DataFrame(rows, schema=INPUT_SCHEMA), FusionConfig())
    assert scores["trajectory_id"].to_list() == ids
    assert scores.schema == OUTPUT_SCHEMA


def test_empty_input():
    scores = heuristic_judges(pl.DataFrame(schema=INPUT_SCHEMA), FusionConfig())
    assert scores.height == 0
    assert scores.schema == OUTPUT_SCHEMA
    assert dict(scores.schema) == {
        "trajectory_id": pl.String, "task_type": pl.String, "total_chars": pl.Int64, "tool_call_validity": pl.Float64, "tool_success_rate": pl.Float64,
        "final_answer_present": pl.Float64, "loop_free": pl.Float64, "length_ok": pl.Float64,
        "heuristic_score": pl.Float64, "failed_judges": pl.String,
    }
