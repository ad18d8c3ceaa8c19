"""The embedded default's users: a simulated day of sessions against the routed model versions.

Each user (stable id `user-<n>`, tenant by hash) opens a few sessions; each session asks
training-side tasks of the domain (`Domain.user_tasks`: for the built-in one all 8
phrasings, never an evaluation prompt). A request
is routed to a version, the real model answers through the agent loop (tools run for
real), the trajectory is logged, and the user reacts the way the seed's five signals
assume: accept a right answer, edit a near miss, report and retry a wrong one, leave
after the last failure, continue with a follow-up after an acceptance.

Generation is batched: every round, all attempts waiting across all sessions of the day
go through one `run_agent` call per version (first attempts in round 0; retries and
follow-ups in the next rounds). Everything is deterministic for a seed and a day, and
ids are derived from content: the same day simulated again repeats its ids, and the
ingester skips them as duplicates.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from difflib import SequenceMatcher
from pathlib import Path
from random import Random

from pydantic import BaseModel, Field, model_validator

from flywheel_assets.client import FlywheelLogger
from flywheel_assets.lib.domains import CORRECT, NEAR_MISS, WRONG, Domain
from flywheel_assets.lib.simulation.hermes import to_hermes
from flywheel_assets.lib.simulation.tasks import Task, units, verify
from flywheel_assets.lib.training.inference import AgentRun, Request, run_requests

SOURCE = "user-sim"  # the landing files' name prefix
_DAY = timedelta(days=1)
# Seconds a step may take: the model answering, then the user's reaction to it (per event).
_ANSWER_SECONDS = (2.0, 15.0)
_REACTION_SECONDS = (3.0, 60.0)


class UserSimulationConfig(BaseModel):
    """How the simulated users behave; probabilities are per answer."""

    users: int = Field(200, ge=0)
    sessions_per_user: tuple[int, int] = (1, 4)  # inclusive range, drawn per user and day
    max_tasks_per_session: int = Field(3, ge=1)  # the first task plus at most this minus one follow-ups
    max_retries: int = Field(3, ge=0)
    accept_noise: float = Field(0.02, ge=0.0, le=1.0)  # a right answer is still rejected (retried)
    edit_near_miss: bool = True
    near_miss_similarity: float = Field(0.6, ge=0.0, le=1.0)
    continue_probability: float = Field(0.6, ge=0.0, le=1.0)
    error_report_probability: float = Field(0.3, ge=0.0, le=1.0)
    biased_users: float = Field(0.0, ge=0.0, le=1.0)  # share of users who accept wrong answers too
    seed: int = 0
    temperature: float = Field(0.7, ge=0.0)
    tenants: list[str] = Field(default_factory=lambda: ["acme", "globex"], min_length=1)

    @model_validator(mode="after")
    def _sessions_range(self) -> "UserSimulationConfig":
        low, high = self.sessions_per_user
        if not 1 <= low <= high:
            raise ValueError(f"sessions_per_user must be (min, max) with 1 <= min <= max, got {self.sessions_per_user}")
        return self


BEHAVIOUR_EVENTS: dict[str, tuple[str, ...]] = {
    "accept": ("output_accepted",),
    "continue": ("session_continued",),  # follows any acceptance, with continue_probability
    "edit_near_miss": ("output_edited", "output_accepted"),
    "noise_reject": ("retry_requested",),
    "retry_wrong": ("retry_requested",),
    "report_and_retry": ("error_reported", "retry_requested"),
    "leave": (),
    "report_and_leave": ("error_reported",),
    "biased_accept": ("output_accepted",),
}


def score_of_behaviour() -> dict[str, tuple[str, ...]]:
    """The events each simulated behaviour emits (BEHAVIOUR_EVENTS), and what the seed's
    scorer makes of them.

    The seed scores a *session* from five signals (0.5 base, clamped to [-1, 1]):
    acceptance ±0.3, retries (+0.1 with none, −0.2 from 3), −0.3·edit_ratio,
    +0.1 continued, −0.4 error report. The behaviours map onto them so:

    - accept (a verified answer): output_accepted → accepted. Alone, first try: 0.9.
    - continue: after any acceptance, with continue_probability, session_continued and
      one more task in the same session → continued: 1.0 for a right first try.
    - edit_near_miss (not verified, similarity s ≥ near_miss_similarity over tasks.units
      against task.expected): output_edited with edit_ratio = 1 − s, then output_accepted
      → 0.9 − 0.3·(1 − s) on a first try: 0.78 to 0.9, as high as a right answer, so
      curation should train on data["edited_answer"] (what the user made of it).
    - noise_reject (a verified answer rejected with accept_noise): retry_requested →
      one retry on the session; the rejected trajectory scores as superseded (0.2).
      On the last try a rejection is a `leave`.
    - retry_wrong / report_and_retry (a wrong answer): error_reported with
      error_report_probability, then retry_requested naming the wrong trajectory. A
      session that ends accepted after 1–2 retries scores 0.8 (0.4 with any report);
      after 3 retries 0.6. Each retried trajectory scores as superseded: 0.2, or −0.2
      with its own error report.
    - leave / report_and_leave: after the last failure (max_retries retries used) the
      user abandons the task: not accepted, 3 retries → 0.0, or −0.4 with a report.
    - biased_accept (a biased user, share biased_users): a wrong answer accepted as if
      right → 0.9: the implicit signal lies, and only judges or verifiers can catch it.

    A session's signals pool over its tasks (the seed's unit is the session): a
    follow-up that fails adds its retries and reports to the session that accepted
    the first task, and the score goes to the session's latest accepted trajectory.
    """
    return dict(BEHAVIOUR_EVENTS)


def judge_answer(task: Task, final_answer: str | None, near_miss_similarity: float = 0.6) -> tuple[str, float]:
    """(CORRECT | NEAR_MISS | WRONG, similarity of the answer's units to task.expected's)."""
    similarity = SequenceMatcher(None, units(final_answer or ""), units(task.expected), autojunk=False).ratio()
    if verify(task, final_answer):
        return CORRECT, similarity
    return (NEAR_MISS if similarity >= near_miss_similarity else WRONG), similarity


@dataclass(frozen=True)
class Reaction:
    behaviour: str  # a key of BEHAVIOUR_EVENTS; "continue" is added after it when follow_up
    events: tuple[tuple[str, dict], ...]  # (event_type, data), in order
    retry: bool = False
    follow_up: bool = False


def react(config: UserSimulationConfig, task, final_answer: str | None, *, retries_done: int,
          biased: bool, rng: Random, verdict: tuple[str, float] | None = None) -> Reaction:
    """What a user does with one answer; draws from rng in a fixed order. `verdict` is the
    domain's (Domain.user_verdict); without it the built-in task's judge_answer decides."""
    verdict, similarity = verdict or judge_answer(task, final_answer, config.near_miss_similarity)
    noise, report, carry_on = rng.random(), rng.random(), rng.random()
    if verdict == NEAR_MISS and config.edit_near_miss:
        edited = ("output_edited", {"edit_ratio": round(1.0 - similarity, 4), "edited_answer": task.expected})
        return _accepted(config, "edit_near_miss", (edited,), carry_on)
    if verdict == CORRECT and (biased or noise >= config.accept_noise):
        return _accepted(config, "accept", (), carry_on)
    if verdict != CORRECT and biased:
        return _accepted(config, "biased_accept", (), carry_on)
    if verdict == CORRECT and retries_done < config.max_retries:
        return Reaction("noise_reject", (("retry_requested", {"reason": "rejected"}),), retry=True)
    if verdict == CORRECT:
        return Reaction("leave", ())  # a rejection on the last try: the user gives up like after a failure
    reported = report < config.error_report_probability
    complaint = (("error_reported", {"reason": "wrong_answer"}),) if reported else ()
    if retries_done >= config.max_retries:
        return Reaction("report_and_leave" if reported else "leave", complaint)
    retry = (("retry_requested", {"reason": "wrong_answer"}),)
    return Reaction("report_and_retry" if reported else "retry_wrong", complaint + retry, retry=True)


def _accepted(config: UserSimulationConfig, behaviour: str, before: tuple, carry_on: float) -> Reaction:
    events = before + (("output_accepted", {}),)
    if carry_on < config.continue_probability:
        return Reaction(behaviour, events + (("session_continued", {}),), follow_up=True)
    return Reaction(behaviour, events)


@dataclass
class _Session:
    session_id: str
    user_id: str
    tenant_id: str
    biased: bool
    tasks: list  # the domain's tasks
    rng: Random
    clock: datetime
    pace: float  # scales every gap so that the longest session fits its slot of the day

    def advance(self, seconds: tuple[float, float]) -> datetime:
        self.clock += timedelta(seconds=max(0.001, self.rng.uniform(*seconds) * self.pace))
        return self.clock


@dataclass
class _Attempt:
    session: _Session
    task_index: int
    retries_done: int
    version: str

    @property
    def task(self):
        return self.session.tasks[self.task_index]


@dataclass
class _Tally:
    trajectories: int = 0
    events: Counter = field(default_factory=Counter)
    behaviours: Counter = field(default_factory=Counter)
    first_attempts: Counter = field(default_factory=Counter)
    first_successes: Counter = field(default_factory=Counter)
    users: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    agent_calls: int = 0
    rounds: int = 0


def simulate_usage(config: UserSimulationConfig, *, home: Path, router: Callable[[str, str], str],
                   load_version: Callable[[str], tuple], day: datetime,
                   logger: FlywheelLogger | None = None, domain: Domain | None = None,
                   max_new_tokens: int = 40, door=None) -> dict:
    """Simulate one day of usage; trajectories and events go through the logging client.

    router(user_id, tenant_id) names the version serving a request; load_version(version)
    gives its (model, tokenizer) and is called once per version. A logger passed in is
    flushed, not closed. `domain` is the built-in one unless given. Returns counts for the day.
    With a `door` (through_gateway.GatewayDoor) the users go through the gateway over HTTP
    instead: it routes (the same route()), serves and logs; their reactions are feedback calls.
    """
    domain = domain or _builtin()
    start = _midnight(day)
    sessions = _sessions(config, start, domain)
    own_logger = logger is None
    logger = logger or FlywheelLogger(home, source=SOURCE)
    models: dict[str, tuple] = {}
    tally = _Tally()
    pending = [_route(session, 0, 0, router, tally) for session in sessions]
    try:
        while pending:
            waiting: list[_Attempt] = []
            if door is not None:  # one concurrent wave through the gateway: it batches per version itself
                waiting = _through_door(config, domain, pending, door, max_new_tokens, router, tally)
                pending = waiting
                tally.rounds += 1
                continue
            for version in sorted({attempt.version for attempt in pending}):
                batch = [attempt for attempt in pending if attempt.version == version]
                if version not in models:
                    models[version] = load_version(version)
                model, tokenizer = models[version]
                seed = _stable_int(config.seed, start, version, tally.rounds)  # a retry samples anew
                requests = [Request(domain.messages_for(a.task), domain.tools_for(a.task)) for a in batch]
                runs = run_requests(model, tokenizer, requests,
                                    lambda row, name, arguments: domain.execute(batch[row].task, name, arguments),
                                    temperature=config.temperature, seed=seed, max_new_tokens=max_new_tokens)
                tally.agent_calls += 1
                for attempt, run in zip(batch, runs):
                    waiting += _record(config, domain, attempt, run, logger, router, tally)
            pending = waiting
            tally.rounds += 1
    finally:
        if own_logger:
            logger.close()
        else:
            logger.flush()
    return _summary(start, sessions, tally)


def day_tasks(config: UserSimulationConfig, day: datetime, domain: Domain | None = None) -> dict[str, list]:
    """The tasks each session of the day may ask (its first task, then follow-ups), by session_id."""
    return {session.session_id: session.tasks for session in _sessions(config, _midnight(day), domain or _builtin())}


def _builtin() -> Domain:
    from flywheel_assets.lib.domains.builtin import BuiltinDomain
    return BuiltinDomain()


def is_biased(config: UserSimulationConfig, user_id: str) -> bool:
    """Whether this user accepts wrong answers too: a stable share biased_users of all users."""
    return _unit("biased", config.seed, user_id) < config.biased_users


def tenant_of(config: UserSimulationConfig, user_id: str) -> str:
    return config.tenants[int(_unit("tenant", user_id) * len(config.tenants))]


def _midnight(day: datetime) -> datetime:
    moment = day if day.tzinfo else day.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _stable_int(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _unit(*parts) -> float:
    """A stable number in [0, 1) per key: who is biased, which tenant."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


