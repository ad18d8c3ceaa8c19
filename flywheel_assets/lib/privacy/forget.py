"""The right to be forgotten: one user's data out of every table and file, and out of service.

`forget(config, lake, user)` holds the ingest lock, every refresh lock and the writers' lock
exclusive (lib/ingest/lock.py `no_writers`: nothing lands, is re-scored, curated, trained,
judged or rolled out meanwhile; it waits for such runs to end, up to
privacy.lock_timeout_s, and they wait for it) and, in order (each pass of 3–6 blanks the files
before it deletes rows, so the quarantine rows of the lines blanked go too):

1. finds the subject: the user's sessions (from events and trajectories), every trajectory of
   those sessions or of the user, and the teacher's corrections of them (`correction-<id>`);
2. finds what was trained on them: the cycles whose training set holds one of those
   trajectories, and every registered version with such a cycle in its lineage (an adapter
   trained over a tainted one is tainted too);
3. deletes their rows from every table that can hold them (SUBJECT_TABLES), drops their ids
   from the dataset manifests and the adapters' id lists and rewrites those cycles' exports;
4. blanks their lines in the landing files and the gateway's journal (lib/privacy/files.py);
5. purges every table's history (vacuum, log cleanup): no earlier Delta version, which would
   still hold the rows, can be read back;
6. checks again, and repeats from 3 if a row came back (a writer that takes none of the locks:
   a run of an older deployment), up to MAX_PASSES;
7. takes the tainted versions out of service in the registry (lib/experiments/registry.py
   `withdraw`): a tainted champion is replaced by the newest clean version that was champion
   before (at worst the base, which is trained on cold-start data only). With the policy
   `retrain` that version asks the training trigger for a new cycle, which trains on the data
   as it now is and goes through the gate, the canary and the A/B test like any other;
8. appends one row to audit/forget_requests: who asked, when, a sha256 of the subject, and how
   many rows, lines and files went — never an identifier or a byte of content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.select import export_chat_jsonl
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.ingest.lock import every_lock, no_writers
from flywheel_assets.lib.ingest.remote_landing import follow_ledger, scrub_bucket
from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.privacy.files import Matcher, Rewritten, journal_held, scrub_file, scrub_folder, write_json
from flywheel_assets.lib.storage import key_index
from flywheel_assets.lib.storage.artifacts import artifact_store, local, publish
from flywheel_assets.lib.tables import (
    ANNOTATIONS, CURATED_TRAJECTORIES, DATASET_MANIFESTS, FORGET_REQUESTS, INGESTED_FILES, JUDGE_SCORES,
    LLM_JUDGMENTS, QUARANTINE, SESSION_EVENTS, SESSION_FEEDBACK, TRAINING_DATASET, TRAJECTORIES, TRAJECTORY_SCORES,
    Table,
)

MAX_PASSES = 3
CHUNK = 1000  # ids per delete predicate
POLICIES = ("retire", "retrain")


@dataclass(frozen=True)
class Subject:
    user_id: str | None  # None: the sessions and trajectories alone (retention's expired sessions)
    tenant_id: str | None
    sessions: frozenset[str]
    trajectories: frozenset[str]  # the user's and their sessions' trajectories, and the corrections of them

    def matcher(self) -> Matcher:
        return Matcher.build(self.user_id, self.tenant_id, self.sessions | self.trajectories)

    def sha256(self) -> str:
        return hashlib.sha256(f"{self.tenant_id or '*'}\x1f{self.user_id}".encode()).hexdigest()

    def _tenant(self) -> str:
        return "" if self.tenant_id is None else f" AND coalesce(tenant_id, 'default') = {sql_literal(self.tenant_id)}"

    def _user(self) -> str:
        return "false" if self.user_id is None else f"(user_id = {sql_literal(self.user_id)}{self._tenant()})"

    def conditions(self, table: Table) -> list[str]:
        """SQL conditions (DuckDB and Delta predicates alike) that together select the table's rows of
        the subject, at most CHUNK ids each: one predicate with tens of thousands of literals crashed
        delta-rs. A table with a tenant column is also held to the tenant asked for (a session id
        another tenant happens to use too is not theirs)."""
        names = set(table.schema.names)
        tenant = self._tenant() if "tenant_id" in names else ""
        found = [self._user()] if "user_id" in names and self.user_id is not None else []
        # a table with no tenant column is matched by trajectory id alone when a tenant is asked for:
        # trajectory ids are the lake's keys (one tenant each), session ids may repeat across tenants
        by_session = "trajectory_id" not in names or "tenant_id" in names or self.tenant_id is None
        for column, ids in (("session_id", self.sessions if by_session else ()), ("trajectory_id", self.trajectories)):
            if column in names:
                ordered = sorted(ids)
                found += [f"({column} IN ({_in(ordered[i:i + CHUNK])}){tenant})" for i in range(0, len(ordered), CHUNK)]
        return found

    def condition(self, table: Table) -> str | None:
        """All of `conditions` as one (for reads: DuckDB takes long lists)."""
        return " OR ".join(self.conditions(table)) or None


def _in(values) -> str:
    return ", ".join(sql_literal(v) for v in sorted(values))


# Every table a subject's rows can be in (quarantine is matched on its raw line instead; the
# manifests' id lists are rewritten, not deleted). model_registry, ab_results,
# offline_evaluations, score_calibrations and ingested_files hold no row of a user.
SUBJECT_TABLES = (SESSION_EVENTS, TRAJECTORIES, ANNOTATIONS, SESSION_FEEDBACK, LLM_JUDGMENTS, JUDGE_SCORES,
                  TRAJECTORY_SCORES, CURATED_TRAJECTORIES, TRAINING_DATASET)
PURGED = SUBJECT_TABLES + (QUARANTINE, DATASET_MANIFESTS, INGESTED_FILES)


@dataclass
class ForgetReport:
    request_id: str
    dry_run: bool
    rows: dict[str, int] = field(default_factory=dict)  # per table: rows of the subject (deleted unless dry run)
    lines: dict[str, int] = field(default_factory=dict)  # per file, relative to FLYWHEEL_HOME: lines blanked
    cycles: list[str] = field(default_factory=list)  # training sets that held the subject's trajectories
    versions: list[str] = field(default_factory=list)  # registered versions trained through one of them
    champion: str | None = None  # the champion afterwards
    retrain: bool = False
    passes: int = 0
    journal_skipped: bool = False  # a running gateway held its journal: its open conversations land later

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def as_dict(self) -> dict:
        return asdict(self) | {"total_rows": self.total_rows}


def find_subject(lake: Lake, user_id: str, tenant_id: str | None = None) -> Subject:
    con = duckdb.connect()
    for table in (SESSION_EVENTS, TRAJECTORIES):
        lake.register(con, table)
    scoped = Subject(user_id, tenant_id, frozenset(), frozenset())
    user, tenant = scoped._user(), scoped._tenant()
    sessions = {r[0] for r in con.execute(f"""
        SELECT session_id FROM session_events WHERE {user} AND session_id IS NOT NULL
        UNION SELECT session_id FROM trajectories WHERE {user} AND session_id IS NOT NULL""").fetchall()}
    con.register("sessions", pa.table({"session_id": pa.array(sorted(sessions), pa.string())}))
    of_user = f"({user} OR (session_id IN (SELECT session_id FROM sessions){tenant}))"
    own = {r[0] for r in con.execute(f"""
        SELECT trajectory_id FROM trajectories WHERE {of_user}
        UNION SELECT trajectory_id FROM session_events WHERE {of_user} AND trajectory_id IS NOT NULL""").fetchall()}
    return Subject(user_id, tenant_id, frozenset(sessions), frozenset(own | {f"correction-{t}" for t in own}))


def tainted_cycles(lake: Lake, subject: Subject) -> list[str]:
    """The cycles whose training set holds one of the subject's trajectories."""
    if not subject.trajectories:
        return []
    rows = lake.read(TRAINING_DATASET, columns=["cycle"], filter_sql=subject.condition(TRAINING_DATASET))
    return sorted(set(rows.column("cycle").to_pylist()))


