"""The `flywheel` command line: see the loop's state and act on it by hand.

    flywheel status [--json]                 phase, trigger, A/B test, champion, history
    flywheel ingest PATH [--kind K]          a file or folder of JSONL lines into the lake
    flywheel annotate TRAJECTORY_ID (--score S | --label good|bad) [--note N]
    flywheel annotate --next N [--json]      the trajectories most worth a label next
    flywheel promote VERSION --reason R [--to champion|treatment|canary]
    flywheel rollback VERSION --reason R
    flywheel export CYCLE [-o PATH]          the cycle's training set as chat JSONL
    flywheel forget --user U [--tenant T]    delete a user's data everywhere; withdraw models trained on it
    flywheel serve / flywheel keys …         the OpenAI-compatible gateway (gateway_cli.py)

Everything goes through the lib/ code the Dagster assets and sensors use, so a manual
change is recorded exactly like an automatic one (registry changes carry the actor
`cli:<user>` and the reason given). lib/ modules are imported inside the commands:
`status` must answer in well under 2 s and `--help` at once, so nothing on those
paths may pull in torch, transformers or dagster.
"""

import getpass
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

EXIT_USAGE = 2  # a bad option or value (click's own code for usage errors)
EXIT_NOT_FOUND = 3  # unknown path, version, cycle or trajectory; FLYWHEEL_HOME missing
EXIT_REFUSED = 4  # the registry's rules forbid the change (illegal transition, shares over 1)
EXIT_BUSY = 5  # another ingest held the landing zone's lock for longer than ingest.lock_timeout_s
EXIT_WRITE_FAILED = 6  # a write to the lake failed (e.g. a full disk); nothing is lost, run again

app = typer.Typer(
    name="flywheel", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="See and steer the Flywheel loop. State lives under FLYWHEEL_HOME (default ./data/home); "
         "settings come from the JSON file named by FLYWHEEL_CONFIG.",
    epilog="Exit codes: 0 done; 1 unexpected error; 2 bad option or value; 3 not found (path, version, "
           "cycle, trajectory, FLYWHEEL_HOME); 4 refused by the registry's rules (illegal transition); "
           "5 another ingest is running (waited ingest.lock_timeout_s); 6 a write to the lake failed "
           "(nothing recorded is lost: run the same command again).",
)


class Kind(str, Enum):
    events = "events"
    trajectories = "trajectories"
    annotations = "annotations"


class LiveStatus(str, Enum):
    champion = "champion"
    treatment = "treatment"
    canary = "canary"


class Label(str, Enum):
    good = "good"
    bad = "bad"


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER") or "unknown"
    return f"cli:{user}"


class Session:
    """The configuration, lake, clock and registry of one call, made on first use."""

    def __init__(self, home: Optional[Path], config_path: Optional[Path]):
        self.home = home
        self.config_path = config_path
        self._config = None

    @property
    def config(self):
        if self._config is None:
            from pydantic import ValidationError

            from flywheel_assets.lib.config import load_config

            try:
                self._config = load_config(self.home, str(self.config_path) if self.config_path else None)
            except FileNotFoundError as error:
                fail(f"configuration file not found: {error.filename}", EXIT_NOT_FOUND)
            except (ValueError, ValidationError) as error:
                fail(f"invalid configuration: {error}", EXIT_USAGE)
        return self._config

    def lake(self):
        from flywheel_assets.lib.lake import Lake

        return Lake(self.config)

    def now(self) -> datetime:
        from flywheel_assets.lib import clock

        return clock.now(self.config)

    def registry(self):
        from flywheel_assets.lib.experiments.registry import ModelRegistry

        from flywheel_assets.defs.records import registry_changed, report_runless

        # a change by hand is a runless materialization of model_registry in the Dagster instance
        return ModelRegistry(self.lake(), clock=self.now, on_change=lambda rows: report_runless(registry_changed(rows)),
                             tenancy=self.config.tenancy)

    @contextmanager
    def writing(self):
        """The writers' lock, shared (lib/ingest/lock.py): waits while a `flywheel forget` runs; exit 5 past
        privacy.lock_timeout_s."""
        from flywheel_assets.lib.ingest.lock import writing

        with _ingest_errors(), writing(self.config.landing, self.config.privacy.lock_timeout_s, owner=f"cli {actor()}",
                                       log=_say):
            yield

    def require_home(self) -> None:
        if not self.config.home.is_dir():
            fail(f"FLYWHEEL_HOME {self.config.home} does not exist (set FLYWHEEL_HOME or pass --home)",
                 EXIT_NOT_FOUND)


