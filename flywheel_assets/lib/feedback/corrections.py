"""Teacher corrections: the requests the model failed, solved again by a teacher.

A request failed when a session asked it and no trajectory answering it reached a
training tier (every attempt was retried, reported or abandoned), or when the user had
to edit the answer it accepted (a near miss). Abandoned requests come first. Those prompts are
exactly what the model cannot do yet, and self-training cannot fix them: rejection
sampling only ever harvests what the model already gets right sometimes (FINDINGS.md).
So each day up to `corrections.daily_budget` failed prompts, the most recent first and
balanced over task types, go to the teacher — the domain's oracle offline (the
built-in world's scripted expert, BFCL's possible answers), any OpenAI-compatible model
otherwise (the seed's GPT-4 teacher, here used on live prompts instead of invented ones).
The request is matched to the domain's task it asks (`Domain.task_for`: the checker needs
the task), the teacher's answer is grounded like cold-start data (the domain's checker
passed) and lands as an ordinary trajectory file with origin
`correction`, so it is ingested, scored, curated and selected like everything else.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime

import duckdb

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES, TRAJECTORY_SCORES

ORIGIN = "correction"


def failed_requests(lake: Lake, config: FlywheelConfig, limit: int) -> list[dict]:
    """Failed usage requests not corrected yet: one row per prompt (trajectory_id, task_type,
    user_prompt, created_at, abandoned), abandoned ones first, then newest first, round-robin
    over task types, at most `limit`."""
    if limit <= 0 or not lake.exists(TRAJECTORY_SCORES):
        return []
    con = duckdb.connect()
    con.register("scores", lake.read(TRAJECTORY_SCORES, columns=["trajectory_id", "session_id", "tier"]))
    con.register("trajectories", lake.read(
        TRAJECTORIES, columns=["trajectory_id", "session_id", "tenant_id", "task_type", "origin", "user_prompt",
                               "created_at"]))
    con.register("edited", lake.read(SESSION_EVENTS, columns=["trajectory_id"], filter_sql="event_type = 'output_edited'"))
    lane = config.tenancy.lane_expr("tenant_id")
    return con.execute(f"""
        WITH usage AS (
            SELECT t.trajectory_id, t.session_id, t.tenant_id, t.task_type, t.user_prompt, t.created_at, s.tier,
                   t.trajectory_id IN (SELECT trajectory_id FROM edited) AS edited
            FROM trajectories t JOIN scores s USING (trajectory_id)
            -- an opted-out tenant's prompts are never sent to the teacher (tenancy)
            WHERE t.origin = 'usage' AND t.user_prompt IS NOT NULL AND {config.tenancy.trainable_sql("t.tenant_id")}
        ), failed AS (
            SELECT session_id, user_prompt, arg_max(trajectory_id, created_at) AS trajectory_id,
                   any_value(tenant_id) AS tenant_id, any_value(task_type) AS task_type, max(created_at) AS created_at,
                   bool_and(tier = $lowest) AS abandoned
            FROM usage GROUP BY session_id, user_prompt
            HAVING bool_and(tier = $lowest) OR bool_or(edited)
        ), fresh AS (
            -- one correction per prompt and lane (lib/tenancy.py): a private lane trains on its own only
            SELECT * FROM failed
            WHERE ({lane}, lower(trim(user_prompt))) NOT IN (
                SELECT ({lane}, lower(trim(user_prompt))) FROM trajectories
                WHERE origin = $origin AND user_prompt IS NOT NULL)
            QUALIFY row_number() OVER (PARTITION BY {lane}, lower(trim(user_prompt))
                                       ORDER BY created_at DESC, trajectory_id) = 1
        ), ranked AS (
            SELECT *, row_number() OVER (PARTITION BY task_type ORDER BY abandoned DESC, created_at DESC,
                                         trajectory_id) AS type_rank
            FROM fresh
        )
        SELECT trajectory_id, tenant_id, task_type, user_prompt, created_at, abandoned FROM ranked
        QUALIFY row_number() OVER (ORDER BY type_rank, task_type) <= $limit
        ORDER BY abandoned DESC, created_at DESC, trajectory_id
    """, {"origin": ORIGIN, "limit": limit, "lowest": config.tiers.names[-1]}).to_arrow_table().to_pylist()


def correction_lines(failures: list[dict], teacher, now: datetime, domain=None) -> tuple[list[dict], Counter]:
    """Landing lines for the failures the teacher solved, and why the others were skipped
    (no_matching_task: the request is none of the domain's tasks, so nothing could check an
    answer; teacher_rejected: the teacher's answer failed the checker)."""
    domain = domain or getattr(teacher, "domain", None)
    lines, skipped = [], Counter()
    for failure in failures:
        task = domain.task_for([{"role": "user", "content": failure["user_prompt"]}], failure["trajectory_id"])
        if task is None:
            skipped["no_matching_task"] += 1
            continue
        line = teacher.trajectory(task)
        if line is None:
            skipped["teacher_rejected"] += 1
            continue
        line.update(trajectory_id=f"correction-{failure['trajectory_id']}", origin=ORIGIN,
                    tenant_id=failure.get("tenant_id") or "default",
                    corrects=failure["trajectory_id"], created_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        lines.append(line)
    return lines, skipped


def to_jsonl(lines: list[dict]) -> str:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
