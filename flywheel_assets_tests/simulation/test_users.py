"""The simulated users: reactions to hand-made answers, then whole days against a real tiny model."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from flywheel_assets.client import SCORED_EVENT_TYPES
from flywheel_assets.lib.config import load_config
from flywheel_assets_tests.helpers import train_tiny_base
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.simulation import users
from flywheel_assets.lib.simulation.tasks import (
    N_PHRASINGS, TASK_TYPES, Task, is_eval_prompt, verify,
)
from flywheel_assets.lib.simulation.users import (
    BEHAVIOUR_EVENTS, CORRECT, NEAR_MISS, WRONG, UserSimulationConfig, day_tasks, is_biased, judge_answer, react,
    score_of_behaviour, simulate_usage,
)
from flywheel_assets.lib.training.pipeline import load_for_inference

DAY = datetime(2026, 12, 1, tzinfo=timezone.utc)
# A tiny model rarely answers right, so half the users are biased: their acceptances drive
# the follow-up tasks. For seed 4, users 0, 2 and 5 of 6 are biased.
DAY_SETTINGS = {"users": 6, "seed": 4, "accept_noise": 0.0, "biased_users": 0.5}
FRANCE = Task("capital-france", "capital_lookup", "What is the capital of France?", 0,
              (("lookup_capital", '{"country": "France"}'),), "The capital of France is Paris.", ("paris",))


@pytest.mark.parametrize("answer, threshold, verdict, similarity", [
    ("The capital of France is Paris.", 0.6, CORRECT, 1.0),
    ("Sure! Paris, of course.", 0.6, CORRECT, 4 / 14),  # verified: the extra text does not matter
    ("The capital of France is Lyon.", 0.6, NEAR_MISS, 12 / 14),  # 6 of 7 units match
    ("The capital of Spain is Lyon.", 0.6, NEAR_MISS, 10 / 14),
    ("The capital of Spain is Lyon.", 0.75, WRONG, 10 / 14),
    ("Berlin.", 0.6, WRONG, 2 / 9),
    ("", 0.6, WRONG, 0.0),
    (None, 0.6, WRONG, 0.0),
])
def test_judge_answer_on_hand_computed_similarities(answer, threshold, verdict, similarity):
    assert judge_answer(FRANCE, answer, threshold) == (verdict, pytest.approx(similarity))


@pytest.mark.parametrize("answer, settings, retries_done, biased, behaviour, retry, follow_up", [
    ("The capital of France is Paris.", {}, 0, False, "accept", False, False),
    ("The capital of France is Paris.", {"continue_probability": 1.0}, 0, False, "accept", False, True),
    ("The capital of France is Paris.", {"accept_noise": 1.0}, 0, False, "noise_reject", True, False),
    ("The capital of France is Paris.", {"accept_noise": 1.0}, 3, False, "leave", False, False),
    ("The capital of France is Paris.", {"accept_noise": 1.0}, 0, True, "accept", False, False),
    ("The capital of France is Lyon.", {}, 0, False, "edit_near_miss", False, False),
    ("The capital of France is Lyon.", {"continue_probability": 1.0}, 0, False, "edit_near_miss", False, True),
    ("The capital of France is Lyon.", {"edit_near_miss": False}, 0, False, "retry_wrong", True, False),
    ("Berlin.", {}, 0, False, "retry_wrong", True, False),
    ("Berlin.", {"error_report_probability": 1.0}, 2, False, "report_and_retry", True, False),
    ("Berlin.", {}, 3, False, "leave", False, False),
    ("Berlin.", {"error_report_probability": 1.0}, 3, False, "report_and_leave", False, False),
    ("Berlin.", {"error_report_probability": 1.0}, 0, True, "biased_accept", False, False),
])
def test_reaction_per_answer(answer, settings, retries_done, biased, behaviour, retry, follow_up):
    config = UserSimulationConfig(**{"accept_noise": 0.0, "continue_probability": 0.0,
                                     "error_report_probability": 0.0, **settings})
    reaction = react(config, FRANCE, answer, retries_done=retries_done, biased=biased, rng=random.Random(0))
    assert (reaction.behaviour, reaction.retry, reaction.follow_up) == (behaviour, retry, follow_up)
    expected = BEHAVIOUR_EVENTS[behaviour] + (BEHAVIOUR_EVENTS["continue"] if follow_up else ())
    assert tuple(event for event, _ in reaction.events) == expected


def test_a_near_miss_is_edited_by_one_minus_its_similarity():
    config = UserSimulationConfig(accept_noise=0.0, continue_probability=0.0)
    reaction = react(config, FRANCE, "The capital of France is Lyon.", retries_done=0, biased=False,
                     rng=random.Random(0))
    assert reaction.events[0] == ("output_edited", {"edit_ratio": round(1 - 12 / 14, 4),
                                                    "edited_answer": "The capital of France is Paris."})


def test_every_behaviour_emits_only_the_seeds_signals():
    mapping = score_of_behaviour()
    assert set(mapping) == set(BEHAVIOUR_EVENTS)
    assert {event for events in mapping.values() for event in events} == SCORED_EVENT_TYPES


def test_config_rejects_an_empty_session_range():
    with pytest.raises(ValueError, match="sessions_per_user"):
        UserSimulationConfig(sessions_per_user=(3, 2))


def test_day_tasks_cover_every_phrasing_and_never_an_eval_prompt():
    config = UserSimulationConfig()
    plan = day_tasks(config, DAY)
    tasks = [task for session in plan.values() for task in session]
    assert 200 <= len(plan) <= 800 and all(len(session) == 3 for session in plan.values())
    assert {t.phrasing for t in tasks} == set(range(N_PHRASINGS)) and {t.task_type for t in tasks} == set(TASK_TYPES)
    assert not any(is_eval_prompt(t.prompt) for t in tasks)
    assert day_tasks(config, DAY + timedelta(hours=5)) == plan  # the day, not the hour, picks the tasks
    next_day = day_tasks(config, DAY + timedelta(days=1))
    assert [t.prompt for t in next_day.get(next(iter(next_day)))] != [t.prompt for t in plan[next(iter(plan))]]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A real (weak) base: a few seconds of pretraining on 200 cold-start conversations."""
    return load_for_inference(train_tiny_base(tmp_path_factory.mktemp("model")))