@app.callback()
def main(ctx: typer.Context,
         home: Optional[Path] = typer.Option(None, "--home", help="Runtime root; overrides FLYWHEEL_HOME."),
         config: Optional[Path] = typer.Option(None, "--config", help="JSON settings; overrides FLYWHEEL_CONFIG.")):
    ctx.obj = Session(home, config)


# status ---------------------------------------------------------------------------------

@app.command()
def status(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout, for scripts."),
           history: int = typer.Option(10, "--history", min=0, help="How many registry changes to list.")):
    """Phase, training trigger and why, running A/B test, champion and registry history."""
    session: Session = ctx.obj
    session.require_home()
    from flywheel_assets.lib.clock import iso
    from flywheel_assets.lib.observability.status import collect_status, render_status

    report = collect_status(session.config, session.lake(), session.registry(), session.now())
    report["history"] = report["history"][-history:] if history else []
    typer.echo(json.dumps(report, default=iso, indent=2) if as_json else render_status(report))


# ingest ---------------------------------------------------------------------------------

@app.command()
def ingest(ctx: typer.Context,
           path: Path = typer.Argument(..., help="A .jsonl/.jsonl.gz file, or a folder of them (searched recursively)."),
           kind: Optional[Kind] = typer.Option(None, "--kind", help="What the lines are; by default the folder "
                                               "name (events/, trajectories/, annotations/) or the first lines tell."),
           as_json: bool = typer.Option(False, "--json", help="The counts as one JSON object on stdout.")):
    """Ingest trajectory, event or annotation lines now: every line ends in its table or in quarantine.

    A file outside the landing zone is copied into FLYWHEEL_HOME/landing/<kind>/cli/ under a
    content-addressed name (the landing zone keeps every input), so ingesting the same file again
    adds nothing. Scores are refreshed by the next ingest_job run.
    """
    from flywheel_assets.lib.ingest.landing import (
        READ_ERRORS, STAGING_PREFIX, LandingFile, content_addressed_name, describe_read_error, is_ready,
        kind_from_folder, list_landing, open_landing_file, sniff_kind,
    )
    from flywheel_assets.lib.ingest.lock import ingest_lock
    from flywheel_assets.lib.ingest.pipeline import pending_files

    session: Session = ctx.obj
    config, lake = session.config, session.lake()
    if not path.exists():
        fail(f"{path} does not exist", EXIT_NOT_FOUND)
    path = path.resolve()
    landing = config.landing.resolve()
    if path.is_relative_to(landing):
        # Already in the landing zone: ingest its pending files in place, as landing_sensor would.
        files = [f for f in list_landing(landing) if f.path.is_relative_to(path)]
        if path.is_file() and not files:
            fail(f"{path} is not a ready landing file (landing/<kind>/*.jsonl[.gz])", EXIT_USAGE)
        with _ingest_errors(), ingest_lock(landing, config.ingest.lock_timeout_s, owner=actor(), log=_say):
            pending = {f.key for f in pending_files(config, lake, files)}
            report = _ingest_files(config, lake, [f for f in files if f.key in pending])
        _print_ingest(report, skipped=[f.relative for f in files if f.key not in pending], as_json=as_json)
        return
    sources = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and is_ready(p.name))
    if not sources:
        fail(f"no .jsonl/.jsonl.gz/.ndjson file under {path}", EXIT_NOT_FOUND)
    kinds = {}
    for source in sources:
        kinds[source] = (kind.value if kind else None) or kind_from_folder(source, path) or sniff_kind(source)
        if kinds[source] is None:
            try:
                with open_landing_file(source) as handle:
                    handle.read(1 << 16)
                problem = "its first lines do not tell"
            except READ_ERRORS as error:
                problem = f"it cannot be read: {describe_read_error(error)}"
            fail(f"cannot tell whether {source} holds events, trajectories or annotations ({problem}): pass --kind "
                 "(an unreadable file is then recorded in quarantine)", EXIT_USAGE)
    staged: dict[str, LandingFile] = {}
    skipped = []
    # The lock covers the staging too: two calls with the same file would share its landing name.
    with _ingest_errors(), ingest_lock(landing, config.ingest.lock_timeout_s, owner=actor(), log=_say):
        for source in sources:
            target = landing / kinds[source] / "cli" / content_addressed_name(source)
            relative = target.relative_to(landing).as_posix()
            if relative in staged:
                continue
            if target.exists():
                stat = target.stat()
                staged[relative] = LandingFile(stat.st_mtime_ns, relative, kinds[source], stat.st_size, target)
                continue
            # Copied under a dot-name that landing_sensor skips, then renamed into the landing zone before
            # it is ingested: a killed call leaves either no landing file (the source is still yours) or a
            # whole one that landing_sensor ingests. (The name keeps its suffix: .gz is read as gzip.)
            temporary = target.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, temporary)
                os.replace(temporary, target)
            except OSError as error:
                temporary.unlink(missing_ok=True)
                fail(f"cannot copy {source} into the landing zone: {error}", EXIT_WRITE_FAILED)
            stat = target.stat()
            staged[relative] = LandingFile(stat.st_mtime_ns, relative, kinds[source], stat.st_size, target)
        pending = {f.key for f in pending_files(config, lake, list(staged.values()))}
        skipped = [f.relative for f in staged.values() if f.key not in pending]
        report = _ingest_files(config, lake, [f for f in staged.values() if f.key in pending])
    _print_ingest(report, skipped=skipped, as_json=as_json)


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _ingest_files(config, lake, files):
    import dagster as dg

    from flywheel_assets.defs.records import report_runless
    from flywheel_assets.lib.ingest.pipeline import ingest_landing

    report = ingest_landing(config, lake, files, log=lambda _: None, owner=actor())
    # rows written outside any run: recorded in the instance, so the catalog shows them
    for kind, table in (("events", "session_events"), ("trajectories", "trajectories"), ("annotations", "annotations")):
        if report.rows_new[kind]:
            report_runless(dg.AssetMaterialization(table, metadata={"rows_new": report.rows_new[kind], "by": actor()}))
    return report


