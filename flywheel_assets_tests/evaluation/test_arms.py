"""The comparison arms' data: each cycle's rows as its manifest saw them, a selection per cycle,
the teacher budget spent on random tasks, the loop without its teacher."""

from __future__ import annotations

import json

import pyarrow as pa

from flywheel_assets.lib.curation.curate import prompt_key
from flywheel_assets.lib.domains import prompt_key as request_key
from flywheel_assets.lib.domains.builtin import BuiltinDomain
from flywheel_assets.lib.evaluation import arms
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, DATASET_MANIFESTS, TRAJECTORIES


def _rows(origin: str, n: int, tier: str = "gold", start: int = 0) -> list[dict]:
    return [{"trajectory_id": f"{origin}-{i}", "session_id": f"s-{origin}-{i}", "task_type": "calc", "tier": tier,
             "weight": 2.0, "combined_score": 0.8, "messages_json": json.dumps([{"role": "user", "content": f"{origin} {i}"}]),
             "tools_json": "[]", "prompt_key": prompt_key(f"{origin} {i}"), "dedup_status": "kept", "split": "train",
             "origin": origin} for i in range(start, start + n)]


def _land(lake, rows: list[dict]) -> None:
    lake.append(TRAJECTORIES, pa.Table.from_pylist([{"trajectory_id": r["trajectory_id"], "origin": r["origin"]}
                                                    for r in rows]))
    lake.append(CURATED_TRAJECTORIES, pa.Table.from_pylist(rows))


def _manifest(lake, cycle: str) -> None:
    versions = lake.versions(CURATED_TRAJECTORIES, TRAJECTORIES)
    lake.append(DATASET_MANIFESTS, pa.Table.from_pylist([{"cycle": cycle, "input_versions_json": json.dumps(versions)}]))


def test_each_cycle_sees_the_rows_its_manifest_saw_not_the_table_of_today(lake, config):
    _land(lake, _rows("golden", 30) + _rows("usage", 40) + _rows("correction", 10))
    _manifest(lake, "cycle-0001")
    _land(lake, _rows("usage", 50, start=40) + _rows("correction", 20, start=10))
    _manifest(lake, "cycle-0002")
    # curation later rewrote history: de-duplication kept other copies of cold-start rows
    lake.overwrite(CURATED_TRAJECTORIES, pa.Table.from_pylist(
        [{**r, "dedup_status": "exact_duplicate"} for r in _rows("golden", 30)]))

    first, second = arms.cycle_data(lake, "cycle-0001"), arms.cycle_data(lake, "cycle-0002")
    origins = lambda data: sorted(set(data.curated.column("origin").to_pylist()))  # noqa: E731
    assert first.curated.num_rows == 80 and second.curated.num_rows == 150
    assert origins(first) == ["correction", "golden", "usage"]
    config.curation.target_size = 100  # budgets: gold 200 and more than enough for every row here
    assert len(arms.control_rows(first, config)) == 30  # every golden row, kept at that version
    no_teacher = arms.no_teacher_rows(second, config)
    assert len(no_teacher) == 120 and not [r for r in no_teacher if r["trajectory_id"].startswith("correction")]


def test_the_control_draws_another_selection_each_cycle(lake, config):
    _land(lake, _rows("golden", 400))
    _manifest(lake, "cycle-0001")
    _manifest(lake, "cycle-0002")
    config.curation.target_size = 100  # gold budget 200 of 400
    config.curation.spare_to_better_tiers = False
    one = {r["trajectory_id"] for r in arms.control_rows(arms.cycle_data(lake, "cycle-0001"), config)}
    two = {r["trajectory_id"] for r in arms.control_rows(arms.cycle_data(lake, "cycle-0002"), config)}
    again = {r["trajectory_id"] for r in arms.control_rows(arms.cycle_data(lake, "cycle-0001"), config)}
    assert len(one) == len(two) == 200
    assert one == again  # deterministic per cycle
    assert 60 < len(one & two) < 140  # two independent halves of 400 share about 100


def test_the_teacher_budget_arm_spends_each_correction_on_a_random_task_never_a_held_out_one(lake, config):
    _land(lake, _rows("golden", 20) + _rows("usage", 30) + _rows("correction", 40))
    _manifest(lake, "cycle-0001")
    domain = BuiltinDomain()
    teacher = arms.RandomTeacher(domain, seed=11, pool_size=3000)
    config.curation.target_size = 100
    rows = arms.teacher_budget_rows(arms.cycle_data(lake, "cycle-0001"), config, teacher)
    ids = [r["trajectory_id"] for r in rows]
    assert sorted(ids) == sorted([f"golden-{i}" for i in range(20)] + [f"correction-{i}" for i in range(40)])
    heldout = domain.heldout_keys()
    replaced = [r for r in rows if r["trajectory_id"].startswith("correction")]
    for row in replaced:
        messages = json.loads(row["messages_json"])
        assert request_key(messages) not in heldout
        assert any(m.get("tool_calls") for m in messages)  # a real teacher answer, not the correction's text
        assert row["tier"] == "gold" and row["weight"] == 2.0  # its place in the dataset is the correction's
    assert len({r["messages_json"] for r in replaced}) > 30  # random tasks, not one repeated
    # the same correction gets the same task again (cycle after cycle)
    again = arms.teacher_budget_rows(arms.cycle_data(lake, "cycle-0001"), config, arms.RandomTeacher(domain, 11, 3000))
    assert {r["trajectory_id"]: r["messages_json"] for r in again} == {r["trajectory_id"]: r["messages_json"] for r in rows}


def test_a_correction_the_loop_could_never_train_on_is_not_spent_by_the_teacher_budget_arm(lake, config):
    # correction-0 answers a prompt that is also in the holdout split: the loop's selection
    # excludes it, so the arm must not turn it into an eligible random task either
    holdout = {**_rows("usage", 1)[0], "split": "holdout", "prompt_key": prompt_key("correction 0")}
    _land(lake, _rows("golden", 5) + _rows("correction", 6) + [holdout])
    _manifest(lake, "cycle-0001")
    config.curation.target_size = 100
    data = arms.cycle_data(lake, "cycle-0001")
    loop = set(arms.select_training_rows(data.curated, "cycle-0001", config).column("trajectory_id").to_pylist())
    spent = {r["trajectory_id"] for r in arms.teacher_budget_rows(
        data, config, arms.RandomTeacher(BuiltinDomain(), seed=11, pool_size=500))}
    assert "correction-0" not in loop
    assert {i for i in spent if i.startswith("correction")} == {i for i in loop if i.startswith("correction")}


def test_lineage_follows_the_champion_back_through_its_parents_only():
    class Registry:
        rows = {"base-v0": {"version": "base-v0", "adapter_path": None, "parent": None},
                "cycle-0001-lora": {"version": "cycle-0001-lora", "adapter_path": "a1", "parent": "base-v0"},
                "cycle-0002-lora": {"version": "cycle-0002-lora", "adapter_path": "a2", "parent": "cycle-0001-lora"},
                "cycle-0003-lora": {"version": "cycle-0003-lora", "adapter_path": "a3", "parent": "cycle-0001-lora"}}

        def get(self, version):
            return self.rows[version]

    registry = Registry()
    # cycle 2 was rolled back: cycle 3 trained over cycle 1, and the champion's lineage is 1 → 3
    assert [r["version"] for r in arms.lineage(registry, registry.get("cycle-0003-lora"))] == \
        ["cycle-0001-lora", "cycle-0003-lora"]
    assert arms.lineage(registry, registry.get("base-v0")) == []
