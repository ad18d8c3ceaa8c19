"""A Flywheel home after many cycles, for the sensor benchmark.

Everything is written through the library's own doors, so the Delta layout is the one
a deployment would have after that many cycles:

* landing files by the logging client (`FlywheelLogger`, one flush per file pair of
  trajectories and events), their mtimes set to the simulated time they landed;
* bronze/trajectories and the bronze/ingested_files ledger with `Lake.append`, one
  commit per landing file, as `ingest_landing` commits them (bronze/session_events is
  left out: no sensor reads it);
* silver/session_feedback and gold/trajectory_scores with `Lake.overwrite` at the end
  of every cycle (ingest_job rewrites them whole; how often only lengthens their log);
* gold/model_registry through `ModelRegistry`: every cycle's adapter is registered,
  gated, canaried, A/B tested and shipped or rolled back, with a few regression
  rollbacks that reinstate the previous champion;
* dataset_manifests, training_dataset, offline_evaluations and ab_results as their
  assets write them, and the dynamic `cycle` partitions in a Dagster instance kept
  under the home.

Users are routed by the registry's own router, day by day. The last `pending` landing
files are not ingested yet: they are what landing_sensor should request next.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from flywheel_assets.client import FlywheelLogger
from flywheel_assets.lib.clock import set_now
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake, conform
from flywheel_assets.lib.simulation.tasks import TASK_TYPES
from flywheel_assets.lib.tables import (AB_RESULTS, DATASET_MANIFESTS, INGESTED_FILES, OFFLINE_EVALUATIONS,
                                        SESSION_FEEDBACK, TRAINING_DATASET, TRAJECTORIES, TRAJECTORY_SCORES)

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
MANIFEST = "bench_history.json"
NOW_HOUR = 18  # the sensors look on the last day at 18:00


@dataclass(frozen=True)
class HistorySpec:
    files: int = 10_000
    cycles: int = 100
    days_per_cycle: int = 4
    sessions_per_day: int = 500
    users: int = 5_000
    pending: int = 50
    dataset_rows: int = 500
    seed: int = 0

    @property
    def days(self) -> int:  # the last cycle's A/B test is running: it stops on its third day
        return (self.cycles - 1) * self.days_per_cycle + 3


def outcome(k: int, cycles: int) -> str:
    """What happens to cycle k's adapter: shipped most of the time, the rest as the rollout allows."""
    if k == cycles:
        return "running"
    if k % 10 == 3:
        return "gate_blocked"
    if k % 20 == 11:
        return "canary_rollback"
    if k % 10 == 7:
        return "ab_rollback"
    if k % 25 == 5:
        return "regression"
    return "ship"


