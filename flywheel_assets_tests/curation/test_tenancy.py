"""Tenancy policies: an opted-out tenant is served and analysed (scored, judged, curated) but never
trained on and never sent to the teacher; a blocking check stops a training set that holds its rows.
Isolated and hybrid tenants' lanes: test_lanes.py and defs/test_tenant_lanes.py."""

from __future__ import annotations

import json

import dagster as dg
import pyarrow as pa
import pytest

from flywheel_assets.defs.curation.assets import curated_trajectories, training_dataset
from flywheel_assets.defs.curation.checks import training_set_tenancy
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.config import TenancyConfig, load_config
from flywheel_assets.lib.feedback.corrections import failed_requests
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.simulation.seed import seed_demo_usage, write_cold_start
from flywheel_assets.lib.tables import (
    CURATED_TRAJECTORIES, DATASET_MANIFESTS, TRAINING_DATASET, TRAJECTORIES, TRAJECTORY_SCORES,
)


def test_the_policy_as_a_rule_and_as_sql():
    pooled_by_default = TenancyConfig(policies={"globex": "opt_out"})
    assert pooled_by_default.trains_on("acme") and pooled_by_default.trains_on(None)
    assert not pooled_by_default.trains_on("globex")
    assert pooled_by_default.trainable_sql("t") == "coalesce(t, 'default') NOT IN ('globex')"
    allow_list = TenancyConfig(default="opt_out", policies={"acme": "pooled", "o'brien": "pooled"})
    assert allow_list.trains_on("acme") and not allow_list.trains_on("globex") and not allow_list.trains_on(None)
    assert allow_list.trainable_sql("t") == "coalesce(t, 'default') IN ('acme', 'o''brien')"
    assert TenancyConfig(default="opt_out").trainable_sql() == "false" and TenancyConfig().trainable_sql() == "true"
    # isolated and hybrid tenants are trained on, each in its own lane (test_lanes.py)
    lanes = TenancyConfig(policies={"acme": "isolated", "globex": "hybrid", "initech": "opt_out"})
    assert lanes.trainable_sql("t") == "coalesce(t, 'default') NOT IN ('initech')"
    assert lanes.lane_sql("") == "coalesce(tenant_id, 'default') NOT IN ('acme', 'globex', 'initech')"
    assert lanes.lane_sql("acme", "t") == "coalesce(t, 'default') = 'acme'" and lanes.lane_sql("initech") == "false"
    with pytest.raises(ValueError, match="cannot be isolated"):
        TenancyConfig(policies={"default": "isolated"})  # the cold start and imported rows have no tenant
    with pytest.raises(ValueError, match="its name must be"):
        TenancyConfig(policies={"acme corp": "isolated"})  # a lane's name is in paths and partition keys


def test_each_rows_split_follows_its_tenant_its_origin_and_its_sessions_hash():
    import hashlib
    import random

    from flywheel_assets.lib.config import FlywheelConfig
    from flywheel_assets.lib.curation.curate import score_fields

    config = FlywheelConfig()
    config.tenancy.policies = {"nope": "opt_out"}
    config.curation.holdout_fraction = 0.3
    rng = random.Random(4)
    scores = [{"trajectory_id": f"t{index}-{rng.choice(['é', '✓', 'x'])}", "tenant_id": rng.choice(["default", "nope", None]),
               "origin": rng.choice(["usage", "usage", "golden", "synthetic", None]),
               "session_id": rng.choice([None, "", f"s{index % 40}", f"sé{index % 7}"])} for index in range(600)]

    def expected(score: dict) -> str:  # the rule as documented, one row at a time
        if score["tenant_id"] == "nope":
            return "opt_out"
        unit = score["session_id"] or score["trajectory_id"]
        held = int(hashlib.md5(unit.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < 0.3
        return "holdout" if score["origin"] == "usage" and held else "train"

    splits = score_fields(pa.Table.from_pylist(scores), config).column("split").to_pylist()
    assert splits == [expected(score) for score in scores]
    assert {"opt_out", "holdout", "train"} <= set(splits)


def test_an_opted_out_tenant_is_analysed_but_never_trained_on_nor_sent_to_the_teacher(home):
    (home / "config.json").write_text(json.dumps({"tenancy": {"policies": {"globex": "opt_out"}},
                                                  "cold_start": {"synthetic_trajectories": 100}}))
    config = load_config(home, str(home / "config.json"))
    write_cold_start(config)
    seed_demo_usage(config)  # the shipped demo log: tenants acme and globex
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories],
                          resources=resources, instance=instance).success
    lake = resources["flywheel"].lake()

    scored = lake.read(TRAJECTORY_SCORES, columns=["tenant_id"]).column("tenant_id").to_pylist()
    assert scored.count("globex") > 100  # analysed: scored like everyone
    curated = lake.read(CURATED_TRAJECTORIES, columns=["tenant_id", "split", "origin"]).to_pylist()
    assert {r["split"] for r in curated if r["tenant_id"] == "globex"} == {"opt_out"}
    assert {"train", "holdout"} <= {r["split"] for r in curated if r["tenant_id"] == "acme"}
    # the cold start is not a sample of live usage: never held out
    assert len(cold := [r["split"] for r in curated if r["origin"] != "usage"]) >= 100 and set(cold) == {"train"}

    instance.add_dynamic_partitions("cycle", ["c1"])
    cycle = dg.materialize([training_dataset, training_set_tenancy], partition_key="c1",
                           resources=resources, instance=instance, selection=[training_dataset])
    [check] = cycle.get_asset_check_evaluations()
    assert check.passed and check.metadata["rows_of_other_tenants"].value == 0
    tenants = {r["trajectory_id"]: r["tenant_id"] for r in lake.read(TRAJECTORIES, columns=["trajectory_id", "tenant_id"]).to_pylist()}
    trained = lake.read(TRAINING_DATASET, columns=["trajectory_id"]).column("trajectory_id").to_pylist()
    assert trained and not [t for t in trained if tenants[t] == "globex"]
    assert any(tenants[t] == "acme" for t in trained)

    # the teacher never sees globex's failed requests; with the default policy it would
    pooled = failed_requests(lake, load_config(home, None), 10_000)
    assert any(r["tenant_id"] == "globex" for r in pooled)
    assert {r["tenant_id"] for r in failed_requests(lake, config, 10_000)} == {"acme"}

    # a training set that holds a globex row (written by an older version, by hand): the check fails
    globex = next(t for t, tenant in tenants.items() if tenant == "globex")
    lake.append(TRAINING_DATASET, conform(pa.Table.from_pylist([{"cycle": "c2", "trajectory_id": globex}]),
                                          TRAINING_DATASET))
    lake.append(DATASET_MANIFESTS, conform(pa.Table.from_pylist([{  # its manifest: the dataset is kept as is
        "cycle": "c2", "n_rows": 1, "tier_counts_json": "{}", "task_type_counts_json": "{}", "input_versions_json": "{}",
        "export_path": "datasets/c2/train.jsonl", "content_sha256": ""}]), DATASET_MANIFESTS))
    instance.add_dynamic_partitions("cycle", ["c2"])
    checked = dg.materialize([training_dataset, training_set_tenancy], partition_key="c2",
                             resources=resources, instance=instance, selection=[training_dataset], raise_on_error=False)
    [check] = checked.get_asset_check_evaluations()
    assert not check.passed and check.metadata["tenants"].value == "globex"