def _sessions(config: UserSimulationConfig, start: datetime, domain: Domain) -> list[_Session]:
    """Every session of the day, its user, tenant, tasks and start time."""
    day_key = start.date().isoformat()
    plans = []
    for n in range(config.users):
        user_id = f"user-{n}"
        user_rng = Random(f"{config.seed}:{day_key}:{user_id}")
        plans.append((user_id, user_rng.randint(*config.sessions_per_user), user_rng))
    task_seed = _stable_int("tasks", config.seed, day_key)
    slots = config.max_tasks_per_session
    pool = domain.user_tasks(sum(count for _, count, _ in plans) * slots, seed=task_seed)
    drawn = iter(range(0, len(pool), slots))
    longest = slots * (config.max_retries + 1) * (_ANSWER_SECONDS[1] + 3 * _REACTION_SECONDS[1])
    sessions = []
    for user_id, count, user_rng in plans:
        tenant_id, biased = tenant_of(config, user_id), is_biased(config, user_id)
        slot = _DAY / count  # a user's sessions do not overlap: one per slot of the day
        pace = min(1.0, 0.9 * slot.total_seconds() / longest)
        for index in range(count):
            spare = max(0.0, slot.total_seconds() - longest * pace)
            opened = start + slot * index + timedelta(seconds=user_rng.uniform(0, spare))
            session_id = f"sim-{day_key}-{config.seed}-{user_id}-{index}"
            first = next(drawn)
            sessions.append(_Session(session_id, user_id, tenant_id, biased, pool[first:first + slots],
                                     Random(f"{config.seed}:{session_id}"), opened, pace))
    return sessions


