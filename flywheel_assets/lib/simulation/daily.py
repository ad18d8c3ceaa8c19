"""Demo mode's simulated days: one day of usage per tick, and the flywheel clock moved past it.

Each tick simulates the day the flywheel clock is in (real time's today until
FLYWHEEL_HOME/clock.json exists), then moves the clock to the next midnight, as
`make demo` does: every trajectory of the day is then in the past, and the trigger's,
the A/B test's and the regression watch's rules measured in days pass in minutes of wall
time. Simulating "now" instead would land nothing new after a day's first tick (the
same day's ids repeat, and the ingester skips them) and keep the loop waiting for days.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from flywheel_assets.lib import clock
from flywheel_assets.lib.config import FlywheelConfig, SimulationConfig
from flywheel_assets.lib.domains import load_domain
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.simulation.users import UserSimulationConfig, simulate_usage
from flywheel_assets.lib.storage.artifacts import local
from flywheel_assets.lib.training.pipeline import load_for_inference


def simulated_day(now: datetime) -> datetime:
    """The day a tick at `now` (the flywheel clock) simulates: its midnight, UTC."""
    moment = now.astimezone(timezone.utc)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def user_settings(settings: SimulationConfig) -> UserSimulationConfig:
    return UserSimulationConfig(users=settings.users_per_tick, sessions_per_user=settings.sessions_per_user,
                                biased_users=settings.biased_users, seed=settings.seed)


def simulate_day(config: FlywheelConfig, registry: ModelRegistry, day: datetime) -> dict:
    """A day of usage routed by the registry into the landing zone; then the clock moves to
    the day's end (never backwards: a day simulated again leaves it where it is).
    Returns simulate_usage's counts plus the clock after."""

    def load_version(version: str) -> tuple:
        row = registry.get(version)
        adapter = local(config.home, row["adapter_path"]) if row["adapter_path"] else None
        return load_for_inference(local(config.home, row["base_path"]), adapter, merged=True)

    settings = user_settings(config.simulation)
    door = None
    if config.simulation.via_gateway:
        from flywheel_assets.lib.simulation.through_gateway import GatewayDoor

        door = GatewayDoor.connect(config.simulation.via_gateway, config.home, settings.tenants)
    try:
        counts = simulate_usage(settings, home=config.home, router=registry.router(),
                                load_version=load_version, day=day, domain=load_domain(config.domain),
                                max_new_tokens=config.evaluation.max_new_tokens, door=door)
    finally:
        if door is not None:
            door.close()
    day_end = simulated_day(day) + timedelta(days=1)
    if clock.now(config) < day_end:
        clock.set_now(config, day_end)
    return {**counts, "clock": clock.now(config).isoformat()}
