"""Phase 0 of the flywheel: golden and teacher-made trajectories, written to the landing zone."""

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.simulation.seed import write_cold_start


@dg.asset(group_name="simulation", kinds={"python"})
def cold_start_trajectories(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Golden trajectories plus synthetic ones from the teacher (reward 0.8), dropped into the landing zone."""
    config = flywheel.config()
    counts = write_cold_start(config)
    return dg.MaterializeResult(metadata={
        "teacher": config.cold_start.teacher, "synthetic_written": counts["synthetic_trajectories"],
        "teacher_rejects": counts["teacher_rejects"], "landing": str(config.landing / "trajectories"),
    })