class _Committer:
    """One writer thread per table, commits in order (deltalake releases the GIL)."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self.pools: dict[str, ThreadPoolExecutor] = {}
        self.futures: list[Future] = []
        self.commits: dict[str, int] = {}

    def append(self, table, rows: pa.Table) -> None:
        pool = self.pools.setdefault(table.name, ThreadPoolExecutor(max_workers=1))
        self.futures.append(pool.submit(self.lake.append, table, rows))
        self.commits[table.name] = self.commits.get(table.name, 0) + 1

    def wait(self) -> None:
        for future in self.futures:
            future.result()
        for pool in self.pools.values():
            pool.shutdown()


def generate(home: Path, spec: HistorySpec, log=print) -> dict:
    """Write the history into an empty home; returns what was written (also saved as MANIFEST)."""
    started = time.perf_counter()
    config = load_config(home)
    lake = Lake(config)
    clock = {"now": START}
    registry = ModelRegistry(lake, clock=lambda: clock["now"])
    instance = _instance(home)
    committer = _Committer(lake)
    rng = np.random.default_rng(spec.seed)
    pairs = np.array_split(np.arange(spec.files // 2), spec.days)  # landing file pairs per day
    pending_pairs = spec.pending // 2
    last_pair = spec.files // 2 - 1
    accept = {"base-v0": 0.45}
    feedback_parts: list[pa.Table] = []
    score_parts: list[pa.Table] = []
    trajectory_count = 0
    registry.register("base-v0", base="base-v0", base_path="models/base-v0", reason="pretrained on cold-start data",
                      actor="base_model")

    def at(day: int, hour: float) -> datetime:
        clock["now"] = START + timedelta(days=day, hours=hour)
        return clock["now"]

    for day in range(spec.days):
        k, d = day // spec.days_per_cycle + 1, day % spec.days_per_cycle
        cycle, version = f"cycle-{k:04d}", f"cycle-{k:04d}-lora"
        fate = outcome(k, spec.cycles)
        if d == 0:
            if k > 1 and outcome(k - 1, spec.cycles) == "regression":
                at(day, 1)
                registry.rollback(f"cycle-{k - 1:04d}-lora", reason="regression: quality dropped after promotion",
                                  actor="regression_watch")
            _dataset(lake, rng, cycle, at(day, 2), spec.dataset_rows, trajectory_count)
            instance.add_dynamic_partitions("cycle", [cycle])
            champion = registry.champion()["version"]
            accept[version] = (0.45 + 0.35 * k / spec.cycles if fate in ("ship", "running", "regression")
                               else accept[champion] - 0.05)
            if fate == "regression":
                accept[version] = 0.30
            at(day, 6)
            registry.register(version, base="base-v0", base_path="models/base-v0", adapter_path=f"models/{version}",
                              parent=champion, cycle=cycle, reason=f"trained on {spec.dataset_rows} rows of {cycle}",
                              actor="lora_adapter")
            passed = fate != "gate_blocked"
            _evaluation(lake, rng, cycle, version, champion, passed, clock["now"])
            at(day, 8)
            gate_reason = "candidate within the gate margin" if passed else "candidate worse than the champion"
            if passed:
                registry.transition(version, "canary", traffic_share=0.01, reason=f"passed the promotion gate: "
                                    f"{gate_reason}", actor="ab_monitor")
            else:
                registry.transition(version, "retired", reason=f"blocked by the promotion gate: {gate_reason}",
                                    actor="ab_monitor")
            committer.append(AB_RESULTS, _look(cycle, version, champion, "gate", clock["now"],
                                               "PROCEED" if passed else "ROLLBACK", "gate", gate_reason))
        elif fate != "gate_blocked" and not (fate == "canary_rollback" and d > 1):
            champion = registry.champion()["version"]
            at(day, 8)
            if d == 1 and fate == "canary_rollback":
                registry.rollback(version, reason="canary error-report rate too high", actor="ab_monitor")
                committer.append(AB_RESULTS, _look(cycle, version, champion, "canary", clock["now"], "ROLLBACK",
                                                   "guardrail", "canary error-report rate too high"))
            elif d == 1:
                registry.transition(version, "treatment", traffic_share=0.09, reason="canary healthy",
                                    actor="ab_monitor")
                committer.append(AB_RESULTS, _look(cycle, version, champion, "canary", clock["now"], "PROCEED",
                                                   "canary", "canary healthy"))
            else:
                committer.append(AB_RESULTS, _look(cycle, version, champion, "treatment", clock["now"], "CONTINUE",
                                                   "min_users", "not enough users yet", rng))
        # the day's usage, routed by the registry as it stands after the morning's changes
        hours = NOW_HOUR if day == spec.days - 1 else 24
        router = registry.router()
        for index, pair in enumerate(pairs[day]):
            ingested = pair <= last_pair - pending_pairs
            sessions = _sessions(rng, spec, day, hours, index, len(pairs[day]), router, accept, trajectory_count)
            trajectory_count += sessions.num_rows
            files = _land(home, sessions)
            if ingested:
                committer.append(TRAJECTORIES, _trajectory_rows(sessions, files["trajectories"]))
                for kind, (relative, size, mtime_ns, lines) in files.items():
                    committer.append(INGESTED_FILES, conform(pa.Table.from_pylist([{
                        "source_file": relative, "kind": kind, "size_bytes": size, "mtime_ns": mtime_ns,
                        "lines": lines, "rows_new": lines, "rows_duplicate": 0, "rows_quarantined": 0,
                        "ingested_at": datetime.fromtimestamp(mtime_ns / 1e9 + 60, timezone.utc)}]), INGESTED_FILES))
                feedback_parts.append(_feedback_rows(sessions))
                score_parts.append(_score_rows(sessions))
        if d == spec.days_per_cycle - 1 and fate in ("ship", "regression", "ab_rollback"):
            champion = registry.champion()["version"]
            at(day, 22)
            if fate == "ab_rollback":
                registry.rollback(version, reason="A/B ROLLBACK: quality below the champion's", actor="ab_monitor")
            else:
                registry.transition(version, "champion", reason="A/B SHIP: quality above the champion's",
                                    actor="ab_monitor")
            committer.append(AB_RESULTS, _look(cycle, version, champion, "treatment", clock["now"],
                                               "ROLLBACK" if fate == "ab_rollback" else "SHIP",
                                               "negative" if fate == "ab_rollback" else "ship", "decided", rng))
        if d == spec.days_per_cycle - 1 or day == spec.days - 1:
            lake.overwrite(SESSION_FEEDBACK, pa.concat_tables(feedback_parts))
            lake.overwrite(TRAJECTORY_SCORES, pa.concat_tables(score_parts))
            log(f"  cycle {k}/{spec.cycles}: day {day + 1}/{spec.days}, {trajectory_count:,} trajectories, "
                f"{sum(committer.commits.values()):,} commits queued, {time.perf_counter() - started:.0f} s",
                flush=True)
    committer.wait()
    now = START + timedelta(days=spec.days - 1, hours=NOW_HOUR)
    set_now(config, now)
    ingested = lake.read(INGESTED_FILES, columns=["source_file", "mtime_ns"]).to_pylist()
    newest = max((r["mtime_ns"], r["source_file"]) for r in ingested)
    summary = {"spec": asdict(spec), "writer": writer_digest(), "now": now.isoformat(),
               "generate_s": round(time.perf_counter() - started, 1),
               "trajectories": trajectory_count, "append_commits": committer.commits,
               "cursor": json.dumps({"mtime_ns": newest[0], "path": newest[1]})}
    (home / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def writer_digest() -> str:
    """Of the code that decides the tables' layout: a history written by other code is not this code's layout."""
    import flywheel_assets.lib.lake as lake_module

    return hashlib.sha256(Path(lake_module.__file__).read_bytes()).hexdigest()[:12]


def load_or_generate(home: Path, spec: HistorySpec, log=print) -> dict:
    """The home's history if it was made with this spec, else a new one (the home must then be empty)."""
    manifest = home / MANIFEST
    if manifest.exists():
        summary = json.loads(manifest.read_text())
        if summary["spec"] == asdict(spec):
            if summary.get("writer") != writer_digest():
                log(f"warning: {home} was written by another lib/lake.py; --fresh measures this code's layout")
            return summary
        raise SystemExit(f"{home} holds a history made with {summary['spec']}; use another --home or --fresh")
    if home.exists() and any(home.iterdir()):
        raise SystemExit(f"{home} is not empty and holds no {MANIFEST}; use another --home or --fresh")
    home.mkdir(parents=True, exist_ok=True)
    return generate(home, spec, log)


