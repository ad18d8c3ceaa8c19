"""The embedded default's users: phase 0's cold start, then a simulated day of usage per tick in demo mode."""

from datetime import datetime, timezone

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource, markdown_counts
from flywheel_assets.lib.simulation.daily import simulate_day, simulated_day
from flywheel_assets.lib.simulation.seed import write_cold_start
from flywheel_assets.lib.training.pipeline import set_threads


@dg.asset(group_name="simulation", kinds={"python"})
def cold_start_trajectories(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Golden trajectories plus synthetic ones from the teacher (reward 0.8), dropped into the landing zone."""
    config = flywheel.config()
    counts = write_cold_start(config)
    return dg.MaterializeResult(metadata={
        "teacher": config.cold_start.teacher, "synthetic_written": counts["synthetic_trajectories"],
        "teacher_rejects": counts["teacher_rejects"], "landing": str(config.landing / "trajectories"),
    })


class SimulatedDay(dg.Config):
    day: str | None = None  # YYYY-MM-DD; none: the day the flywheel clock is in


@dg.asset(group_name="simulation", kinds={"torch", "python"}, deps=["base_model"])
def simulated_usage(context: dg.AssetExecutionContext, config: SimulatedDay,
                    flywheel: FlywheelResource) -> dg.MaterializeResult:
    """One day of simulated users, routed by the registry to the versions it serves, into the landing zone (demo mode)."""
    settings = flywheel.config()
    off = settings.simulation_off()
    if off:
        raise dg.Failure(f"simulated users are off: {off}")
    registry = flywheel.registry()
    if registry.champion() is None:
        raise dg.Failure("no champion in the registry: materialize base_model first")
    day = (datetime.fromisoformat(config.day).replace(tzinfo=timezone.utc) if config.day
           else simulated_day(flywheel.now()))
    set_threads()
    counts = simulate_day(settings, registry, day)
    context.log.info(f"{counts['day']}: {counts['sessions']} sessions, {counts['trajectories']} trajectories, "
                     f"first-attempt success {counts['first_attempt_success']}; clock now {counts['clock']}")
    success = "\n".join(f"| {version} | {counts['users_per_version'].get(version, 0)} | {counts['first_attempts'][version]} "
                        f"| {rate:.1%} |" for version, rate in counts["first_attempt_success"].items())
    return dg.MaterializeResult(metadata={
        "day": counts["day"], "users": counts["users"], "sessions": counts["sessions"],
        "trajectories": counts["trajectories"], "events": sum(counts["events"].values()),
        "events_by_type": markdown_counts(counts["events"], "event", "events"),
        "versions": dg.MetadataValue.md("| version | users | first attempts | first-attempt success |\n"
                                        "|---|---:|---:|---:|\n" + success),
        "clock": counts["clock"], "landing": str(settings.landing),
    })
