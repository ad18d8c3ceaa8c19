"""Is the flywheel feeding on itself? Six checks for a negative feedback loop (seed 75, discussion).

A bad model makes bad data that trains a worse model. Each check looks at one way in,
per cycle: cycle k's training set, its offline evaluation, and its window of usage
(trajectories logged after cycle k−1's dataset, up to cycle k's); the open window since
the last dataset is checked too. Every check ends ok, warn or alert (n/a: not
measurable yet) with its reason; thresholds are `LoopHealthConfig`.

* loop_data_share: training rows the loop made itself (the teacher's: synthetic cold
  start and corrections of failed requests; or usage served by an adapter the flywheel
  trained), not anchored by a human label.
* heldout_drift: the cycle's candidate against the best champion so far on the held-out
  tasks (a verifier decides, not the users).
* judge_disagreement: trajectories users accepted as they were that a heuristic judge fails.
* online_divergence: first-attempt acceptance without edit minus the held-out success of
  the same version: users who accept wrong answers make it positive.
* ngram_diversity: distinct n-grams of the training text over the first cycle's, on
  equal-size samples.
* task_entropy: task-type entropy of the rows the model learns from (non-bronze) over
  log(number of task types).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from datetime import datetime

import duckdb
import polars as pl

from flywheel_assets.lib.config import FlywheelConfig, LoopHealthConfig
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.observability.timeline import loop_versions
from flywheel_assets.lib.tenancy import lane_of_cycle_sql
from flywheel_assets.lib.tables import (
    DATASET_MANIFESTS, JUDGE_SCORES, OFFLINE_EVALUATIONS, SESSION_EVENTS, SESSION_FEEDBACK, TRAINING_DATASET,
    TRAJECTORIES, TRAJECTORY_SCORES,
)

STATUSES = ("n/a", "ok", "warn", "alert")  # in order of severity
CHECKS = ("loop_data_share", "heldout_drift", "judge_disagreement", "online_divergence", "ngram_diversity",
          "task_entropy")
_UNITS = re.compile(r"\w+|[^\w\s]")


def worst(statuses) -> str:
    return max(statuses, key=STATUSES.index, default="n/a")


def _grade(value: float, warn: float, alert: float, higher_is_worse: bool = True) -> str:
    if higher_is_worse:
        return "alert" if value >= alert else "warn" if value >= warn else "ok"
    return "alert" if value <= alert else "warn" if value <= warn else "ok"


def read_inputs(lake: Lake) -> dict[str, pl.DataFrame | list]:
    """Everything the checks look at, in a few grouped queries: the shared lane's cycles (a private
    lane's, keyed cycle-0001@<tenant>, are not in the sequence; lib/tenancy.py)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for table in (TRAJECTORIES, TRAJECTORY_SCORES, SESSION_EVENTS, SESSION_FEEDBACK, JUDGE_SCORES, TRAINING_DATASET,
                  DATASET_MANIFESTS, OFFLINE_EVALUATIONS):
        lake.register(con, table)

    def frame(sql: str) -> pl.DataFrame:
        return pl.from_arrow(con.execute(sql).to_arrow_table())

    usage = frame("""
        WITH reactions AS (
            SELECT trajectory_id, bool_or(event_type = 'output_accepted') AS accepted,
                   bool_or(event_type = 'output_edited') AS edited, bool_or(event_type = 'retry_requested') AS retried
            FROM session_events WHERE trajectory_id IS NOT NULL GROUP BY trajectory_id
        )
        SELECT t.trajectory_id, t.session_id, t.model_version, t.created_at,
               coalesce(r.accepted, false) AS accepted, coalesce(r.edited, false) AS edited,
               coalesce(r.retried, false) AS retried, coalesce(j.failed_judges, '') <> '' AS judge_failed
        FROM trajectories t LEFT JOIN reactions r USING (trajectory_id) LEFT JOIN judge_scores j USING (trajectory_id)
        WHERE t.origin = 'usage'
    """)
    training = frame(f"""
        SELECT d.cycle, d.trajectory_id, d.tier, d.task_type, d.messages_json, t.origin, t.model_version,
               coalesce(s.annotation_score IS NOT NULL OR t.origin = 'golden', false) AS human_verified
        FROM training_dataset d LEFT JOIN trajectories t USING (trajectory_id)
        LEFT JOIN trajectory_scores s USING (trajectory_id)
        WHERE {lane_of_cycle_sql('d.cycle')} = ''
    """)
    evaluations = frame(f"""
        SELECT cycle, version, role, n, success, evaluated_at FROM offline_evaluations
        WHERE scope = 'overall' AND {lane_of_cycle_sql()} = ''
    """)
    sessions = frame("SELECT last_ts, quality_score FROM session_feedback")
    manifests = frame(f"SELECT cycle, created_at FROM dataset_manifests WHERE {lane_of_cycle_sql()} = '' ORDER BY created_at")
    return {"usage": usage, "training": training, "evaluations": evaluations, "sessions": sessions,
            "manifests": manifests}


