"""The curation stage's jobs."""

import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions

dataset_job = dg.define_asset_job(
    "dataset_job", selection=dg.AssetSelection.assets("training_dataset"), partitions_def=cycle_partitions,
    description="Build one cycle's immutable training set (and run its blocking checks).",
)