def lineage_taint(latest: dict[str, dict], cycles: set[str]) -> tuple[list[str], Callable[[dict], bool]]:
    """(the versions trained through one of `cycles`, a test of whether a version is clean: nothing in
    its lineage was trained on those cycles or marked tainted by an earlier request)."""

    def chain(row: dict | None):
        while row is not None:
            yield row
            row = latest.get(row["parent"]) if row.get("parent") else None

    def clean(row: dict) -> bool:
        return not any(r.get("cycle") in cycles or json.loads(r.get("metadata_json") or "{}").get("tainted_by")
                       for r in chain(row))

    return sorted(v for v, row in latest.items() if any(r.get("cycle") in cycles for r in chain(row))), clean


class ForgetIncomplete(RuntimeError):
    """Rows of the subject were still found after MAX_PASSES: a writer outside the locks keeps
    bringing them back. Nothing is half-done in a way a second `forget` does not finish."""


def forget(config: FlywheelConfig, lake: Lake, user_id: str, tenant_id: str | None = None, *,
           requested_by: str, now: datetime, policy: str | None = None, dry_run: bool = False,
           registry: ModelRegistry | None = None, log: Callable[[str], None] = lambda message: None) -> ForgetReport:
    """Forget one user (of one tenant, or of all): see the module docstring. A dry run changes
    nothing and reports what would go."""
    policy = policy or config.privacy.on_forget
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    report = ForgetReport(request_id=f"forget-{uuid.uuid4().hex[:16]}", dry_run=dry_run)
    registry = registry or ModelRegistry(lake, clock=lambda: now, tenancy=config.tenancy)
    with contextlib.ExitStack() as held:
        # the writers first (a training run may hold them for long: ingests go on meanwhile), then the
        # ingest and refresh locks; no writer takes those, so the order cannot deadlock. A dry run reads only.
        if not dry_run:
            held.enter_context(no_writers(config.landing, config.privacy.lock_timeout_s, owner=report.request_id,
                                          log=log))
        held.enter_context(every_lock(config.landing, config.ingest.lock_timeout_s, owner=report.request_id, log=log))
        return _forget(config, lake, registry, user_id, tenant_id, report, requested_by=requested_by, now=now,
                       policy=policy, dry_run=dry_run, log=log)