@contextmanager
def _ingest_errors():
    """An ingest that could not run, or stopped, as a message and an exit code (not a traceback)."""
    from flywheel_assets.lib.ingest.lock import IngestBusy
    from flywheel_assets.lib.ingest.pipeline import IngestError

    try:
        yield
    except IngestBusy as error:
        fail(str(error), EXIT_BUSY)
    except IngestError as error:
        fail(str(error), EXIT_WRITE_FAILED)


def _print_ingest(report, skipped: list[str], as_json: bool) -> None:
    summary = {"files": report.files, "rows_new": dict(report.rows_new), "duplicates": dict(report.duplicates),
               "quarantined": dict(report.quarantined), "resumed": dict(report.resumed),
               "unscored_event_types": dict(report.unscored_event_types), "already_ingested": skipped}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for row in report.files:
        typer.echo(f"{row['file']}: {row['lines']} lines, {row['new']} new, {row['duplicates']} duplicates, "
                   f"{row['quarantined']} quarantined" + (f" ({row['problem']})" if row.get("problem") else ""))
    for relative in skipped:
        typer.echo(f"{relative}: already ingested, skipped")
    new = ", ".join(f"{count} {kind}" for kind, count in sorted(report.rows_new.items())) or "none"
    typer.echo(f"new rows: {new}; duplicates: {sum(report.duplicates.values())}; "
               f"quarantined: {report.lines_quarantined}"
               + (f" ({', '.join(f'{r} {n}' for r, n in sorted(report.quarantined.items()))})"
                  if report.quarantined else ""))
    if report.unscored_event_types:
        typer.echo("events kept but not scored (unknown event_type): " + ", ".join(
            f"{name or '(empty)'} {count}" for name, count in sorted(report.unscored_event_types.items())))
    if report.files:
        typer.echo("scores refresh at the next ingest_job run (landing_sensor, daily_refresh, or launch it)")