def _instance(home: Path):
    import dagster as dg

    (home / "dagster").mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(tempdir=str(home / "dagster"))


def _sessions(rng, spec: HistorySpec, day: int, hours: int, index: int, pairs_today: int, router, accept: dict,
              first: int) -> pa.Table:
    """The sessions of the day's index-th landing file pair (they land in order through the day):
    who, which version served them, what they did."""
    n = max(1, round(spec.sessions_per_day * hours / 24 / pairs_today))
    day_start = START + timedelta(days=day)
    window = hours * 3600 / pairs_today
    offset = index * window
    starts = np.sort(rng.uniform(offset, offset + window * 0.95, n))
    users = [f"user-{u:05d}" for u in rng.integers(0, spec.users, n)]
    versions = [router(user, "default") for user in users]
    accepted = rng.random(n) < np.array([accept[v] for v in versions])
    retries = np.where(accepted, 0, np.where(rng.random(n) < 0.1, 3, 1))
    errors = rng.random(n) < np.where(accepted, 0.03, 0.15)
    continued = rng.random(n) < 0.5
    quality = np.clip(0.5 + np.where(accepted, 0.3, -0.3) + np.where(retries == 0, 0.1, np.where(retries >= 3, -0.2, 0))
                      + np.where(continued, 0.1, 0) + np.where(errors, -0.4, 0), -1, 1)
    first_ts = [day_start + timedelta(seconds=float(s)) for s in starts]
    n_events = accepted.astype(int) + retries + errors + continued
    return pa.table({
        "trajectory_id": [f"traj-{first + i:08d}" for i in range(n)],
        "session_id": [f"sess-{first + i:08d}" for i in range(n)],
        "user_id": users, "model_version": versions,
        "task_type": [TASK_TYPES[i] for i in rng.integers(0, len(TASK_TYPES), n)],
        "accepted": accepted, "retries": retries, "errors": errors, "continued": continued,
        "quality": quality, "n_events": n_events,
        "first_ts": pa.array(first_ts, pa.timestamp("us", tz="UTC")),
        "last_ts": pa.array([t + timedelta(seconds=int(e)) for t, e in zip(first_ts, n_events)],
                            pa.timestamp("us", tz="UTC")),
    })