def _route(session: _Session, task_index: int, retries_done: int, router: Callable[[str, str], str],
           tally: _Tally, version: str | None = None) -> _Attempt:
    """A new task is routed; a retry of it stays with the version that answered it."""
    if version is None:
        version = router(session.user_id, session.tenant_id)
        if not isinstance(version, str) or not version:
            raise ValueError(f"router gave {version!r} for {session.user_id}: a version name is needed")
        tally.users[version].add(session.user_id)
    return _Attempt(session, task_index, retries_done, version)


def _through_door(config, domain, pending: list[_Attempt], door, max_new_tokens, router, tally) -> list[_Attempt]:
    from flywheel_assets.lib.simulation.through_gateway import Job

    # the moment of each answer is drawn before the call (in-process it is drawn right after:
    # the session's random sequence is the same)
    jobs = [Job(domain.messages_for(a.task), domain.tools_for(a.task), a.session.user_id, a.session.tenant_id,
                a.session.session_id, domain.task_type(a.task), a.session.advance(_ANSWER_SECONDS),
                lambda name, arguments, task=a.task: domain.execute(task, name, arguments)) for a in pending]
    answers = door.run(jobs, max_new_tokens=max_new_tokens, temperature=config.temperature)
    tally.agent_calls += 1
    waiting = []
    for attempt, job, answer in zip(pending, jobs, answers):
        if answer.version != attempt.version:
            raise RuntimeError(f"the gateway served {answer.version} to {attempt.session.user_id}, "
                               f"the registry's route says {attempt.version}: is it serving this FLYWHEEL_HOME?")
        waiting += _record(config, domain, attempt, answer.run, None, router, tally,
                           served=(answer.trajectory_id, job.at, door))
    return waiting


