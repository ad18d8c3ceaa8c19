"""The model half through Dagster on a temporary FLYWHEEL_HOME, with small settings:
cold start → ingest → base model → dataset → adapter → evaluation and gate → registry."""

import json

import dagster as dg

from flywheel_assets.defs.curation.assets import curated_trajectories, training_dataset
from flywheel_assets.defs.evaluation.assets import offline_eval, promotion_gate
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.simulation.assets import cold_start_trajectories
from flywheel_assets.defs.training.assets import base_model, lora_adapter
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.tables import OFFLINE_EVALUATIONS

SMALL = {
    "cold_start": {"synthetic_trajectories": 300},
    "base_model": {"hidden_size": 64, "layers": 2, "intermediate_size": 128, "pretrain_steps": 60},
    "lora": {"steps": 8, "rank": 8, "alpha": 16, "batch_size": 8},
    "evaluation": {"tasks": 60},
    "curation": {"target_size": 200},
}


def test_cold_start_to_gated_candidate(home, lake):
    (home / "config.json").write_text(json.dumps(SMALL))
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    instance = dg.DagsterInstance.ephemeral()
    first = dg.materialize([cold_start_trajectories, bronze_ingest, session_feedback, judge_scores,
                            trajectory_scores, curated_trajectories, base_model],
                           resources=resources, instance=instance)
    assert first.success
    registry = ModelRegistry(lake)
    champion = registry.champion()
    assert champion["version"].startswith("base-") and champion["traffic_share"] == 1.0
    base_card = json.loads((home / champion["base_path"] / "training_card.json").read_text())
    assert base_card["examples"] >= 300 and len(base_card["loss_curve"]) > 1
    assert base_card["loss_curve"][-1][1] < base_card["loss_curve"][0][1]

    # the same inputs again: the base is reused, not retrained
    again = dg.materialize([base_model], resources=resources, instance=instance)
    assert again.success and len(registry.history()) == 1

    instance.add_dynamic_partitions("cycle", ["c1"])
    cycle = dg.materialize([training_dataset, lora_adapter, offline_eval, promotion_gate], partition_key="c1",
                           resources=resources, instance=instance, raise_on_error=False)
    assert cycle.success
    gate = [e for e in cycle.get_asset_check_evaluations() if e.check_name == "promotion_gate"]
    assert len(gate) == 1
    candidate = registry.get("c1-lora")
    assert (candidate["status"], candidate["parent"], candidate["cycle"]) == ("candidate", champion["version"], "c1")
    card = json.loads((home / candidate["adapter_path"] / "training_card.json").read_text())
    assert card["base_weights_sha256"] == base_card["weights_sha256"]
    assert card["dataset"]["export_path"] == "datasets/c1/train.jsonl"
    traced = json.loads((home / candidate["adapter_path"] / "trajectory_ids.json").read_text())
    assert len(traced) == card["dataset"]["n_rows"]
    rows = lake.read(OFFLINE_EVALUATIONS).to_pylist()
    overall = {r["role"]: r for r in rows if r["scope"] == "overall"}
    assert overall["candidate"]["n"] == overall["champion"]["n"] == 60
    assert gate[0].passed == overall["candidate"]["gate_passed"]