def first_attempts(usage: pl.DataFrame) -> pl.DataFrame:
    """Mark each trajectory that is a task's first attempt: the previous one in its session was not retried."""
    return usage.sort("session_id", "created_at").with_columns(
        first_attempt=pl.col("session_id").is_null()
        | ~pl.col("retried").shift(1).over("session_id").fill_null(False))


def loop_health(config: FlywheelConfig, inputs: dict, loop_made: set[str], now: datetime) -> dict:
    """Per cycle (and the open window) the metrics and each check's outcome; the latest outcome per check."""
    settings = config.loop_health
    usage = first_attempts(inputs["usage"])
    training, evaluations, sessions = inputs["training"], inputs["evaluations"], inputs["sessions"]
    cycles = inputs["manifests"].to_dicts()
    task_types = training.filter(pl.col("tier") != "bronze")["task_type"].n_unique()
    first_text = _training_text(training, cycles[0]["cycle"], settings.diversity_sample) if cycles else []
    heldout = _heldout_by_version(evaluations)
    rows, previous = [], None
    windows = [(c["cycle"], c["created_at"]) for c in cycles] + [(None, now)]
    for cycle, end in windows:
        window_usage = usage.filter(_within("created_at", previous, end))
        window_sessions = sessions.filter(_within("last_ts", previous, end))
        row = {"cycle": cycle, "window_start": previous, "window_end": end, "usage_trajectories": window_usage.height,
               "online_quality": window_sessions["quality_score"].mean() if window_sessions.height else None,
               "sessions": window_sessions.height}
        checks = {
            "judge_disagreement": _judge_disagreement(window_usage, settings, row),
            "online_divergence": _online_divergence(window_usage, heldout, settings, row),
        }
        if cycle is not None:
            rows_of_cycle = training.filter(pl.col("cycle") == cycle)
            checks["loop_data_share"] = _loop_data_share(rows_of_cycle, loop_made, settings, row)
            checks["heldout_drift"] = _heldout_drift(evaluations, cycle, [c for c, _ in windows], settings, row)
            checks["ngram_diversity"] = _ngram_diversity(
                first_text, _training_text(training, cycle, settings.diversity_sample), settings, row)
            checks["task_entropy"] = _task_entropy(rows_of_cycle, task_types, settings, row)
        row["checks"] = {name: checks.get(name, ("n/a", None, "not a cycle's training set")) for name in CHECKS}
        row["status"] = worst(status for status, _, _ in row["checks"].values())
        rows.append(row)
        previous = end
    latest = []
    for name in CHECKS:
        measured = [r for r in rows if r["checks"][name][0] != "n/a"]
        source = measured[-1] if measured else rows[-1]
        status, value, reason = source["checks"][name]
        latest.append({"check": name, "status": status, "value": value, "cycle": source["cycle"] or "open window",
                       "warn": getattr(settings, f"{name}_warn"), "alert": getattr(settings, f"{name}_alert"),
                       "reason": reason})
    return {"measured_at": now, "status": worst(c["status"] for c in latest), "checks": latest, "cycles": rows}


def _within(column: str, start: datetime | None, end: datetime) -> pl.Expr:
    inside = pl.col(column) <= end
    return inside if start is None else inside & (pl.col(column) > start)


