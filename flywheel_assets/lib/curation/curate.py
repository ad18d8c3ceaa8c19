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
import numpy as np
import polars as pl
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.columnar import plain_conversations, prompt_texts
from flywheel_assets.lib.curation.dedup import (
    NUM_PERM, find_duplicates, lsh_keys, minhash_signatures, normalize, text_signatures,
)
from flywheel_assets.lib.curation.scrub import holds_a_hint, may_need_scrubbing, scrub_messages
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
    output_edited event (what a product learns from an edit is the edited text); two at one
    ts: the larger event_id, so every read of the same events picks the same."""
    con = duckdb.connect()
    con.register("events", events)
    return dict(con.execute("""
        SELECT trajectory_id, arg_max(json_extract_string(data_json, '$.edited_answer'), (ts, event_id))
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


SCORE_FIELDS = ("trajectory_id", "session_id", "tenant_id", "task_type", "tier", "weight", "combined_score",
                "human_verified", "origin", "created_day")
CONTENT_FIELDS = ("messages_json", "tools_json", "prompt_key", "pii_replacements", "pii_kinds", "user_edited",
                  "lsh_keys")


def score_fields(scores: list[dict], config: FlywheelConfig) -> list[dict]:
    """Curated rows' fields that follow their trajectory_scores rows (`scores`: SCORE_FIELDS each),
    split included: the dicts of `scores`, completed in place."""
    fraction, trains = config.curation.holdout_fraction, {}
    for score in scores:
        if (tenant := score["tenant_id"]) not in trains:
            trains[tenant] = config.tenancy.trains_on(tenant)
        if not trains[tenant]:  # never trained on; not held out either (the held-out set stays the trained users')
            score["split"] = "opt_out"
        # golden and synthetic data is never held out: it is not a sample of live usage
        elif score["origin"] == "usage" and in_holdout(score["session_id"] or score["trajectory_id"], fraction):
            score["split"] = "holdout"
        else:
            score["split"] = "train"
    return scores


def content_fields(trajectories: pa.Table, edits: dict[str, str], config: FlywheelConfig,
                   signatures: Signatures) -> list[dict]:
    """CONTENT_FIELDS of each logged trajectory (`trajectories`: trajectory_id, turns, tool_calls,
    tools_json, user_prompt): its conversation as chat messages, the final answer replaced by its
    user's edit (`edits`: user_edits), scrubbed, and its LSH keys. Plain conversations that need
    no edit and no scrubbing are built in Arrow (columnar.py), the others one by one."""
    built = plain_conversations(trajectories)
    ids = trajectories.column("trajectory_id").to_pylist()
    plain = (built["plain"] & pl.Series(ids, dtype=pl.String).is_in(list(edits)).not_()
             & holds_a_hint(built["joined"]).not_()).to_list()
    messages_json, texts, normalized = (built[name].to_list() for name in ("messages_json", "text", "normalized"))
    tools, prompts = (trajectories.column(name).to_pylist() for name in ("tools_json", "user_prompt"))
    rows: list[dict] = []
    others: list[int] = []  # the rows built one by one
    for index, is_plain in enumerate(plain):
        if not is_plain:
            others.append(index)
            rows.append({})
            continue
        signatures.learn(messages_json[index], normalized[index] or normalize(texts[index]))
        rows.append({"messages_json": messages_json[index], "pii_replacements": 0, "pii_kinds": "",
                     "user_edited": False})
    for index, content in zip(others, _one_by_one(trajectories.take(pa.array(others, pa.int64())).to_pylist(),
                                                  edits, signatures)):
        rows[index] = content
    for row, tools_json, prompt, text in zip(rows, tools, prompts, prompt_texts(trajectories.column("user_prompt"))):
        row["tools_json"] = tools_json
        row["prompt_key"] = prompt_key(prompt) if text is None else hashlib.md5(text.encode()).hexdigest()
    keys = lsh_keys(signatures.of(rows), config.curation.near_duplicate_jaccard)
    for row, row_keys in zip(rows, keys.tolist()):
        row["lsh_keys"] = row_keys
    return rows


def _one_by_one(trajectories: list[dict], edits: dict[str, str], signatures: Signatures) -> list[dict]:
    """content_fields' messages, scrubbing and text of conversations, one at a time."""
    rows, conversations, edited = [], [], []
    for trajectory in trajectories:
        conversations.append(messages := to_messages(trajectory["turns"], trajectory["tool_calls"]))
        edited.append(apply_edit(messages, edits.get(trajectory["trajectory_id"])))
    for messages, user_edited, check in zip(conversations, edited, may_need_scrubbing(conversations)):
        messages, found = scrub_messages(messages) if check else (messages, {})
        messages_json = json.dumps(messages, ensure_ascii=False)
        signatures.learn(messages_json, normalize(_conversation_text(messages)))
        rows.append({"messages_json": messages_json, "pii_replacements": sum(found.values()),
                     "pii_kinds": ",".join(sorted(found)), "user_edited": user_edited})
    return rows


