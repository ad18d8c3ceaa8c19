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
import pyarrow.compute as pc

from flywheel_assets.lib.arrays import per_row, rows_at
from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.columnar import plain_conversations, prompt_keys
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


def in_holdout(units: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """Whether each unit (a session, or a trajectory without one) is held out: the first 32 bits
    of its md5, as a fraction of 2^32 - 1, below `fraction`."""
    bits = per_row("('0x' || md5(value)[1:8])::UBIGINT", units).to_numpy().astype(np.float64)
    return np.nan_to_num(bits, nan=0xFFFFFFFF) / 0xFFFFFFFF < fraction  # (no unit: not held out)


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


def score_fields(scores: pa.Table, config: FlywheelConfig) -> pa.Table:
    """`scores` (SCORE_FIELDS of trajectory_scores rows) with the curated rows' split."""
    tenants = scores.column("tenant_id").to_pylist()
    trains = {tenant: config.tenancy.trains_on(tenant) for tenant in set(tenants)}
    trained = np.fromiter(map(trains.__getitem__, tenants), bool, len(tenants))
    # golden and synthetic data is never held out: it is not a sample of live usage
    usage = pc.fill_null(pc.equal(scores.column("origin"), "usage"), False).to_numpy(zero_copy_only=False)
    sessions = scores.column("session_id")
    units = pc.if_else(pc.fill_null(pc.not_equal(sessions, ""), False), sessions, scores.column("trajectory_id"))
    held = usage & in_holdout(units, config.curation.holdout_fraction)
    # a tenant never trained on is not held out either (the held-out set stays the trained users')
    split = np.where(trained, np.where(held, "holdout", "train"), "opt_out")
    return scores.append_column("split", pa.array(split, pa.string()))


def content_fields(trajectories: pa.Table, edits: dict[str, str], config: FlywheelConfig,
                   signatures: Signatures) -> pa.Table:
    """trajectory_id and CONTENT_FIELDS of each logged trajectory (`trajectories`: trajectory_id,
    turns, tool_calls, tools_json, user_prompt): its conversation as chat messages, the final
    answer replaced by its user's edit (`edits`: user_edits), scrubbed, and its LSH keys. Plain
    conversations that need no edit and no scrubbing are built in Arrow (columnar.py), the
    others one by one."""
    built = plain_conversations(trajectories)
    ids = trajectories.column("trajectory_id")
    plain = (built["plain"] & pl.Series(ids).is_in(list(edits)).not_() & holds_a_hint(built["joined"]).not_())
    messages_json, texts, normalized = (built[name].to_list() for name in ("messages_json", "text", "normalized"))
    del built
    count = len(messages_json)
    replacements, kinds, edited = [0] * count, [""] * count, [False] * count
    others: list[int] = []  # the rows built one by one
    for index, is_plain in enumerate(plain.to_list()):
        if is_plain:
            signatures.learn(messages_json[index], normalized[index] or normalize(texts[index]))
        else:
            others.append(index)
    for index, content in zip(others, _one_by_one(rows_at(trajectories, others).to_pylist(),
                                                  edits, signatures)):
        messages_json[index], replacements[index] = content["messages_json"], content["pii_replacements"]
        kinds[index], edited[index] = content["pii_kinds"], content["user_edited"]
    prompts = trajectories.column("user_prompt")
    keys_of_prompts = prompt_keys(prompts)  # (ASCII prompts: prompt_key in polars and DuckDB; the others here)
    if keys_of_prompts.null_count:
        keys_of_prompts = pa.array([key or prompt_key(prompt) for key, prompt
                                    in zip(keys_of_prompts.to_pylist(), prompts.to_pylist())], pa.string())
    keys = lsh_keys(signatures.of(messages_json), config.curation.near_duplicate_jaccard)
    return pa.table({
        "trajectory_id": ids, "messages_json": pa.array(messages_json, pa.string()),
        "tools_json": trajectories.column("tools_json"), "prompt_key": keys_of_prompts,
        "pii_replacements": pa.array(replacements, pa.int64()), "pii_kinds": pa.array(kinds, pa.string()),
        "user_edited": pa.array(edited, pa.bool_()),
        "lsh_keys": pa.FixedSizeListArray.from_arrays(keys.reshape(-1), keys.shape[1]).cast(pa.list_(pa.int64())),
    })


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

    def of(self, texts: list[str]) -> np.ndarray:
        """The signatures of messages_json texts."""
        if missing := [text for text in dict.fromkeys(texts) if text not in self._slot]:
            self._slot.update(zip(missing, range(len(self._signatures), len(self._signatures) + len(missing))))
            self._signatures = np.concatenate([self._signatures, minhash_signatures(
                [self.normalized(text) for text in missing], NUM_PERM, self.seed)])
        return self._signatures[np.fromiter(map(self._slot.__getitem__, texts), np.int64, len(texts))]


def mark_duplicates(rows: pa.Table, config: FlywheelConfig, signatures: Signatures) -> pa.Table:
    """`rows` (curated rows; dedup_status and duplicate_of may be missing) with each row's
    dedup_status and duplicate_of, de-duplicated within each lane (lib/tenancy.py): a private
    tenant's copy never hides a pooled one from the shared lane's datasets, nor the reverse.
    `rows` must hold whole duplicate groups: a row's status depends on its group only."""
    count = rows.num_rows
    statuses: list[str] = ["kept"] * count
    duplicate_of: list[str | None] = [None] * count
    tenants = rows.column("tenant_id").to_pylist()
    lane_of = {tenant: config.tenancy.lane(tenant) for tenant in set(tenants)}
    lanes = np.array([lane_of[tenant] for tenant in tenants], dtype=object)
    # a copy that may be trained on is kept before an opted-out tenant's, whatever their scores
    priority = (rows.column("combined_score").to_numpy(zero_copy_only=False).astype(np.float64)
                + 2.0 * pc.fill_null(rows.column("human_verified"), False).to_numpy(zero_copy_only=False)
                - 10.0 * pc.fill_null(pc.equal(rows.column("split"), "opt_out"), False).to_numpy(zero_copy_only=False))
    keys = rows.column("lsh_keys")
    for lane in set(lane_of.values()):
        members = np.flatnonzero(lanes == lane)
        members = members[_sharing_a_key(rows_at(keys, members))]
        if not len(members):
            continue
        messages = rows_at(rows.column("messages_json"), members).to_pylist()
        texts = [signatures.normalized(text) for text in messages]
        found = find_duplicates(rows_at(rows.column("trajectory_id"), members).to_pylist(), texts,
                                priority[members].tolist(), near_threshold=config.curation.near_duplicate_jaccard,
                                signatures=signatures.of(messages), normalized=texts)
        for member, (status, kept) in zip(members.tolist(), found):
            statuses[member], duplicate_of[member] = status, kept
    rows = rows.drop_columns([name for name in ("dedup_status", "duplicate_of") if name in rows.column_names])
    return rows.append_column("dedup_status", pa.array(statuses, pa.string())).append_column(
        "duplicate_of", pa.array(duplicate_of, pa.string()))


def _sharing_a_key(keys: pa.ChunkedArray) -> np.ndarray:
    """Which rows (their lsh_keys) share an LSH band key with another row. The others are kept (no
    other row is a candidate to duplicate them: copies and near copies share band keys) and need
    no signature."""
    lengths = pc.list_value_length(keys).to_numpy(zero_copy_only=False)
    if not len(keys) or keys.null_count or lengths.min() == 0 or lengths.min() != lengths.max():
        return np.ones(len(keys), bool)  # (keys missing or uneven: no row can be set aside)
    _, index, counts = np.unique(pc.list_flatten(keys).to_numpy(), return_inverse=True, return_counts=True)
    return (counts[index.reshape(len(keys), -1)] > 1).any(axis=1)


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
    rows = with_contents(score_fields(joined.select(list(SCORE_FIELDS)), config),
                         content_fields(joined, edits or {}, config, signatures))
    return conform(mark_duplicates(rows, config, signatures), CURATED_TRAJECTORIES)


def with_contents(scores: pa.Table, contents: pa.Table) -> pa.Table:
    """The rows of `contents` (trajectory_id and CONTENT_FIELDS) whose trajectory has a row in
    `scores` (SCORE_FIELDS and split), with that row's fields (the small columns move, not the
    texts)."""
    position = pc.index_in(contents.column("trajectory_id"), value_set=scores.column("trajectory_id"))
    if position.null_count:  # (filtering copies the texts)
        contents, position = contents.filter(pc.is_valid(position)), pc.drop_null(position)
    scores = scores.take(position)
    for name in scores.column_names:
        if name != "trajectory_id":
            contents = contents.append_column(name, scores.column(name))
    return contents


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
