"""Selection: the seed's budgets, balanced across task types, deterministic for a seed."""

from __future__ import annotations

import json

import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.curate import prompt_key, to_messages
from flywheel_assets.lib.curation.select import count_by, export_chat_jsonl, select_training_rows
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES

WEIGHTS = {"platinum": 5.0, "gold": 2.0, "silver": 1.0, "bronze": 0.3}


def curated(counts: dict[tuple[str, str], int], **overrides) -> pa.Table:
    rows = []
    for (tier, task_type), n in counts.items():
        for i in range(n):
            rows.append({"trajectory_id": f"{tier}-{task_type}-{i}", "task_type": task_type, "tier": tier,
                         "weight": WEIGHTS[tier], "combined_score": 0.5, "messages_json": "[]", "tools_json": "[]",
                         "prompt_key": prompt_key(f"{tier}-{task_type}-{i}"), "dedup_status": "kept",
                         "split": "train", **overrides})
    return conform(pa.Table.from_pylist(rows), CURATED_TRAJECTORIES)


def test_budgets_follow_the_seed_for_target_n():
    config = FlywheelConfig()
    assert config.curation.budgets(config.tiers) == {"platinum": 200, "gold": 1000, "silver": 2500, "bronze": 500}
    small = config.model_copy(update={"curation": config.curation.model_copy(update={"target_size": 100})})
    assert small.curation.budgets(small.tiers) == {"platinum": 50, "gold": 200, "silver": 500, "bronze": 100}


def test_budget_caps_each_tier_and_balances_task_types():
    config = FlywheelConfig()
    config.curation.target_size = 100  # budgets 50 / 200 / 500 / 100
    config.curation.spare_to_better_tiers = False
    table = curated({("bronze", "calc"): 300, ("bronze", "lookup"): 20, ("bronze", "text"): 60,
                     ("gold", "calc"): 30, ("platinum", "calc"): 80})
    rows = select_training_rows(table, "c1", config)
    assert count_by(rows, "tier") == {"bronze": 100, "gold": 30, "platinum": 50}
    bronze = rows.filter(pa.compute.equal(rows.column("tier"), "bronze"))
    # round-robin: the scarce type gives all it has, the others share the rest equally
    assert count_by(bronze, "task_type") == {"calc": 40, "lookup": 20, "text": 40}
    assert sorted(bronze.column("selection_rank").to_pylist()) == list(range(1, 101))


def test_a_short_tier_leaves_its_budget_to_better_tiers_never_to_the_negatives():
    config = FlywheelConfig()
    config.curation.target_size = 100  # budgets 50 / 200 / 500 / 100: 850 rows in all
    table = curated({("platinum", "calc"): 80, ("gold", "calc"): 900, ("silver", "calc"): 40,
                     ("bronze", "calc"): 700})
    rows = select_training_rows(table, "c1", config)
    # silver fills 40 of its 500: the 460 left go to platinum (30 more: all it has), then gold (430)
    assert count_by(rows, "tier") == {"platinum": 80, "gold": 630, "silver": 40, "bronze": 100}
    assert rows.num_rows == sum(config.curation.budgets(config.tiers).values())


def test_selection_is_deterministic_for_a_seed_and_changes_with_it():
    config = FlywheelConfig()
    config.curation.target_size = 100
    table = curated({("bronze", "calc"): 500})
    first = select_training_rows(table, "c1", config).column("trajectory_id").to_pylist()
    shuffled = table.take(list(reversed(range(table.num_rows))))
    assert select_training_rows(shuffled, "c1", config).column("trajectory_id").to_pylist() == first
    config.curation.seed = 1
    other = select_training_rows(table, "c1", config).column("trajectory_id").to_pylist()
    assert len(other) == len(first) == 100 and set(other) != set(first)


def test_duplicates_holdout_and_leaked_prompts_are_never_selected():
    config = FlywheelConfig()
    table = pa.concat_tables([
        curated({("gold", "calc"): 3}),
        curated({("gold", "dup"): 2}, dedup_status="near_duplicate"),
        curated({("gold", "held"): 2}, split="holdout"),
    ])
    # a training row whose prompt equals a held-out prompt
    leaked = curated({("gold", "leak"): 1}).to_pylist()[0] | {"prompt_key": table.column("prompt_key")[5].as_py()}
    table = pa.concat_tables([table, conform(pa.Table.from_pylist([leaked]), CURATED_TRAJECTORIES)])
    rows = select_training_rows(table, "c1", config)
    assert sorted(rows.column("trajectory_id").to_pylist()) == ["gold-calc-0", "gold-calc-1", "gold-calc-2"]


def test_messages_link_tool_results_and_export_reads_back(tmp_path):
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": ""},
             {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]
    calls = [{"turn_index": 1, "name": "calculator", "arguments": '{"expression": "2+2"}'}]
    messages = to_messages(turns, calls)
    assert messages[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'}}]}
    assert messages[2] == {"role": "tool", "content": "4", "tool_call_id": "call_0"}
    rows = pa.Table.from_pylist([{"trajectory_id": "t1", "task_type": "calc", "tier": "gold", "weight": 2.0,
                                  "messages_json": json.dumps(messages), "tools_json": "[]"}])
    path = tmp_path / "train.jsonl"
    digest = export_chat_jsonl(rows, path)
    line = json.loads(path.read_text())
    assert line == {"messages": messages, "tools": [], "weight": 2.0, "tier": "gold", "task_type": "calc",
                    "trajectory_id": "t1"}
    assert len(digest) == 64 and not list(tmp_path.glob(".*"))


def test_the_teachers_corrections_are_taken_first_in_their_tier_and_balanced_among_themselves():
    config = FlywheelConfig()
    config.curation.target_size = 100  # gold budget 200
    config.curation.spare_to_better_tiers = False
    usage = curated({("gold", "calc"): 300, ("gold", "lookup"): 300}, origin="usage")
    fixes = curated({("gold", "calc"): 120, ("gold", "lookup"): 30}, origin="correction")
    fixes = fixes.set_column(0, "trajectory_id", pa.array([f"fix-{t}" for t in fixes.column("trajectory_id").to_pylist()]))
    table = pa.concat_tables([usage, fixes])
    picked = select_training_rows(table, "c1", config).to_pylist()
    assert len(picked) == 200
    assert sum(r["trajectory_id"].startswith("fix-") for r in picked) == 150  # every correction
    config.curation.corrections_first = False
    drawn = select_training_rows(table, "c1", config).to_pylist()
    assert sum(r["trajectory_id"].startswith("fix-") for r in drawn) < 100  # at random: about a fifth
    # a tier with more corrections than budget takes them round-robin over task types
    many = pa.concat_tables([usage, curated({("gold", "calc"): 300, ("gold", "lookup"): 300}, origin="correction")
                             .set_column(0, "trajectory_id", pa.array([f"fix-{i}" for i in range(600)]))])
    config.curation.corrections_first = True
    chosen = select_training_rows(many, "c1", config).to_pylist()
    assert all(r["trajectory_id"].startswith("fix-") for r in chosen)
    assert count_by(pa.Table.from_pylist(chosen), "task_type") == {"calc": 100, "lookup": 100}
