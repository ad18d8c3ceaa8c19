"""One simulated day through the gateway over HTTP against the same day in-process: ingest,
scoring and the A/B analysis see the same counts. The model is the same deterministic
policy on both sides (right, near miss or wrong by the prompt), so any difference is the
door's: routing, one trajectory per attempt, retries seen by the gateway, feedback calls,
the simulated clock."""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.domains.builtin import BuiltinDomain
from flywheel_assets.lib.experiments.rollout import sessions_since
from flywheel_assets.lib.feedback.scoring import session_feedback
from flywheel_assets.lib.gateway.backends import Completion
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.simulation import users
from flywheel_assets.lib.simulation.through_gateway import GatewayDoor
from flywheel_assets.lib.simulation.users import UserSimulationConfig, day_tasks, simulate_usage
from flywheel_assets.lib.tables import SESSION_EVENTS, SESSION_FEEDBACK, TRAJECTORIES
from flywheel_assets.lib.training.inference import AgentRun
from flywheel_assets_tests.gateway.support import CANARY, CHAMPION, register_versions

DAY = datetime(2026, 12, 1, tzinfo=timezone.utc)
SETTINGS = UserSimulationConfig(users=16, sessions_per_user=(1, 1), seed=3, biased_users=0.25,
                                error_report_probability=0.5, continue_probability=0.6, temperature=0.0)


def policy(prompts: dict[str, object]):
    """An answer per prompt: right, a near miss (its last word changed) or wrong, by its hash."""
    def answer(prompt: str) -> str:
        expected = prompts[prompt].expected
        kind = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 3
        return expected if kind == 0 else expected.rsplit(" ", 1)[0] + " Zorblax." if kind == 1 else "I do not know."
    return answer


def _prompts() -> dict[str, object]:
    domain = BuiltinDomain()
    return {domain.messages_for(t)[-1]["content"]: t for tasks in day_tasks(SETTINGS, DAY, domain).values()
            for t in tasks}


def _analyse(home) -> dict:
    config = FlywheelConfig(home=home)
    lake = Lake(config)
    ingest_landing(config, lake, log=lambda _: None)
    con = duckdb.connect()
    lake.register(con, SESSION_EVENTS)
    lake.register(con, TRAJECTORIES)
    feedback = session_feedback(con, config.scoring)
    lake.overwrite(SESSION_FEEDBACK, feedback)
    ab = sessions_since(lake, (CHAMPION, CANARY), DAY, DAY + timedelta(days=2)).to_pylist()
    trajectories = lake.read(TRAJECTORIES).to_pylist()
    return {
        "trajectories": len(trajectories),
        "days": sorted({t["created_at"].date().isoformat() for t in trajectories}),
        "by_version": Counter(t["model_version"] for t in trajectories),
        "events": Counter(e["event_type"] for e in lake.read(SESSION_EVENTS).to_pylist()),
        "sessions_scored": feedback.num_rows,
        "accepted_sessions": sum(feedback.column("task_accepted").to_pylist()),
        "ab_sessions": Counter(r["arm"] for r in ab),
        "ab_users": {arm: len({r["user_id"] for r in ab if r["arm"] == arm}) for arm in ("control", "treatment")},
    }


def test_a_day_through_the_gateway_counts_the_same_as_in_process(tmp_path, monkeypatch, serve):
    prompts = _prompts()
    answer = policy(prompts)

    # in-process: the policy stands in for run_requests
    inproc = tmp_path / "inproc"
    register_versions(FlywheelConfig(home=inproc))

    def fake_run_requests(model, tokenizer, requests, execute, **kwargs):
        return [AgentRun(r.messages[-1]["content"], final_answer=answer(r.messages[-1]["content"]), finished=True,
                         request=list(r.messages)) for r in requests]

    monkeypatch.setattr(users, "run_requests", fake_run_requests)
    router = __import__("flywheel_assets.lib.experiments.registry", fromlist=["ModelRegistry"]).ModelRegistry(
        Lake(FlywheelConfig(home=inproc))).router()
    direct = simulate_usage(SETTINGS, home=inproc, router=router, load_version=lambda v: (None, None), day=DAY)

    # through the gateway: the same policy as its backend
    class PolicyBackend:
        name = "policy"

        async def complete(self, version, messages, tools, **kwargs):
            return Completion(answer(messages[-1]["content"]), [], "stop", 10, 5)

        def close(self):
            pass

    client, gateway, _, _ = serve(backend=PolicyBackend(), trust_client_time=True)
    keys = {tenant: gateway.keys.create(tenant)[0] for tenant in SETTINGS.tenants}
    door = GatewayDoor(client, keys, workers=8)
    routed = gateway.routing()[0]
    http = simulate_usage(SETTINGS, home=gateway.config.home, router=routed,
                          load_version=lambda v: pytest.fail("the door loads no model"), day=DAY, door=door)
    gateway.flush()

    for key in ("sessions", "tasks", "trajectories", "events", "behaviours", "users_per_version", "rounds",
                "first_attempt_success"):
        assert http[key] == direct[key], key
    assert direct["events"].get("retry_requested") and direct["events"].get("output_edited")  # all paths taken
    assert direct["events"].get("session_continued") and direct["users_per_version"].get(CANARY)
    left, right = _analyse(inproc), _analyse(gateway.config.home)
    assert left == right
    assert left["days"] == ["2026-12-01"] and left["trajectories"] == direct["trajectories"]