def _forget(config: FlywheelConfig, lake: Lake, registry: ModelRegistry, user_id: str, tenant_id: str | None,
            report: ForgetReport, *, requested_by: str, now: datetime, policy: str, dry_run: bool,
            log: Callable[[str], None]) -> ForgetReport:
    """forget() under its locks: nothing lands, is re-scored, curated, trained or evaluated meanwhile."""
    subject = find_subject(lake, user_id, tenant_id)
    pending = config.home / "privacy" / f"pending-{subject.sha256()}.json"
    subject, cycles, versions = resume(pending, subject, tainted_cycles(lake, subject))
    latest = {row["version"]: row for row in registry.current()}
    tainted, clean = lineage_taint(latest, set(cycles))
    report.cycles, report.versions = cycles, sorted(set(tainted) | versions)
    matcher = subject.matcher()
    log(f"{len(subject.sessions)} sessions, {len(subject.trajectories)} trajectory ids (corrections included); "
        f"trained on in {report.cycles or 'no cycle'}; versions {report.versions or 'none'}")
    if dry_run:
        report.rows = subject_rows(lake, subject, matcher)
        for root in (config.landing, config.home / "gateway"):
            report.lines |= {_relative(config, r.path): r.lines for r in scrub_folder(root, matcher, dry_run=True)}
        report.champion = (registry.champion() or {}).get("version")
        return report
    # what the rows no longer tell once deleted, kept until the request is done: a failed run
    # (a full disk, a crash) is finished by running it again
    pending.parent.mkdir(parents=True, exist_ok=True)
    write_json(pending, {"user_id": user_id, "tenant_id": tenant_id, "sessions": sorted(subject.sessions),
                         "trajectories": sorted(subject.trajectories), "cycles": cycles,
                         "versions": report.versions})
    erase(config, lake, subject, report, log)
    withdrawn = registry.withdraw(set(report.versions), clean=clean, actor=requested_by,
                                  reason=f"trained on data deleted by {report.request_id}",
                                  metadata={"tainted_by": report.request_id},
                                  retrain_after=now if policy == "retrain" else None) if report.versions else []
    report.champion = (registry.champion() or {}).get("version")
    report.retrain = policy == "retrain" and any(r["status"] == "champion" for r in withdrawn)
    lake.append(FORGET_REQUESTS, pa.Table.from_pylist([{
        "request_id": report.request_id, "requested_by": requested_by, "requested_at": now,
        "subject_sha256": subject.sha256(), "tenant_scoped": tenant_id is not None, "policy": policy,
        "rows_deleted": report.total_rows, "rows_by_table_json": json.dumps(report.rows, sort_keys=True),
        "files_rewritten": len(report.lines), "lines_blanked": sum(report.lines.values()),
        "cycles_tainted": report.cycles, "versions_withdrawn": report.versions,
        "champion_after": report.champion, "retrain_requested": report.retrain, "passes": report.passes,
    }], schema=FORGET_REQUESTS.schema))
    pending.unlink(missing_ok=True)
    return report