def _land(home: Path, sessions: pa.Table) -> dict[str, tuple[str, int, int, int]]:
    """Write the sessions' trajectories and events through the logging client; one file of each kind."""
    rows = sessions.to_pylist()
    with FlywheelLogger(home=home, buffer_size=10**9, source="bench") as client:
        for row in rows:
            prompt = f"{row['task_type']} request of {row['user_id']}"
            client.log_trajectory([{"from": "human", "value": prompt}, {"from": "gpt", "value": "done."}],
                                  session_id=row["session_id"], user_id=row["user_id"], task_type=row["task_type"],
                                  model_version=row["model_version"], trajectory_id=row["trajectory_id"],
                                  created_at=row["first_ts"])
            kinds = (["output_accepted"] * row["accepted"] + ["retry_requested"] * row["retries"]
                     + ["error_reported"] * row["errors"] + ["session_continued"] * row["continued"])
            for i, event_type in enumerate(kinds):
                client.log_event(row["session_id"], event_type, user_id=row["user_id"],
                                 trajectory_id=row["trajectory_id"], ts=row["first_ts"] + timedelta(seconds=i + 1))
        written = client.flush()
    landed = rows[-1]["last_ts"] + timedelta(seconds=5)
    files = {}
    for path in written:
        mtime_ns = int(landed.timestamp() * 1e9)
        os.utime(path, ns=(mtime_ns, mtime_ns))
        kind = path.parent.name
        lines = len(rows) if kind == "trajectories" else int(sum(r["n_events"] for r in rows))
        files[kind] = (f"{kind}/{path.name}", path.stat().st_size, mtime_ns, lines)
    return files


def _trajectory_rows(sessions: pa.Table, landed: tuple) -> pa.Table:
    n = sessions.num_rows
    return conform(pa.table({
        "trajectory_id": sessions["trajectory_id"], "session_id": sessions["session_id"],
        "user_id": sessions["user_id"], "tenant_id": pa.array(["default"] * n),
        "model_version": sessions["model_version"], "task_type": sessions["task_type"],
        "origin": pa.array(["usage"] * n), "is_synthetic": pa.array([False] * n), "created_at": sessions["first_ts"],
        "source_format": pa.array(["hermes"] * n),
        "user_prompt": pa.array([f"{t} request of {u}" for t, u in zip(sessions["task_type"].to_pylist(),
                                                                       sessions["user_id"].to_pylist())]),
        "final_response": pa.array(["done."] * n), "completed": pa.array([True] * n),
        "n_turns": pa.array([2] * n, pa.int32()), "n_tool_calls": pa.array([0] * n, pa.int32()),
        "source_file": pa.array([landed[0]] * n), "source_line": pa.array(np.arange(1, n + 1)),
        "ingested_at": pa.array([datetime.fromtimestamp(landed[2] / 1e9 + 60, timezone.utc)] * n,
                                pa.timestamp("us", tz="UTC")),
    }), TRAJECTORIES)


def _feedback_rows(sessions: pa.Table) -> pa.Table:
    n = sessions.num_rows
    return conform(pa.table({
        "session_id": sessions["session_id"], "user_id": sessions["user_id"], "tenant_id": pa.array(["default"] * n),
        "task_accepted": sessions["accepted"], "retry_count": sessions["retries"],
        "edit_ratio": pa.array(np.zeros(n)), "session_continued": sessions["continued"],
        "error_reported": sessions["errors"], "quality_score": sessions["quality"], "n_events": sessions["n_events"],
        "first_ts": sessions["first_ts"], "last_ts": sessions["last_ts"],
        "final_trajectory_id": sessions["trajectory_id"],
    }), SESSION_FEEDBACK)


