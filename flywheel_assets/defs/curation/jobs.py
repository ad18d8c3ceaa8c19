import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions

dataset_job = dg.define_asset_job(
    "dataset_job", selection=dg.AssetSelection.assets("training_dataset"), partitions_def=cycle_partitions,
    description="Build one cycle's immutable training set (and run its blocking checks).",
)

cycle_job = dg.define_asset_job(
    "cycle_job", selection=dg.AssetSelection.assets(
        "training_dataset", "lora_adapter", "offline_eval", "flywheel_velocity", "loop_health"),
    partitions_def=cycle_partitions,
    description="One training cycle: dataset → LoRA adapter → offline evaluation and promotion gate, then the "
                "flywheel's velocity and loop health refreshed with it.",
)

bootstrap_job = dg.define_asset_job(
    "bootstrap_job", selection=dg.AssetSelection.assets("cold_start_trajectories"),
    description="Phase 0: write golden and teacher trajectories into the landing zone (landing_sensor ingests them).",
)

base_model_job = dg.define_asset_job(
    "base_model_job", selection=dg.AssetSelection.assets("base_model"),
    description="Build (or reuse) the base model from the ingested cold-start trajectories.",
)