def _record(config: UserSimulationConfig, domain: Domain, attempt: _Attempt, run: AgentRun,
            logger: FlywheelLogger | None, router: Callable[[str, str], str], tally: _Tally,
            served: tuple | None = None) -> list[_Attempt]:
    """Log the trajectory and the user's reaction to it; the attempt that follows, if any.
    `served` = (trajectory_id, answered at, door) when the gateway logged it: the reactions
    then go through its feedback API."""
    session, task = attempt.session, attempt.task
    if served is None:
        # the built-in world logs hermes, as its golden file does; any other domain OpenAI messages and tools
        hermes = domain.name == "builtin"
        conversation = to_hermes(run.messages()) if hermes else run.messages()
        created_at = session.advance(_ANSWER_SECONDS)
        # Derived from what happened: the same day simulated again lands the same ids, which ingestion skips.
        identity = [session.session_id, attempt.task_index, attempt.retries_done, attempt.version, conversation]
        trajectory_id = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
        logger.log_trajectory(conversation, fmt="hermes" if hermes else "openai", trajectory_id=trajectory_id,
                              session_id=session.session_id, user_id=session.user_id, tenant_id=session.tenant_id,
                              task_type=domain.task_type(task), model_version=attempt.version,
                              created_at=created_at, origin="usage", tools=None if hermes else domain.tools_for(task))
    else:
        trajectory_id, _, door = served
    tally.trajectories += 1
    verdict = domain.user_verdict(task, run.tool_calls(), run.final_answer, config.near_miss_similarity)
    reaction = react(config, task, run.final_answer, retries_done=attempt.retries_done,
                     biased=session.biased, rng=session.rng, verdict=verdict)
    if attempt.retries_done == 0:
        tally.first_attempts[attempt.version] += 1
        tally.first_successes[attempt.version] += verdict[0] == CORRECT
    tally.behaviours.update([reaction.behaviour] + (["continue"] if reaction.follow_up else []))
    for event_type, data in reaction.events:
        at = session.advance(_REACTION_SECONDS)
        tally.events[event_type] += 1
        if served is not None:
            if event_type != "retry_requested":  # the retry is the conversation sent again, next round
                door.feedback(session.tenant_id, trajectory_id, event_type, data, at)
            continue
        logger.log_event(session.session_id, event_type, user_id=session.user_id, tenant_id=session.tenant_id,
                         trajectory_id=trajectory_id, data=data, ts=at,
                         event_id=hashlib.sha256(f"{trajectory_id}:{event_type}".encode()).hexdigest()[:32])
    if reaction.retry:
        return [_route(session, attempt.task_index, attempt.retries_done + 1, router, tally, attempt.version)]
    if reaction.follow_up and attempt.task_index + 1 < len(session.tasks):
        return [_route(session, attempt.task_index + 1, 0, router, tally)]
    return []


def _summary(start: datetime, sessions: list[_Session], tally: _Tally) -> dict:
    return {
        "day": start.date().isoformat(),
        "users": len({s.user_id for s in sessions}),
        "sessions": len(sessions),
        "tasks": sum(tally.first_attempts.values()),
        "trajectories": tally.trajectories,
        "events": dict(sorted(tally.events.items())),
        "behaviours": dict(sorted(tally.behaviours.items())),
        "first_attempt_success": {version: round(tally.first_successes[version] / count, 4)
                                  for version, count in sorted(tally.first_attempts.items())},
        "first_attempts": dict(sorted(tally.first_attempts.items())),
        "users_per_version": {version: len(users) for version, users in sorted(tally.users.items())},
        "rounds": tally.rounds,
        "agent_calls": tally.agent_calls,
    }