def measure_loop_health(config: FlywheelConfig, lake: Lake, now: datetime) -> dict:
    return loop_health(config, read_inputs(lake), loop_versions(ModelRegistry(lake).history()), now)


def _loop_data_share(rows: pl.DataFrame, loop_made: set[str], settings: LoopHealthConfig, row: dict):
    n = rows.height
    if n == 0:
        return "n/a", None, "empty training set"
    unanchored = ~pl.col("human_verified")
    synthetic = rows.filter(unanchored & pl.col("origin").is_in(["synthetic", "correction"])).height
    served_by_loop = (pl.col("origin") == "usage") & pl.col("model_version").is_in(sorted(loop_made))
    own = rows.filter(unanchored & served_by_loop).height
    row.update(training_rows=n, synthetic_share=synthetic / n, self_generated_share=own / n,
               human_share=rows.filter(pl.col("human_verified")).height / n,
               tier_counts=dict(Counter(rows["tier"].to_list())))
    share = (synthetic + own) / n
    status = _grade(share, settings.loop_data_share_warn, settings.loop_data_share_alert)
    return status, share, (f"{share:.0%} of {n} rows were made by the loop itself ({synthetic / n:.0%} by the teacher, "
                           f"{own / n:.0%} served by its own adapters)")


def _heldout_drift(evaluations: pl.DataFrame, cycle: str, order: list, settings: LoopHealthConfig, row: dict):
    candidate = evaluations.filter((pl.col("cycle") == cycle) & (pl.col("role") == "candidate"))
    if candidate.height == 0:
        return "n/a", None, "the cycle's candidate is not evaluated yet"
    earlier = order[:order.index(cycle) + 1]
    champions = evaluations.filter(pl.col("cycle").is_in(earlier) & (pl.col("role") == "champion"))
    success = candidate["success"][0]
    best = champions["success"].max() if champions.height else success
    drop = best - success
    row.update(candidate_success=success, best_champion_success=best)
    status = _grade(drop, settings.heldout_drift_warn, settings.heldout_drift_alert)
    return status, drop, f"candidate {success:.1%} on held-out tasks against the best champion so far {best:.1%}"


def _judge_disagreement(window: pl.DataFrame, settings: LoopHealthConfig, row: dict):
    accepted = window.filter(pl.col("accepted") & ~pl.col("edited"))
    row["accepted_as_is"] = accepted.height
    if accepted.height < settings.min_trajectories:
        return "n/a", None, f"{accepted.height} trajectories accepted as is (need {settings.min_trajectories})"
    failed = accepted["judge_failed"].mean()
    row["judge_disagreement"] = failed
    status = _grade(failed, settings.judge_disagreement_warn, settings.judge_disagreement_alert)
    return status, failed, f"judges fail {failed:.0%} of the {accepted.height} trajectories users accepted as they were"


def _heldout_by_version(evaluations: pl.DataFrame) -> dict[str, tuple[float, int]]:
    latest = evaluations.sort("evaluated_at").group_by("version").agg(pl.col("success").last(), pl.col("n").last())
    return {r["version"]: (r["success"], r["n"]) for r in latest.to_dicts()}


def _online_divergence(window: pl.DataFrame, heldout: dict, settings: LoopHealthConfig, row: dict):
    attempts = window.filter(pl.col("first_attempt") & pl.col("model_version").is_in(sorted(heldout)))
    total = attempts.height
    if total < settings.min_trajectories:
        return "n/a", None, (f"{total} first attempts by evaluated versions in the window "
                             f"(need {settings.min_trajectories})")
    per_version = attempts.group_by("model_version").agg(
        n=pl.len(), accepted=(pl.col("accepted") & ~pl.col("edited")).mean())
    divergence, variance, online, offline = 0.0, 0.0, 0.0, 0.0
    for version in per_version.to_dicts():
        success, tasks = heldout[version["model_version"]]
        weight = version["n"] / total
        accepted = version["accepted"]
        online += weight * accepted
        offline += weight * success
        divergence += weight * (accepted - success)
        variance += weight ** 2 * (accepted * (1 - accepted) / version["n"] + success * (1 - success) / max(tasks, 1))
    z = divergence / math.sqrt(variance) if variance > 0 else (math.inf if divergence > 0 else 0.0)
    row.update(online_acceptance=online, heldout_success=offline, divergence=divergence, divergence_z=z)
    status = _grade(divergence, settings.online_divergence_warn, settings.online_divergence_alert)
    if status != "ok" and z < settings.divergence_min_z:
        status = "ok"
    reason = (f"users accept {online:.1%} of first attempts as they are, the verifier passes {offline:.1%} of "
              f"held-out tasks for the same versions ({divergence:+.1%}, z = {z:.1f})")
    if divergence < 0:
        reason += "; online below held-out: users are stricter, or the held-out tasks are easier than usage"
    return status, divergence, reason