def _score_rows(sessions: pa.Table) -> pa.Table:
    n = sessions.num_rows
    quality = sessions["quality"].to_numpy()
    combined = 0.7 * quality + 0.3 * 0.8
    tiers = np.where(combined >= 0.7, "gold", np.where(combined >= 0.4, "silver", "bronze"))
    return conform(pa.table({
        "trajectory_id": sessions["trajectory_id"], "session_id": sessions["session_id"],
        "tenant_id": pa.array(["default"] * n), "task_type": sessions["task_type"],
        "model_version": sessions["model_version"], "origin": pa.array(["usage"] * n),
        "is_synthetic": pa.array([False] * n), "created_at": sessions["first_ts"], "implicit_score": quality,
        "attribution": pa.array(["final"] * n), "judge_score": pa.array(np.full(n, 0.8)),
        "human_verified": pa.array([False] * n), "combined_score": combined, "score_source": pa.array(["fused"] * n),
        "tier": pa.array(tiers), "weight": pa.array(np.where(tiers == "gold", 1.0, 0.5)),
    }), TRAJECTORY_SCORES)


def _dataset(lake: Lake, rng, cycle: str, now: datetime, rows: int, trajectories: int) -> None:
    ids = [f"traj-{i:08d}" for i in rng.integers(0, max(1, trajectories), rows)]
    messages = json.dumps([{"role": "user", "content": "a request"}, {"role": "assistant", "content": "done."}])
    lake.overwrite(TRAINING_DATASET, conform(pa.table({
        "cycle": [cycle] * rows, "trajectory_id": ids, "tier": ["gold"] * rows, "weight": [1.0] * rows,
        "messages_json": [messages] * rows, "tools_json": ["[]"] * rows, "selection_rank": list(range(rows)),
    }), TRAINING_DATASET), predicate=f"cycle = '{cycle}'")
    lake.append(DATASET_MANIFESTS, conform(pa.Table.from_pylist([{
        "cycle": cycle, "created_at": now, "seed": 0, "target_size": 5000, "n_rows": rows,
        "tier_counts_json": json.dumps({"gold": rows}), "task_type_counts_json": "{}", "input_versions_json": "{}",
        "trajectory_ids": ids, "export_path": f"datasets/{cycle}/train.jsonl", "content_sha256": ""}]),
        DATASET_MANIFESTS))


def _evaluation(lake: Lake, rng, cycle: str, candidate: str, champion: str, passed: bool, now: datetime) -> None:
    rows = []
    for role, version in (("candidate", candidate), ("champion", champion)):
        for scope in ("overall", *TASK_TYPES):
            success = float(rng.uniform(0.4, 0.7))
            rows.append({"cycle": cycle, "version": version, "role": role, "scope": scope,
                         "n": 600 if scope == "overall" else 120, "success": success, "success_low": success - 0.04,
                         "success_high": success + 0.04, "gate_passed": passed if role == "candidate" else None,
                         "gate_reason": "gate" if role == "candidate" else None, "evaluated_at": now})
    lake.overwrite(OFFLINE_EVALUATIONS, pa.Table.from_pylist(rows, schema=OFFLINE_EVALUATIONS.schema),
                   predicate=f"cycle = '{cycle}'")


def _look(cycle: str, version: str, champion: str, stage: str, now: datetime, outcome_: str, rule: str,
          reason: str, rng=None) -> pa.Table:
    row = {"test_id": f"ab-{version}", "cycle": cycle, "treatment": version, "control": champion, "stage": stage,
           "looked_at": now, "outcome": outcome_, "rule": rule, "reason": reason}
    if rng is not None:
        effect = float(rng.normal(0.01, 0.02))
        row.update(effect=effect, effect_low=effect - 0.05, effect_high=effect + 0.05, p_value=0.3, srm_p=0.5,
                   users_control=900, users_treatment=90, decision_json="{}")
    return pa.Table.from_pylist([row], schema=AB_RESULTS.schema)