def erase(config: FlywheelConfig, lake: Lake, subject: Subject, report: ForgetReport,
          log: Callable[[str], None]) -> None:
    """Steps 3–6: the subject's rows, lines and training-set entries deleted, every table's history
    purged, checked, repeated while rows come back (counted into `report`). The caller holds
    the locks forget takes."""
    matcher = subject.matcher()
    for report.passes in range(1, MAX_PASSES + 1):
        blanked = _scrub_files(config, lake, matcher, report)
        for name, count in _delete_rows(config, lake, subject, matcher, report.cycles, blanked).items():
            report.rows[name] = report.rows.get(name, 0) + count
        for table in PURGED:
            lake.purge_history(table)
        key_index.prune(lake, list(PURGED))  # the key hashes of the files purged go with them
        left = {name: n for name, n in subject_rows(lake, subject, matcher).items() if n}
        log(f"pass {report.passes}: {report.total_rows} rows deleted, {sum(report.lines.values())} lines blanked; "
            f"left: {left or 'none'}")
        if not left:
            return
    raise ForgetIncomplete(f"{report.request_id}: rows still found after {MAX_PASSES} passes: {left}")


def resume(pending, subject: Subject, cycles: list[str]) -> tuple[Subject, list[str], set[str]]:
    """The subject, tainted cycles and versions, joined with those of an earlier run for the same
    subject that did not finish (its rows may be gone already)."""
    if not pending.exists():
        return subject, cycles, set()
    earlier = json.loads(pending.read_text())
    subject = Subject(subject.user_id, subject.tenant_id, subject.sessions | set(earlier["sessions"]),
                      subject.trajectories | set(earlier["trajectories"]))
    return subject, sorted(set(cycles) | set(earlier["cycles"])), set(earlier["versions"])


def _scrub_files(config: FlywheelConfig, lake: Lake, matcher: Matcher, report: ForgetReport) -> dict[str, set[int]]:
    """Blank the subject's lines in the landing zone and the gateway's journal (unless a running
    gateway holds it: then its records land later, and the next forget takes them). Returns the
    landing lines blanked, by path relative to the landing zone."""
    # the landing bucket's objects first: each rewritten one becomes its local copy, which the
    # folder's pass then finds clean
    in_bucket = scrub_bucket(config, lake, lambda path: getattr(scrub_file(path, matcher), "numbers", []))
    rewritten = scrub_folder(config.landing, matcher)
    with journal_held(config.home / "gateway") as held:
        if held:
            rewritten += scrub_folder(config.home / "gateway", matcher)
        else:
            report.journal_skipped = True
    _follow_in_ledger(config, lake, rewritten)
    for r in rewritten:
        report.lines[_relative(config, r.path)] = report.lines.get(_relative(config, r.path), 0) + r.lines
    for relative, numbers in in_bucket.items():
        name = _relative(config, config.landing / relative)
        report.lines[name] = report.lines.get(name, 0) + len(numbers)
    return {r.path.relative_to(config.landing).as_posix(): set(r.numbers)
            for r in rewritten if r.path.is_relative_to(config.landing)} | \
        {relative: set(numbers) for relative, numbers in in_bucket.items()}


def subject_rows(lake: Lake, subject: Subject, matcher: Matcher) -> dict[str, int]:
    """The subject's rows per table (quarantine: lines matched on their raw text)."""
    counts = {}
    for table in SUBJECT_TABLES:
        if (condition := subject.condition(table)) is not None:
            counts[table.name] = lake.read(table, columns=[table.key[-1]], filter_sql=condition).num_rows
    counts[QUARANTINE.name] = len(_quarantined(lake, matcher))
    return counts


