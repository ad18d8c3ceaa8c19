"""The automation stage's jobs: the daily refresh, and the rollback regression_watch decides."""

import dagster as dg

from flywheel_assets.defs.ingest.jobs import ingest_job
from flywheel_assets.defs.resources import FlywheelResource

daily_refresh_job = dg.define_asset_job(
    "daily_refresh_job", selection=ingest_job.selection | dg.AssetSelection.groups("observability"),
    description="ingest_job's assets, then the flywheel's velocity and loop health with their charts.",
)


class RollbackConfig(dg.Config):
    version: str
    reason: str


@dg.op(description="Rolls the champion back to its predecessor, as regression_watch decided; refuses when the "
                   "version is no longer the champion.")
def roll_back_champion(context: dg.OpExecutionContext, config: RollbackConfig, flywheel: FlywheelResource) -> None:
    with flywheel.writing("roll_back_champion", context):
        registry = flywheel.registry(context)  # the change is a model_registry materialization of this run
        champion = registry.get(config.version)  # the champion of its lane (lib/tenancy.py)
        if champion is None or champion["status"] != "champion":
            context.log.warning(f"{config.version} is no longer the champion; nothing rolled back")
            return
        registry.rollback(config.version, reason=f"regression: {config.reason}", actor="regression_watch")
        context.log.info(f"rolled back {config.version}: {config.reason}")


@dg.job(description="The rollback regression_watch decided: the champion back to its predecessor.")
def regression_rollback_job():
    roll_back_champion()
