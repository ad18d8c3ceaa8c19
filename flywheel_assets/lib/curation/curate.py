"""Scored trajectories → chat messages that are safe to train on.

Every conversation is rebuilt as OpenAI chat messages, scrubbed of PII and
secrets, checked for exact and near duplicates, and assigned to the train or
holdout split by a hash of its session (so one session never straddles both).
"""

from __future__ import annotations

import hashlib
import json
import re

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.dedup import find_duplicates
from flywheel_assets.lib.curation.scrub import scrub_messages
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES

_SPACES = re.compile(r"\s+")


def to_messages(turns: list[dict], tool_calls: list[dict]) -> list[dict]:
    """Canonical turns and parsed calls as OpenAI chat messages (tool results linked by id)."""
    calls_by_turn: dict[int, list[dict]] = {}
    for call in tool_calls or []:
        calls_by_turn.setdefault(call["turn_index"], []).append(call)
    messages: list[dict] = []
    unanswered: list[str] = []
    counter = 0
    for index, turn in enumerate(turns):
        message: dict = {"role": turn["role"], "content": turn["content"]}
        if turn["role"] == "assistant" and index in calls_by_turn:
            message["tool_calls"] = []
            for call in calls_by_turn[index]:
                call_id = f"call_{counter}"
                counter += 1
                unanswered.append(call_id)
                message["tool_calls"].append({"id": call_id, "type": "function",
                                              "function": {"name": call["name"] or "", "arguments": call["arguments"]}})
            message["content"] = turn["content"] or None
        elif turn["role"] == "tool" and unanswered:
            message["tool_call_id"] = unanswered.pop(0)
        messages.append(message)
    return messages


def prompt_key(text: str | None) -> str:
    return hashlib.md5(_SPACES.sub(" ", (text or "").strip().lower()).encode()).hexdigest()


def in_holdout(unit: str, fraction: float) -> bool:
    return int(hashlib.md5(unit.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def user_edits(events: pa.Table) -> dict[str, str]:
    """trajectory_id → the answer the user made of it: data.edited_answer of its latest
    output_edited event (what a product learns from an edit is the edited text)."""
    con = duckdb.connect()
    con.register("events", events)
    return dict(con.execute("""
        SELECT trajectory_id, arg_max(json_extract_string(data_json, '$.edited_answer'), ts)
        FROM events
        WHERE event_type = 'output_edited' AND trajectory_id IS NOT NULL
          AND json_extract_string(data_json, '$.edited_answer') IS NOT NULL
        GROUP BY trajectory_id
    """).fetchall())


def apply_edit(messages: list[dict], edited: str | None) -> bool:
    """Replace the final answer by the user's edit; False when there is no final answer to replace."""
    if not edited or not messages or messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
        return False
    messages[-1]["content"] = edited
    return True


def curate(scores: pa.Table, trajectories: pa.Table, config: FlywheelConfig,
           edits: dict[str, str] | None = None) -> pa.Table:
    """One row per scored trajectory (CURATED_TRAJECTORIES); `edits` (user_edits) replace
    the final answers users edited."""
    edits = edits or {}
    con = duckdb.connect()
    con.register("scores", scores)
    con.register("trajectories", trajectories)
    joined = con.execute("""
        SELECT s.trajectory_id, s.session_id, s.tenant_id, s.task_type, s.tier, s.weight, s.combined_score,
               s.human_verified, s.origin, t.turns, t.tool_calls, t.tools_json, t.user_prompt
        FROM scores s JOIN trajectories t USING (trajectory_id) ORDER BY s.trajectory_id
    """).to_arrow_table().to_pylist()
    rows = []
    for row in joined:
        messages = to_messages(row["turns"], row["tool_calls"])
        user_edited = apply_edit(messages, edits.get(row["trajectory_id"]))
        messages, found = scrub_messages(messages)
        # golden and synthetic data is never held out: it is not a sample of live usage
        unit = row["session_id"] or row["trajectory_id"]
        holdout = row["origin"] == "usage" and in_holdout(unit, config.curation.holdout_fraction)
        split = "holdout" if holdout else "train"
        if not config.tenancy.trains_on(row["tenant_id"]):
            split = "opt_out"  # never trained on; not held out either (the held-out set stays the trained users')
        rows.append({
            "trajectory_id": row["trajectory_id"], "session_id": row["session_id"], "task_type": row["task_type"],
            "tier": row["tier"], "weight": row["weight"], "combined_score": row["combined_score"],
            "messages_json": json.dumps(messages, ensure_ascii=False), "tools_json": row["tools_json"],
            "prompt_key": prompt_key(row["user_prompt"]), "pii_replacements": sum(found.values()),
            "pii_kinds": ",".join(sorted(found)), "split": split, "tenant_id": row["tenant_id"],
            "user_edited": user_edited, "origin": row["origin"],
        })
    # De-duplicated within each lane (lib/tenancy.py): a private tenant's copy never hides a pooled
    # one from the shared lane's datasets, nor the reverse.
    lanes: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        lanes.setdefault(config.tenancy.lane(row["tenant_id"]), []).append(index)
    for members in lanes.values():
        statuses = find_duplicates(
            [rows[i]["trajectory_id"] for i in members],
            [_dedup_text(rows[i]["messages_json"]) for i in members],
            # a copy that may be trained on is kept before an opted-out tenant's, whatever their scores
            [rows[i]["combined_score"] + (2.0 if joined[i]["human_verified"] else 0.0)
             - (10.0 if rows[i]["split"] == "opt_out" else 0.0) for i in members],
            near_threshold=config.curation.near_duplicate_jaccard,
            seed=config.curation.seed,
        )
        for i, (status, duplicate_of) in zip(members, statuses):
            rows[i]["dedup_status"], rows[i]["duplicate_of"] = status, duplicate_of
    return conform(pa.Table.from_pylist(rows) if rows else CURATED_TRAJECTORIES.schema.empty_table(),
                   CURATED_TRAJECTORIES)


def _dedup_text(messages_json: str) -> str:
    """The conversation without the system prompt, which every row of a deployment shares."""
    messages = json.loads(messages_json)
    parts = []
    for message in messages:
        if message["role"] == "system":
            continue
        parts.append(f"{message['role']}: {message.get('content') or ''}")
        for call in message.get("tool_calls") or []:
            parts.append(f"call {call['function']['name']} {call['function']['arguments']}")
    return "\n".join(parts)
