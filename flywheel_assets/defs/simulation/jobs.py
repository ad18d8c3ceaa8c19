"""The simulation stage's jobs (demo mode: the cold start, simulated days)."""

import dagster as dg

bootstrap_job = dg.define_asset_job(
    "bootstrap_job", selection=dg.AssetSelection.assets("cold_start_trajectories"),
    description="Phase 0: write golden and teacher trajectories into the landing zone (landing_sensor ingests them).",
)

simulated_usage_job = dg.define_asset_job(
    "simulated_usage_job", selection=dg.AssetSelection.assets("simulated_usage"),
    description="One simulated day of usage into the landing zone (demo mode); the flywheel clock moves past it.",
)