class Signatures:
    """The normalized de-duplication texts of rows (from messages_json) and their MinHash
    signatures, each made once however often a run asks."""

    def __init__(self, config: FlywheelConfig):
        self.seed = config.curation.seed
        self._slot: dict[str, int] = {}  # messages_json -> its row of _signatures
        self._signatures = text_signatures([], seed=self.seed)
        self._normalized: dict[str, str] = {}

    def learn(self, messages_json: str, normalized: str) -> None:
        """The normalized text of messages_json, from the messages it encodes (no parsing back)."""
        self._normalized.setdefault(messages_json, normalized)

    def normalized(self, messages_json: str) -> str:
        if (text := self._normalized.get(messages_json)) is None:
            text = self._normalized[messages_json] = normalize(_dedup_text(messages_json))
        return text

    def of(self, rows: list[dict]) -> np.ndarray:
        texts = [row["messages_json"] for row in rows]
        if missing := [text for text in dict.fromkeys(texts) if text not in self._slot]:
            self._slot.update(zip(missing, range(len(self._signatures), len(self._signatures) + len(missing))))
            self._signatures = np.concatenate([self._signatures, minhash_signatures(
                [self.normalized(text) for text in missing], NUM_PERM, self.seed)])
        return self._signatures[np.fromiter(map(self._slot.__getitem__, texts), np.int64, len(texts))]


def mark_duplicates(rows: list[dict], config: FlywheelConfig, signatures: Signatures) -> None:
    """Set each row's dedup_status and duplicate_of, de-duplicating within each lane (lib/tenancy.py):
    a private tenant's copy never hides a pooled one from the shared lane's datasets, nor the
    reverse. `rows` must hold whole duplicate groups: a row's status depends on its group only."""
    lanes: dict[str, list[dict]] = {}
    for row in rows:
        lanes.setdefault(config.tenancy.lane(row["tenant_id"]), []).append(row)
    for members in lanes.values():
        members = _sharing_a_key(members)
        texts = [signatures.normalized(row["messages_json"]) for row in members]
        statuses = find_duplicates(
            [row["trajectory_id"] for row in members],
            texts,
            # a copy that may be trained on is kept before an opted-out tenant's, whatever their scores
            [row["combined_score"] + (2.0 if row["human_verified"] else 0.0)
             - (10.0 if row["split"] == "opt_out" else 0.0) for row in members],
            near_threshold=config.curation.near_duplicate_jaccard,
            signatures=signatures.of(members),
            normalized=texts,
        )
        for row, (status, duplicate_of) in zip(members, statuses):
            row["dedup_status"], row["duplicate_of"] = status, duplicate_of


def _sharing_a_key(rows: list[dict]) -> list[dict]:
    """The rows that share an LSH band key with another row; the others are kept (no other row is
    a candidate to duplicate them: copies and near copies share band keys), and need no signature."""
    keys = [row["lsh_keys"] for row in rows]
    if not rows or any(not row_keys or len(row_keys) != len(keys[0]) for row_keys in keys):
        return rows  # (keys missing or uneven: no row can be set aside)
    _, index, counts = np.unique(np.array(keys, np.int64), return_inverse=True, return_counts=True)
    shared = (counts[index.reshape(len(rows), -1)] > 1).any(axis=1)
    for row in (row for row, sharing in zip(rows, shared) if not sharing):
        row["dedup_status"], row["duplicate_of"] = "kept", None
    return [row for row, sharing in zip(rows, shared) if sharing]


def curate(scores: pa.Table, trajectories: pa.Table, config: FlywheelConfig,
           edits: dict[str, str] | None = None) -> pa.Table:
    """One row per scored and logged trajectory (CURATED_TRAJECTORIES), computed from scratch;
    `edits` (user_edits) replace the final answers users edited."""
    con = duckdb.connect()
    con.register("scores", scores)
    con.register("trajectories", trajectories)
    joined = con.execute(f"""
        SELECT {', '.join(f's.{name}' for name in SCORE_FIELDS)}, t.turns, t.tool_calls, t.tools_json, t.user_prompt
        FROM scores s JOIN trajectories t USING (trajectory_id) ORDER BY s.trajectory_id
    """).to_arrow_table()
    signatures = Signatures(config)
    contents = content_fields(joined, edits or {}, config, signatures)
    rows = score_fields(joined.select(list(SCORE_FIELDS)).to_pylist(), config)
    for row, content in zip(rows, contents):
        row.update(content)
    mark_duplicates(rows, config, signatures)
    return conform(pa.Table.from_pylist(rows) if rows else CURATED_TRAJECTORIES.schema.empty_table(),
                   CURATED_TRAJECTORIES)


def _dedup_text(messages_json: str) -> str:
    return _conversation_text(json.loads(messages_json))


def _conversation_text(messages: list[dict]) -> str:
    """The conversation without the system prompt, which every row of a deployment shares."""
    parts = []
    for message in messages:
        if message["role"] == "system":
            continue
        parts.append(f"{message['role']}: {message.get('content') or ''}")
        for call in message.get("tool_calls") or []:
            parts.append(f"call {call['function']['name']} {call['function']['arguments']}")
    return "\n".join(parts)
