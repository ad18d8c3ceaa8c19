"""The ingest stage's jobs."""

import dagster as dg

# Ingest, then refresh everything scored from the bronze tables (not the per-cycle dataset).
ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.groups("ingest", "feedback") | dg.AssetSelection.assets("curated_trajectories"),
    description="Landing files → bronze → feedback scores → curated trajectories.",
)
