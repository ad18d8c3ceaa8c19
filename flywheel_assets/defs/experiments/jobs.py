"""The experiments stage's jobs."""

import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions

ab_report_job = dg.define_asset_job(
    "ab_report_job",
    selection=dg.AssetSelection.assets("rollout_step", "ab_report", "flywheel_velocity", "loop_health"),
    partitions_def=cycle_partitions,
    description="A look at a cycle's candidate (the move ab_monitor decided), its A/B report, and the flywheel's "
                "velocity and loop health with it.")