# annotate -------------------------------------------------------------------------------

@app.command()
def annotate(ctx: typer.Context,
             trajectory_id: Optional[str] = typer.Argument(None, help="The trajectory labelled (must be in "
                                                           "bronze/trajectories)."),
             score: Optional[float] = typer.Option(None, "--score", help="Human score in [-1, 1]."),
             label: Optional[Label] = typer.Option(None, "--label", "--verdict", help="good (= 1) or bad (= -1)."),
             note: Optional[str] = typer.Option(None, "--note", help="Free text kept with the label."),
             annotator: Optional[str] = typer.Option(None, "--annotator", help="Who labelled it [default: cli:<user>]."),
             ingest_now: bool = typer.Option(False, "--ingest", help="Also write it to bronze/annotations now "
                                             "(without a running landing_sensor)."),
             next_n: Optional[int] = typer.Option(None, "--next", min=1, help="Instead of labelling: list the N "
                                                  "unlabelled trajectories most worth a label."),
             as_json: bool = typer.Option(False, "--json", help="With --next: one JSON list on stdout.")):
    """Record a human label for a trajectory; at the next scoring it overrides every automatic score.

    The label is written as one line to FLYWHEEL_HOME/landing/annotations/, the same input as any
    annotation file: landing_sensor ingests it and its ingest_job re-scores (trajectory_scores takes
    the latest label per trajectory as combined_score, human_verified, tier by that score).

    With --next N it labels nothing: it lists the N trajectories most worth a label, where the score
    sources disagree most and where the combined score sits nearest a tier edge, dealt in turn.
    """
    session: Session = ctx.obj
    if next_n is not None:
        if trajectory_id is not None or score is not None or label is not None:
            fail("--next lists trajectories to label: give no TRAJECTORY_ID, --score or --label with it", EXIT_USAGE)
        _print_label_queue(session, next_n, as_json)
        return
    if trajectory_id is None:
        fail("give a TRAJECTORY_ID to label, or --next N to list the ones most worth a label", EXIT_USAGE)
    from flywheel_assets.lib.clock import iso
    from flywheel_assets.lib.ingest.landing import STAGING_PREFIX, list_landing
    from flywheel_assets.lib.tables import TRAJECTORIES

    if (score is None) == (label is None):
        fail("give exactly one of --score (in [-1, 1]) or --label good|bad", EXIT_USAGE)
    if score is not None and not -1.0 <= score <= 1.0:
        fail(f"--score must be within [-1, 1], got {score}", EXIT_USAGE)
    config, lake = session.config, session.lake()
    with session.writing():  # a forget between the check and the write would see the label land after it
        found = lake.read(TRAJECTORIES, columns=["trajectory_id"],
                          filter_sql="trajectory_id = " + _sql_text(trajectory_id))
        if found.num_rows == 0:
            fail(f"unknown trajectory {trajectory_id!r}: not in bronze/trajectories (ingest it first)", EXIT_NOT_FOUND)
        line = {"trajectory_id": trajectory_id,
                "score": score if score is not None else (1.0 if label == Label.good else -1.0),
                "annotator": annotator or actor(), "note": note, "annotated_at": iso(session.now())}
        folder = config.landing / "annotations"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"cli-{session.now().strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.jsonl"
        temporary, target = folder / f"{STAGING_PREFIX}{name}", folder / name
        temporary.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, target)
    typer.echo(f"{trajectory_id}: score {line['score']:+g} by {line['annotator']} -> {target}")
    if ingest_now:
        files = [f for f in list_landing(config.landing) if f.path == target]
        with _ingest_errors():
            report = _ingest_files(config, lake, files)
        typer.echo(f"bronze/annotations: {report.rows_new['annotations']} new row; "
                   "scores refresh at the next ingest_job run")


