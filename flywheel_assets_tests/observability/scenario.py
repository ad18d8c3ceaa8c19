"""A few cycles of the flywheel in seconds: the real user simulator, ingest, scoring, curation,
datasets, registry and offline-evaluation bookkeeping, with a scripted agent in place of the model.

The agent solves a task when a stable hash of (prompt, sampling seed) falls under its
skill, else fails as a weak model does: a wrong value (often a near miss the user
edits), a tool call with broken arguments, or no answer at all. Candidates have the
champion's skill, so a healthy run holds steady; what the loop-health checks find comes
from how the simulated users react, not from anything written here.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import dagster as dg
import pyarrow as pa

from flywheel_assets.defs.curation.assets import curated_trajectories, training_dataset
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib import clock
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.domains.builtin import BuiltinDomain
from flywheel_assets.lib.evaluation.offline import TaskOutcome, gate, paired_difference, summarise
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.simulation import users
from flywheel_assets.lib.simulation.seed import write_cold_start
from flywheel_assets.lib.simulation.tasks import Task, eval_tasks, expert_messages, verify
from flywheel_assets.lib.simulation.tools import run_tool
from flywheel_assets.lib.simulation.users import UserSimulationConfig, day_tasks, simulate_usage
from flywheel_assets.lib.tables import OFFLINE_EVALUATIONS
from flywheel_assets.lib.training.inference import AgentRun

START = datetime(2026, 12, 1, tzinfo=timezone.utc)
SETTINGS = {
    "cold_start": {"synthetic_trajectories": 60},
    "curation": {"target_size": 400},
    "evaluation": {"tasks": 300},
}
PIPELINE = [bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories, training_dataset]


def _unit(*parts) -> float:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


class ScriptedAgent:
    def __init__(self, skill: float):
        self.skill = skill
        self.tasks: dict[str, Task] = {}

    def learn(self, tasks) -> None:
        self.tasks.update({task.prompt: task for task in tasks})

    def answer(self, prompt: str, seed: int) -> AgentRun:
        task = self.tasks[prompt]
        messages = expert_messages(task, random.Random(f"{prompt}:{seed}"))
        results = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]), results[c["id"]])
                 for m in messages for c in m.get("tool_calls") or []]
        run = AgentRun(prompt, calls=calls, final_answer=messages[-1]["content"], finished=True)
        if _unit("solve", prompt, seed) < self.skill:
            return run
        failure = _unit("failure", prompt, seed)
        if failure < 1 / 3:  # a wrong value in a right-looking answer
            wrong = re.sub(re.escape(task.answer_units[0]), "nowhere", task.expected, count=1, flags=re.IGNORECASE)
            run.final_answer = wrong if not verify(task, wrong) else ""
        elif failure < 2 / 3:  # broken arguments: the tool fails and the agent gives up
            name = calls[0][0]
            run.calls = [(name, None, run_tool(name, "{"))]
            run.final_answer = "Sorry, I could not complete that request."
        else:
            run.final_answer = ""
        return run

    def run_requests(self, model, tokenizer, requests, execute, *, seed: int = 0, **settings) -> list[AgentRun]:
        return [self.answer(request.messages[-1]["content"], seed) for request in requests]


def _evaluate(agent: ScriptedAgent, config, lake: Lake, cycle: str, candidate: dict, champion: dict,
              now: datetime) -> bool:
    tasks = eval_tasks(config.evaluation.tasks)
    agent.learn(tasks)
    domain = BuiltinDomain()
    graded = [(task, domain.grade(task, (run := agent.answer(task.prompt, 0)).tool_calls(), run.final_answer))
              for task in tasks]
    outcomes = {role: [TaskOutcome(task.task_id, task.task_type, g.success, g.tool_names_right, g.arguments_right)
                       for task, g in graded] for role in ("candidate", "champion")}
    difference = paired_difference(outcomes["candidate"], outcomes["champion"])
    passed, reason = gate(difference, config.evaluation.gate_margin)
    rows = []
    for role, version in (("candidate", candidate), ("champion", champion)):
        block = summarise(outcomes[role])["overall"]
        is_candidate = role == "candidate"
        rows.append({"cycle": cycle, "version": version["version"], "role": role, "scope": "overall", **block,
                     "difference": difference["difference"] if is_candidate else None,
                     "gate_passed": passed if is_candidate else None, "gate_reason": reason if is_candidate else None,
                     "evaluated_at": now})
    lake.overwrite(OFFLINE_EVALUATIONS, pa.Table.from_pylist(rows, schema=OFFLINE_EVALUATIONS.schema),
                   predicate=f"cycle = '{cycle}'")
    return passed


def run_flywheel(home: Path, *, biased_users: float, cycles: int = 2, days_per_cycle: int = 2, users_per_day: int = 40,
                 skill: float = 0.5, after_cycle=None) -> dict:
    """Turn the loop `cycles` times; after_cycle(cycle, config, lake, now) is called after each evaluation."""
    (home / "config.json").write_text(json.dumps(SETTINGS))
    config = load_config(home, str(home / "config.json"))
    lake = Lake(config)
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    instance = dg.DagsterInstance.ephemeral()
    registry = ModelRegistry(lake, clock=lambda: clock.now(config))
    clock.set_now(config, START)
    write_cold_start(config)
    registry.register("base-scripted", base="base-scripted", base_path="models/base-scripted",
                      reason="scripted stand-in", actor="test")
    agent = ScriptedAgent(skill)
    simulated = UserSimulationConfig(users=users_per_day, sessions_per_user=(1, 2), biased_users=biased_users, seed=7)
    pending = None  # a candidate serving as A/B treatment until the end of the next day
    with mock.patch.object(users, "run_requests", agent.run_requests):
        day = START
        for number in range(1, cycles + 1):
            cycle = f"cycle-{number:04d}"
            for _ in range(days_per_cycle):
                day += timedelta(days=1)
                clock.set_now(config, day + timedelta(hours=23))
                agent.learn(task for tasks in day_tasks(simulated, day).values() for task in tasks)
                simulate_usage(simulated, home=home, router=registry.router(), load_version=lambda v: (v, None),
                               day=day)
                if pending:
                    registry.transition(pending, "champion", reason="A/B SHIP", actor="test")
                    pending = None
            now = clock.now(config)
            instance.add_dynamic_partitions("cycle", [cycle])
            assert dg.materialize(PIPELINE, partition_key=cycle, resources=resources, instance=instance).success
            champion = registry.champion()
            candidate = registry.register(f"{cycle}-lora", base=champion["base"], base_path=champion["base_path"],
                                          adapter_path=f"models/{cycle}-lora", parent=champion["version"], cycle=cycle,
                                          reason="scripted adapter", actor="test")
            if _evaluate(agent, config, lake, cycle, candidate, champion, now):
                registry.transition(candidate["version"], "treatment", reason="gate passed", actor="test")
                pending = candidate["version"]
            else:
                registry.transition(candidate["version"], "retired", reason="gate blocked", actor="test")
            if after_cycle is not None:
                after_cycle(cycle, config, lake, clock.now(config))
    return {"config": config, "lake": lake, "resources": resources, "instance": instance}

