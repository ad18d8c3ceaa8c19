"""Conversations curated in Arrow come out byte for byte as the per-row path makes them."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation import curate
from flywheel_assets.lib.curation.columnar import plain_conversations
from flywheel_assets.lib.curation.dedup import normalize
from flywheel_assets.lib.tables import TRAJECTORIES

# quotes, backslashes, every escape json.dumps writes, control characters it writes as \uXXXX,
# Python-only whitespace (\x1c, \xa0), non-ASCII letters and digits, PII that scrubbing replaces
PIECES = ["word", "Mixed CASE", " ", "  ", "\x0b", '"', "\\", "\n", "\r", "\t", "\b", "\f", "\x00", "\x1c", "\x1f", "\x7f",
          "_", "-", "é", "ÉTÉ", "東京", "٣", "ß", "\xa0", "\u2028", "😀", "42", "a.b", "x_y", "jane@example.com",
          "sk-abcdefghijklmnopqrstu", "+1 415 555 0100"]


def random_conversations(seed: int, rows: int = 400) -> pa.Table:
    rng = random.Random(seed)

    def content():
        return None if rng.random() < 0.08 else "".join(rng.choice(PIECES[:rng.choice([20, len(PIECES)])])
                                                          for _ in range(rng.randrange(0, 6)))

    records = []
    for row in range(rows):
        turns = [{"role": rng.choice(["system", "user", "assistant", "tool"] + [None] * (rng.random() < 0.03)),
                  "content": content()} for _ in range(rng.randrange(0, 5))]
        calls = [{"turn_index": rng.randrange(0, 5), "name": rng.choice(["add", None]), "arguments": content(),
                  "result": None, "success": True} for _ in range(rng.randrange(0, 3) if rng.random() < 0.2 else 0)]
        records.append({"trajectory_id": f"t{row:04d}", "turns": turns, "tool_calls": calls if calls or row % 2 else None,
                        "tools_json": "[]", "user_prompt": content()})
    schema = pa.schema([TRAJECTORIES.schema.field(name) for name in
                        ("trajectory_id", "turns", "tool_calls", "tools_json", "user_prompt")])
    return pa.Table.from_pylist(records, schema=schema)


@pytest.mark.parametrize("seed", [0, 1])
def test_plain_conversations_are_built_as_the_per_row_path_builds_them(seed):
    table = random_conversations(seed)
    built = plain_conversations(table).to_dicts()
    plain = 0
    for record, row in zip(table.to_pylist(), built):
        simple = record["turns"] is not None and not record["tool_calls"] \
            and all(turn["role"] is not None for turn in record["turns"])
        messages = curate.to_messages(record["turns"], record["tool_calls"])
        dumped = json.dumps(messages, ensure_ascii=False)
        # plain: no tool calls, every turn a role, nothing json.dumps writes as \uXXXX
        assert row["plain"] == (simple and "\\u" not in dumped.replace("\\\\", "")), record
        if row["plain"]:
            plain += 1
            text = curate._conversation_text(messages)
            assert (row["messages_json"], row["text"]) == (dumped, text)
            assert row["normalized"] in (None, normalize(text))
            assert (row["normalized"] is None) == (not text.isascii())
            assert row["joined"] == "\n".join(message["content"] for message in messages
                                              if isinstance(message["content"], str))
    assert 60 < plain < 300  # both ways are exercised


@pytest.mark.parametrize("seed", [2, 3])
def test_content_fields_equal_the_per_row_path_for_every_row(seed):
    table = random_conversations(seed)
    config = FlywheelConfig()
    edits = {f"t{row:04d}": f"edited {row}" for row in range(0, 400, 7)}
    columnar = curate.Signatures(config)
    built = curate.content_fields(table, edits, config, columnar)
    assert built.column("trajectory_id").to_pylist() == table.column("trajectory_id").to_pylist()
    got = built.drop_columns(["trajectory_id"]).to_pylist()
    per_row = curate.Signatures(config)
    expected = curate._one_by_one(table.to_pylist(), edits, per_row)
    for row, record in zip(expected, table.to_pylist()):
        row["tools_json"], row["prompt_key"] = record["tools_json"], curate.prompt_key(record["user_prompt"])
    for row, keys in zip(expected, curate.lsh_keys(per_row.of([row["messages_json"] for row in expected]), config.curation.near_duplicate_jaccard)):
        row["lsh_keys"] = keys.tolist()
    assert got == expected
    assert [columnar.normalized(row["messages_json"]) for row in got] \
        == [normalize(curate._dedup_text(row["messages_json"])) for row in got]
    assert sum(row["pii_replacements"] > 0 for row in got) > 20 and sum(row["user_edited"] for row in got) > 5
