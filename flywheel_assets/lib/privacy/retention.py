"""Per-tenant retention: a tenant's sessions older than its retention deleted everywhere, like a forget.

`expire(config, lake, now)` runs inside lake_maintenance, under the locks a forget takes. For
each tenant whose retention (maintenance.tenant_retention_days, else maintenance.retention_days)
is set, the expired subject is every session of the tenant whose last activity (its newest event
`ts` or trajectory `created_at`, as the agent logged them) is older than `now` minus those days,
with the trajectories of those sessions, the tenant's usage trajectories logged without a
session that were created before then, and the teacher's corrections of them. It is then erased
as a forgotten user is
(lib/privacy/forget.py `erase`): rows out of every table (the cold tier too), lines blanked in
the landing files and the gateway's journal, the training sets' exports and id lists rewritten,
every table's history purged; and one row per tenant is appended to audit/forget_requests
(`requested_by` "retention:<tenant>", `policy` "expire", the sha256 of the tenant and cut-off).

What is pending is kept in FLYWHEEL_HOME/privacy/pending-expire-<sha256>.json until the tenant's
erasure is done, so a run that failed halfway (its sessions' bronze rows gone, their scores not
yet) is finished by the next one, as a forget is.

What retention does not do: offline rows (golden, synthetic, imported: no session and not
usage) are kept, they are not a user's; model versions trained on expired sessions stay in service
(they were trained while the data was retained; `flywheel forget` is the tool that withdraws
models, for a user who asks).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.privacy.files import write_json
from flywheel_assets.lib.privacy.forget import ForgetReport, Subject, erase, resume, tainted_cycles
from flywheel_assets.lib.tables import FORGET_REQUESTS, SESSION_EVENTS, TRAJECTORIES


def expired_sessions(lake: Lake, tenant: str, before: datetime) -> Subject:
    """The tenant's sessions last active before `before`, their trajectories and corrections."""
    con = duckdb.connect()
    for table in (SESSION_EVENTS, TRAJECTORIES):
        lake.register(con, table)
    tenant_sql = f"coalesce(tenant_id, 'default') = {sql_literal(tenant)}"
    sessions = [r[0] for r in con.execute(f"""
        SELECT session_id FROM (
            SELECT session_id, ts AS active_at FROM session_events WHERE {tenant_sql} AND session_id IS NOT NULL
            UNION ALL SELECT session_id, created_at FROM trajectories WHERE {tenant_sql} AND session_id IS NOT NULL)
        GROUP BY session_id HAVING max(active_at) < ? ORDER BY session_id""", [before]).fetchall()]
    con.register("expired", pa.table({"session_id": pa.array(sessions, pa.string())}))
    own = {r[0] for r in con.execute(f"""
        SELECT trajectory_id FROM trajectories WHERE {tenant_sql} AND session_id IN (SELECT session_id FROM expired)
        UNION SELECT trajectory_id FROM trajectories
        WHERE {tenant_sql} AND session_id IS NULL AND origin = 'usage' AND created_at < ?
        UNION SELECT trajectory_id FROM session_events
        WHERE {tenant_sql} AND session_id IN (SELECT session_id FROM expired) AND trajectory_id IS NOT NULL""",
        [before]).fetchall()}
    return Subject(None, tenant, frozenset(sessions), frozenset(own | {f"correction-{t}" for t in own}))


def tenants(lake: Lake) -> list[str]:
    con = duckdb.connect()
    for table in (SESSION_EVENTS, TRAJECTORIES):
        lake.register(con, table)
    return [r[0] for r in con.execute("""
        SELECT DISTINCT coalesce(tenant_id, 'default') FROM session_events WHERE session_id IS NOT NULL
        UNION SELECT DISTINCT coalesce(tenant_id, 'default') FROM trajectories
        WHERE session_id IS NOT NULL OR origin = 'usage'
        ORDER BY 1""").fetchall()]


def expire(config: FlywheelConfig, lake: Lake, now: datetime, log: Callable[[str], None] = lambda message: None
           ) -> tuple[dict[str, ForgetReport], dict[str, str]]:
    """Erase every tenant's expired sessions (see the module docstring), and finish what a failed
    run left pending whatever the tenant's retention is now; the caller holds the locks forget
    takes. (per tenant with something erased, what went; per tenant that failed, why)."""
    done, errors = {}, {}
    folder = config.home / "privacy"
    pendings = {json.loads(p.read_text())["tenant_id"] for p in folder.glob("pending-expire-*.json")} \
        if folder.is_dir() else set()
    for tenant in sorted(set(tenants(lake)) | pendings):
        try:
            if (report := _expire_tenant(config, lake, tenant, now, log)) is not None:
                done[tenant] = report
        except Exception as error:  # noqa: BLE001  (the other tenants go on; this one is retried next run)
            errors[tenant] = f"{type(error).__name__}: {error}"
    return done, errors


def _expire_tenant(config: FlywheelConfig, lake: Lake, tenant: str, now: datetime,
                   log: Callable[[str], None]) -> ForgetReport | None:
    days = config.maintenance.retention_for(tenant)
    before = now - timedelta(days=days) if days is not None else None
    pending = config.home / "privacy" / f"pending-expire-{hashlib.sha256(tenant.encode()).hexdigest()}.json"
    found = expired_sessions(lake, tenant, before) if before is not None else Subject(None, tenant, frozenset(),
                                                                                          frozenset())
    subject, cycles, _ = resume(pending, found, [])
    if not subject.sessions and not subject.trajectories:
        return None
    report = ForgetReport(request_id=f"expire-{uuid.uuid4().hex[:16]}", dry_run=False)
    report.cycles = sorted(set(cycles) | set(tainted_cycles(lake, subject)))
    log(f"retention: tenant {tenant}: {len(subject.sessions)} sessions, {len(subject.trajectories)} trajectory ids "
        + (f"last active before {before:%Y-%m-%d %H:%M} ({days:g} days)" if before else "(a failed run's, finished)"))
    pending.parent.mkdir(parents=True, exist_ok=True)
    write_json(pending, {"user_id": None, "tenant_id": tenant, "sessions": sorted(subject.sessions),
                         "trajectories": sorted(subject.trajectories), "cycles": report.cycles, "versions": []})
    erase(config, lake, subject, report, log)
    sha = hashlib.sha256(f"{tenant}\x1fbefore {before.isoformat() if before else 'pending'}".encode()).hexdigest()
    lake.append(FORGET_REQUESTS, pa.Table.from_pylist([{
        "request_id": report.request_id, "requested_by": f"retention:{tenant}", "requested_at": now,
        "subject_sha256": sha, "tenant_scoped": True, "policy": "expire",
        "rows_deleted": report.total_rows, "rows_by_table_json": json.dumps(report.rows, sort_keys=True),
        "files_rewritten": len(report.lines), "lines_blanked": sum(report.lines.values()),
        "cycles_tainted": report.cycles, "versions_withdrawn": [], "champion_after": None,
        "retrain_requested": False, "passes": report.passes,
    }], schema=FORGET_REQUESTS.schema))
    pending.unlink(missing_ok=True)
    return report
