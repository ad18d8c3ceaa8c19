"""The training stage's jobs: the base model, and a cycle (dataset → adapter → evaluation)."""

import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.resources import training_run_tags

cycle_job = dg.define_asset_job(
    "cycle_job", selection=dg.AssetSelection.assets(
        "training_dataset", "lora_adapter", "offline_eval", "flywheel_velocity", "loop_health"),
    partitions_def=cycle_partitions, tags=training_run_tags(),
    description="One training cycle: dataset → LoRA adapter → offline evaluation and promotion gate, then the "
                "flywheel's velocity and loop health refreshed with it.",
)

base_model_job = dg.define_asset_job(
    "base_model_job", selection=dg.AssetSelection.assets("base_model"), tags=training_run_tags(),
    description="Build (or reuse) the base model from the ingested cold-start trajectories.",
)