def _run_day(home: Path, tiny_model, **settings) -> tuple[dict, list[int]]:
    """One simulated day, user-0 routed to "A" and everyone else to "B"; also the prompts per run_agent call."""
    config = UserSimulationConfig(**{**DAY_SETTINGS, **settings})
    loaded, batches = [], []
    real_run_requests = users.run_requests

    def load_version(version):
        loaded.append(version)
        return tiny_model

    def counting_run_requests(model, tokenizer, requests, *args, **kwargs):
        batches.append(len(requests))
        return real_run_requests(model, tokenizer, requests, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users, "run_requests", counting_run_requests)
        summary = simulate_usage(config, home=home, router=lambda user, tenant: "A" if user == "user-0" else "B",
                                 load_version=load_version, day=DAY + timedelta(hours=9))
    assert sorted(loaded) == ["A", "B"]  # each version loaded once, however many rounds
    return summary, batches


def _landed(home: Path, kind: str) -> list[dict]:
    files = sorted((home / "landing" / kind).glob("*.jsonl"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def _final_answer(trajectory: dict) -> str:
    return [turn["value"] for turn in trajectory["conversations"] if turn["from"] == "gpt"][-1]


@pytest.fixture(scope="module")
def day(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("day")
    summary, batches = _run_day(home, tiny_model)
    trajectories = {t["trajectory_id"]: t for t in _landed(home, "trajectories")}
    tasks = {task.prompt: task for session in day_tasks(UserSimulationConfig(**DAY_SETTINGS), DAY).values()
             for task in session}
    return home, summary, batches, trajectories, _landed(home, "events"), tasks


def test_a_day_lands_in_the_landing_zone_and_ingests_without_quarantine(day):
    home, summary, _, trajectories, events, _ = day
    assert len(trajectories) == summary["trajectories"] > summary["sessions"] >= 6
    assert len(events) == sum(summary["events"].values()) > 0
    assert Counter(e["event_type"] for e in events) == Counter(summary["events"])
    config = load_config(home)
    report = ingest_landing(config, Lake(config), log=lambda line: None)
    assert report.lines_quarantined == 0
    assert report.rows_new["trajectories"] == len(trajectories) and report.rows_new["events"] == len(events)


def test_each_round_is_one_batched_call_per_version(day):
    _, summary, batches, _, _, _ = day
    assert len(batches) == summary["agent_calls"] <= 2 * summary["rounds"]
    assert sum(batches) == summary["trajectories"]
    assert batches[0] + batches[1] == summary["sessions"]  # round 0: every session's first task, A then B


def test_every_retry_names_a_logged_trajectory_that_failed(day):
    _, summary, _, trajectories, events, tasks = day
    retries = [e for e in events if e["event_type"] == "retry_requested"]
    assert len(retries) == summary["events"]["retry_requested"] > 0
    for event in retries:
        trajectory = trajectories[event["trajectory_id"]]
        assert trajectory["session_id"] == event["session_id"]
        assert not verify(tasks[trajectory["conversations"][1]["value"]], _final_answer(trajectory))


def test_without_noise_only_biased_users_accept_wrong_answers(day):
    _, summary, _, trajectories, events, tasks = day
    config = UserSimulationConfig(**DAY_SETTINGS)
    edited = {e["trajectory_id"]: e["data"]["edit_ratio"] for e in events if e["event_type"] == "output_edited"}
    accepted_by = Counter()
    for event in events:
        trajectory = trajectories[event["trajectory_id"]]
        assert (trajectory["session_id"], trajectory["user_id"]) == (event["session_id"], event["user_id"])
        task = tasks[trajectory["conversations"][1]["value"]]
        verdict, similarity = judge_answer(task, _final_answer(trajectory))
        biased = is_biased(config, event["user_id"])
        if event["event_type"] == "output_accepted":
            accepted_by[biased] += 1
            assert biased or verdict == CORRECT or edited[event["trajectory_id"]] == round(1 - similarity, 4)
        if event["event_type"] == "output_edited":
            assert verdict == NEAR_MISS
    assert accepted_by[True] > 0 and {is_biased(config, f"user-{n}") for n in range(6)} == {True, False}
    assert summary["events"]["session_continued"] > 0 and summary["tasks"] > summary["sessions"]  # follow-ups ran


def test_timestamps_stay_in_the_day_and_increase_within_a_session(day):
    _, _, _, trajectories, events, _ = day
    moments: dict[str, list[datetime]] = {}
    for t in trajectories.values():
        moments.setdefault(t["session_id"], []).append(_moment(t["created_at"]))
    for e in events:
        moments.setdefault(e["session_id"], []).append(_moment(e["ts"]))
        assert _moment(e["ts"]) > _moment(trajectories[e["trajectory_id"]]["created_at"])
    for stamps in moments.values():
        assert len(set(stamps)) == len(stamps) and DAY <= min(stamps) and max(stamps) < DAY + timedelta(days=1)
    for session_id in moments:  # a session's attempts follow one another
        created = [_moment(t["created_at"]) for t in trajectories.values() if t["session_id"] == session_id]
        answered = [max(created[:i + 1]) for i in range(len(created))]
        assert answered == created, "trajectories land in the order they were made"


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_routing_decides_each_trajectorys_model_version(day):
    _, summary, _, trajectories, _, _ = day
    assert {t["model_version"] for t in trajectories.values() if t["user_id"] == "user-0"} == {"A"}
    assert {t["model_version"] for t in trajectories.values() if t["user_id"] != "user-0"} == {"B"}
    assert summary["users_per_version"] == {"A": 1, "B": 5}
    assert set(summary["first_attempt_success"]) == {"A", "B"}


def test_the_same_seed_gives_the_same_day(day, tiny_model, tmp_path):
    _, summary, _, trajectories, events, _ = day
    again, _ = _run_day(tmp_path, tiny_model)
    assert again == summary
    assert {t["trajectory_id"] for t in _landed(tmp_path, "trajectories")} == set(trajectories)
    assert Counter(e["event_type"] for e in _landed(tmp_path, "events")) == Counter(e["event_type"] for e in events)


def test_biased_users_accept_everything(tiny_model, tmp_path):
    summary, _ = _run_day(tmp_path, tiny_model, biased_users=1.0, accept_noise=0.5)
    events = Counter(e["event_type"] for e in _landed(tmp_path, "events"))
    assert events["output_accepted"] == summary["trajectories"] == summary["tasks"]
    assert events["retry_requested"] == events["error_reported"] == 0
