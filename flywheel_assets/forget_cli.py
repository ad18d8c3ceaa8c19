"""`flywheel forget --user U`: the right to be forgotten (registered on cli.app; lib/privacy/forget.py)."""

from __future__ import annotations

import json
from enum import Enum
from typing import Optional

import typer

from flywheel_assets.cli import EXIT_BUSY, EXIT_REFUSED, EXIT_USAGE, EXIT_WRITE_FAILED, Session, actor, app, fail


class Policy(str, Enum):
    retire = "retire"
    retrain = "retrain"


@app.command()
def forget(ctx: typer.Context,
           user: str = typer.Option(..., "--user", help="The user id, as the agent logged it (user_id)."),
           tenant: Optional[str] = typer.Option(None, "--tenant", help="Only this tenant's user of that id "
                                                "[default: the id in every tenant]."),
           by: Optional[str] = typer.Option(None, "--by", help="Who asked; kept in audit/forget_requests "
                                            "[default: cli:<user>]."),
           policy: Optional[Policy] = typer.Option(None, "--policy", help="Model versions trained on the data: "
                                                   "retire them, or also retrain [default: privacy.on_forget]."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Change nothing; report what would go."),
           as_json: bool = typer.Option(False, "--json", help="The report as one JSON object on stdout.")):
    """Delete one user's data from every table and file under FLYWHEEL_HOME, and take the model
    versions trained on it out of service.

    Rows go from bronze, silver and gold (trajectories of the user's sessions, their events, labels,
    scores, judgments, curated rows, training sets, and the teacher's corrections of them); lines are
    blanked in the landing files (quarantined and duplicate lines too) and the gateway's journal; the
    exports and id lists of the training sets that held them are rewritten; every table's Delta
    history is vacuumed, so time travel cannot bring them back. Versions trained on those sets are
    rolled back; a tainted champion is replaced by the newest clean one (retrain: and a new cycle
    starts). One row in audit/forget_requests records the request, without the user id.
    """
    from deltalake.exceptions import DeltaError

    from flywheel_assets.lib.experiments.registry import RegistryError
    from flywheel_assets.lib.ingest.lock import IngestBusy
    from flywheel_assets.lib.privacy.forget import ForgetIncomplete
    from flywheel_assets.lib.privacy.forget import forget as forget_user

    session: Session = ctx.obj
    if not user.strip():
        fail("--user must not be empty", EXIT_USAGE)
    session.require_home()
    say = (lambda message: typer.echo(message, err=True))
    try:
        report = forget_user(session.config, session.lake(), user, tenant, requested_by=by or actor(),
                             now=session.now(), policy=policy.value if policy else None, dry_run=dry_run,
                             registry=session.registry(), log=say)
    except IngestBusy as error:
        fail(str(error), EXIT_BUSY)
    except RegistryError as error:  # the data is gone; the versions could not be withdrawn
        fail(f"{error} (the data is deleted, the versions are not withdrawn: run the same command again once there is a clean version)", EXIT_REFUSED)
    except (ForgetIncomplete, OSError, DeltaError) as error:
        fail(f"{error} (run the same command again: what was deleted stays deleted)", EXIT_WRITE_FAILED)
    if not dry_run:  # the audit row as a runless materialization in the Dagster instance, when there is one
        from flywheel_assets.defs.records import materialization, report_runless
        from flywheel_assets.lib.tables import FORGET_REQUESTS

        report_runless(materialization(FORGET_REQUESTS, request_id=report.request_id, rows_deleted=report.total_rows,
                                       versions_withdrawn=", ".join(report.versions) or "none", by=by or actor()))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    if not report.total_rows and not report.lines and not report.versions:
        typer.echo(f"nothing of user {user!r} found" + (f" in tenant {tenant!r}" if tenant else "")
                   + ("" if dry_run else f"; history vacuumed all the same ({report.request_id})"))
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{report.request_id}: {verb} {report.total_rows} rows "
               f"({', '.join(f'{t} {n}' for t, n in sorted(report.rows.items()) if n) or 'none'}); "
               f"{sum(report.lines.values())} lines in {len(report.lines)} files")
    if report.cycles:
        typer.echo(f"trained on in {', '.join(report.cycles)}; versions "
                   f"{'to withdraw' if dry_run else 'withdrawn'}: {', '.join(report.versions) or 'none'}")
    typer.echo(f"champion: {report.champion}" + (" (a new cycle is requested)" if report.retrain else ""))
