"""forget_job: `flywheel forget` as a Dagster job, launched from the UI's launchpad (lib/privacy/forget.py)."""

from typing import Optional

import dagster as dg

from flywheel_assets.defs.records import materialization
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.tables import FORGET_REQUESTS


class ForgetConfig(dg.Config):
    user_id: str
    tenant_id: Optional[str] = None  # only this tenant's user of that id; every tenant's when empty
    requested_by: str  # who asked: kept in audit/forget_requests
    policy: Optional[str] = None  # retire or retrain; privacy.on_forget when empty
    dry_run: bool = False


@dg.op(description="Deletes one user's rows and lines everywhere, vacuums the history, withdraws the model "
                   "versions trained on them and records the request in audit/forget_requests.")
def forget_user(context: dg.OpExecutionContext, config: ForgetConfig, flywheel: FlywheelResource) -> None:
    from flywheel_assets.lib.privacy.forget import forget

    report = forget(flywheel.config(), flywheel.lake(), config.user_id, config.tenant_id,
                    requested_by=config.requested_by, now=flywheel.now(), policy=config.policy,
                    dry_run=config.dry_run, registry=flywheel.registry(context), log=context.log.info)
    summary = report.as_dict()
    context.log.info(f"{report.request_id}: {report.total_rows} rows, {sum(report.lines.values())} lines; "
                     f"versions withdrawn {report.versions or 'none'}; champion {report.champion}")
    if not config.dry_run:
        context.log_event(materialization(
            FORGET_REQUESTS, request_id=report.request_id, rows_deleted=report.total_rows,
            rows_by_table=dg.MetadataValue.json(summary["rows"]), files_rewritten=len(report.lines),
            versions_withdrawn=", ".join(report.versions) or "none", champion_after=report.champion))


@dg.job(description="The right to be forgotten: one user's data out of every table and file, and out of service "
                    "(the same as `flywheel forget`).")
def forget_job():
    forget_user()
