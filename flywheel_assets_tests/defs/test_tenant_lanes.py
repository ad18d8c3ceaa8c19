"""Isolated and hybrid tenants through Dagster with real training, on the shipped demo log's two
tenants (globex isolated, acme hybrid): each lane's dataset holds its tenant's rows only, its
adapter's whole lineage was trained on no other tenant's usage, the gate compares it with the
version serving its users, and the router never serves a tenant another tenant's private model."""

import json

import dagster as dg

from flywheel_assets.defs.curation.assets import curated_trajectories, training_dataset
from flywheel_assets.defs.curation.checks import training_set_tenancy
from flywheel_assets.defs.evaluation.assets import offline_eval
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.training.assets import base_model, lora_adapter
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.simulation.seed import seed_demo_usage, write_cold_start
from flywheel_assets.lib.tables import OFFLINE_EVALUATIONS, TRAINING_DATASET, TRAJECTORIES
from flywheel_assets_tests.defs.test_model_chain import SMALL

PROFILE = {**SMALL, "tenancy": {"policies": {"globex": "isolated", "acme": "hybrid"}}}


def test_private_lanes_train_gate_and_serve_only_their_tenants_data(home, lake):
    (home / "config.json").write_text(json.dumps(PROFILE))
    config = load_config(home, str(home / "config.json"))
    write_cold_start(config)
    seed_demo_usage(config)
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories,
                           base_model], resources=resources, instance=instance).success
    registry = resources["flywheel"].registry()
    base = registry.champion()["version"]

    def cycle(key, *extra):
        instance.add_dynamic_partitions("cycle", [key])
        result = dg.materialize([training_dataset, training_set_tenancy, lora_adapter, *extra], partition_key=key,
                                resources=resources, instance=instance,
                                selection=[training_dataset, lora_adapter, *extra])
        assert result.success
        [check] = result.get_asset_check_evaluations()
        assert check.passed and check.metadata["rows_checked"].value > 0
        return registry.get(f"{key}-lora")

    shared = cycle("cycle-0001")
    registry.transition(shared["version"], "canary", reason="test", actor="test")
    registry.transition(shared["version"], "champion", reason="test: shipped", actor="test")
    isolated = cycle("cycle-0001@globex", offline_eval)
    hybrid = cycle("cycle-0001@acme")

    tenant_of = {r["trajectory_id"]: r["tenant_id"] or "default" for r in
                 lake.read(TRAJECTORIES, columns=["trajectory_id", "tenant_id"]).to_pylist()}
    datasets = {}
    for row in lake.read(TRAINING_DATASET, columns=["cycle", "trajectory_id"]).to_pylist():
        datasets.setdefault(row["cycle"], set()).add(tenant_of[row["trajectory_id"]])
    assert datasets == {"cycle-0001": {"default"}, "cycle-0001@globex": {"globex"}, "cycle-0001@acme": {"acme"}}

    # what each adapter's whole lineage was trained on, read from the files kept beside the weights
    def lineage_tenants(version: dict) -> set[str]:
        tenants = set()
        while version is not None:
            if version["adapter_path"]:
                ids = json.loads((home / version["adapter_path"] / "trajectory_ids.json").read_text())
                tenants |= {tenant_of[t] for t in ids}
            version = registry.get(version["parent"]) if version["parent"] else None
        return tenants

    assert isolated["parent"] == base and lineage_tenants(isolated) == {"globex"}
    # hybrid (README Tenancy): its own adapter on acme's rows only, over the shared lane (pooled data only)
    own = {tenant_of[t] for t in json.loads((home / hybrid["adapter_path"] / "trajectory_ids.json").read_text())}
    assert own == {"acme"} and hybrid["parent"] == shared["version"]
    assert lineage_tenants(registry.get(hybrid["parent"])) == {"default"}
    assert json.loads(hybrid["metadata_json"])["lane"] == "acme"
    # the gate compares the isolated candidate with what serves globex now: the base, not the shared champion
    evaluated = {r["role"]: r["version"] for r in lake.read(OFFLINE_EVALUATIONS).to_pylist()
                 if r["cycle"] == "cycle-0001@globex" and r["scope"] == "overall"}
    assert evaluated == {"candidate": isolated["version"], "champion": base}

    registry.transition(isolated["version"], "canary", traffic_share=0.5, reason="test", actor="test")
    registry.transition(hybrid["version"], "canary", traffic_share=0.5, reason="test", actor="test")
    router = registry.router()
    allowed = {"globex": {"globex"}, "acme": {"acme", "default"}, "default": {"default"}, "initech": {"default"}}
    for tenant, may in allowed.items():
        served = {router(f"user-{u}", tenant) for u in range(2000)}
        assert len(served) == (2 if tenant in ("globex", "acme") else 1)
        for version in served:
            assert lineage_tenants(registry.get(version)) <= may, (tenant, version)