def _training_text(training: pl.DataFrame, cycle: str, size: int) -> list[list[str]]:
    """Assistant text and tool arguments of `size` of the cycle's non-bronze rows, a stable sample by md5 of the id."""
    rows = training.filter((pl.col("cycle") == cycle) & (pl.col("tier") != "bronze")).select(
        "trajectory_id", "messages_json").to_dicts()
    rows.sort(key=lambda r: hashlib.md5(r["trajectory_id"].encode()).hexdigest())
    texts = []
    for r in rows[:size]:
        parts = []
        for message in json.loads(r["messages_json"]):
            if message["role"] == "assistant":
                parts.append(message.get("content") or "")
                parts += [call["function"]["arguments"] or "" for call in message.get("tool_calls") or []]
        texts.append(_UNITS.findall(" ".join(parts).lower()))
    return texts


def distinct_ngrams(texts: list[list[str]], n: int) -> float:
    """Unique n-grams over all n-grams of the texts (each text's own n-grams)."""
    grams = [tuple(tokens[i:i + n]) for tokens in texts for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngram_diversity(first: list[list[str]], current: list[list[str]], settings: LoopHealthConfig, row: dict):
    size = min(settings.diversity_sample, len(first), len(current))
    if size == 0:
        return "n/a", None, "no non-bronze training text"
    baseline, now = distinct_ngrams(first[:size], settings.ngram), distinct_ngrams(current[:size], settings.ngram)
    if baseline == 0:
        return "n/a", None, "the first cycle's text has no n-grams"
    ratio = now / baseline
    row.update(distinct_ngrams=now, ngram_ratio=ratio)
    status = _grade(ratio, settings.ngram_diversity_warn, settings.ngram_diversity_alert, higher_is_worse=False)
    return status, ratio, (f"distinct {settings.ngram}-grams {now:.3f} on {size} rows against {baseline:.3f} in the "
                           f"first cycle ({ratio:.0%})")


def _task_entropy(rows: pl.DataFrame, task_types: int, settings: LoopHealthConfig, row: dict):
    counts = Counter(rows.filter(pl.col("tier") != "bronze")["task_type"].to_list())
    total = sum(counts.values())
    if task_types < 2 or total == 0:
        return "n/a", None, f"{task_types} task type(s) in the training data"
    entropy = -sum(c / total * math.log(c / total) for c in counts.values()) / math.log(task_types)
    row["task_entropy"] = entropy
    status = _grade(entropy, settings.task_entropy_warn, settings.task_entropy_alert, higher_is_worse=False)
    return status, entropy, f"{len(counts)} of {task_types} task types among {total} non-bronze rows"


def loop_health_markdown(result: dict) -> str:
    def shown(value):
        return "" if value is None else f"{value:.3f}"

    lines = ["| check | status | value | warn / alert | measured on | reason |", "|---|---|---:|---|---|---|"]
    for check in result["checks"]:
        status = check["status"] if check["status"] in ("ok", "n/a") else f"**{check['status'].upper()}**"
        lines.append(f"| {check['check']} | {status} | {shown(check['value'])} | "
                     f"{check['warn']:g} / {check['alert']:g} | {check['cycle']} | {check['reason']} |")
    lines += ["", "| cycle | " + " | ".join(CHECKS) + " |", "|---|" + "---|" * len(CHECKS)]
    for row in result["cycles"]:
        cells = [row["checks"][name][0] for name in CHECKS]
        lines.append(f"| {row['cycle'] or '(open window)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