def _quarantined(lake: Lake, matcher: Matcher, blanked: dict[str, set[int]] | None = None) -> list[str]:
    """Quarantine rows of the subject: their raw line matches, or it is a landing line just blanked
    (a line cut at the size limit may have lost the ids the matcher looks for)."""
    rows = lake.read(QUARANTINE, columns=["quarantine_id", "raw", "source_file", "source_line"]).to_pylist()
    return [r["quarantine_id"] for r in rows if matcher.text(r["raw"])
            or r["source_line"] in (blanked or {}).get(r["source_file"], ())]


def _delete_rows(config: FlywheelConfig, lake: Lake, subject: Subject, matcher: Matcher,
                 cycles: list[str], blanked: dict[str, set[int]]) -> dict[str, int]:
    deleted = {}
    for table in SUBJECT_TABLES:
        deleted[table.name] = sum(lake.delete_where(table, condition) for condition in subject.conditions(table))
    ids = _quarantined(lake, matcher, blanked)
    deleted[QUARANTINE.name] = sum(lake.delete_where(QUARANTINE, f"quarantine_id IN ({_in(ids[i:i + CHUNK])})")
                                   for i in range(0, len(ids), CHUNK))
    _rewrite_datasets(config, lake, subject, cycles)
    return deleted


def _rewrite_datasets(config: FlywheelConfig, lake: Lake, subject: Subject, cycles: list[str]) -> None:
    """The tainted cycles' manifests, exports and adapters' id lists without the subject's ids."""
    from flywheel_assets.lib.curation.select import count_by

    if not cycles:
        return
    manifests = lake.read(DATASET_MANIFESTS, filter_sql=f"cycle IN ({_in(cycles)})").to_pylist()
    for manifest in manifests:
        ids = [t for t in manifest["trajectory_ids"] if t not in subject.trajectories]
        rows = lake.read(TRAINING_DATASET, filter_sql=f"cycle = {sql_literal(manifest['cycle'])}")
        order = {t: rank for rank, t in enumerate(ids)}
        kept = rows.column("trajectory_id").to_pylist()
        rows = rows.take(sorted(range(rows.num_rows), key=lambda i: order.get(kept[i], len(order))))
        export = config.home / manifest["export_path"]
        local(config.home, config.stored_path(export.parent))  # the artifact store's copy, when there is one
        manifest.update(trajectory_ids=ids, n_rows=rows.num_rows, content_sha256=export_chat_jsonl(rows, export),
                        tier_counts_json=json.dumps(count_by(rows, "tier")),
                        task_type_counts_json=json.dumps(count_by(rows, "task_type")))
        if (card := export.parent / "manifest.json").exists():
            write_json(card, manifest)
        publish(config.home, export.parent)
    if manifests:
        lake.overwrite(DATASET_MANIFESTS, pa.Table.from_pylist(manifests, schema=DATASET_MANIFESTS.schema),
                       predicate=f"cycle IN ({_in(m['cycle'] for m in manifests)})")
    store = artifact_store(config.home)
    stored = {path for path in store.listing(config.models) if path.name == "trajectory_ids.json"} if store else set()
    for path in sorted(set(config.models.glob("*/trajectory_ids.json")) | stored):
        local(config.home, config.stored_path(path.parent))  # the whole folder: it is published again whole
        if store is not None:  # the store's list, even where a crashed forget left this copy rewritten
            store.fetch(path)
        listed = json.loads(path.read_text())
        if any(t in subject.trajectories for t in listed):
            write_json(path, [t for t in listed if t not in subject.trajectories])
            publish(config.home, path.parent)


def _follow_in_ledger(config: FlywheelConfig, lake: Lake, rewritten: list[Rewritten]) -> None:
    """A recompressed landing file's ledger row takes its new size (its mtime was kept), so it is
    not taken for a new file."""
    for r in rewritten:
        if r.size_after == r.size_before or not r.path.is_relative_to(config.landing):
            continue
        follow_ledger(lake, r.path.relative_to(config.landing).as_posix(), r.size_before, r.size_after)


def _relative(config: FlywheelConfig, path) -> str:
    return path.relative_to(config.home).as_posix() if path.is_relative_to(config.home) else str(path)