def _print_label_queue(session: Session, n: int, as_json: bool) -> None:
    from flywheel_assets.lib.feedback.label_queue import label_queue, render_queue

    session.require_home()
    queue = label_queue(session.config, session.lake(), n)
    typer.echo(json.dumps(queue, indent=2) if as_json else render_queue(queue))


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# promote / rollback ---------------------------------------------------------------------

@app.command()
def promote(ctx: typer.Context,
            version: str = typer.Argument(..., help="Registered model version, e.g. cycle-0002-lora."),
            reason: str = typer.Option(..., "--reason", help="Why; kept in the registry history."),
            to: LiveStatus = typer.Option(LiveStatus.champion, "--to", help="Status to move it to."),
            share: Optional[float] = typer.Option(None, "--share", min=0.0, max=1.0,
                                                  help="Traffic share for canary/treatment [default: 1% / 9%].")):
    """Move a version to champion (or to treatment / canary) by hand, with an audit trail.

    Goes through the registry's rules: candidate -> canary or treatment, canary -> treatment or
    champion, treatment -> champion; a new champion retires the old one in the same commit.
    """
    session: Session = ctx.obj
    _change(session, version, reason, lambda registry, who: registry.transition(
        version, to.value, reason=reason, actor=who, traffic_share=share))


@app.command()
def rollback(ctx: typer.Context,
             version: str = typer.Argument(..., help="Registered model version to take out of service."),
             reason: str = typer.Option(..., "--reason", help="Why; kept in the registry history.")):
    """Mark a version rolled_back by hand; rolling back the champion reinstates the previous one."""
    session: Session = ctx.obj
    _change(session, version, reason, lambda registry, who: registry.rollback(version, reason=reason, actor=who))


def _change(session: Session, version: str, reason: str, change) -> None:
    from flywheel_assets.lib.experiments.registry import RegistryError

    if not reason.strip():
        fail("--reason must not be empty", EXIT_USAGE)
    session.require_home()
    registry = session.registry()
    before = {row["version"]: row for row in registry.current()}
    if version not in before:
        known = ", ".join(sorted(before)) or "none registered"
        fail(f"unknown version {version!r} (known: {known})", EXIT_NOT_FOUND)
    try:
        with session.writing():  # not between a forget's withdrawal and its read of the registry
            change(registry, actor())
    except RegistryError as error:
        fail(str(error), EXIT_REFUSED)
    for row in registry.current():
        old = before.get(row["version"])
        if old is None or old["event_id"] != row["event_id"]:
            typer.echo(f"{row['version']}: {old['status'] if old else 'new'} -> {row['status']} "
                       f"({row['traffic_share']:.0%} of traffic) by {row['actor']}: {row['reason']}")


# the gateway's commands (serve, keys) and export live in their own modules, registered on this app
from flywheel_assets import export_cli, forget_cli, gateway_cli  # noqa: E402,F401

if __name__ == "__main__":  # `python -m flywheel_assets.cli`: the module's app, where gateway_cli registered
    from flywheel_assets.cli import app as registered

    registered()
