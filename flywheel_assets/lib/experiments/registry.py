"""Which model versions exist, which serve traffic, and who gets which.

gold/model_registry is an append-only history: every status change is a new row and
the latest row per version is its state. A change that touches two versions (a
promotion retires the old champion, a rollback reinstates it) is one Delta commit, so
the history is never half-written. Loading a version for inference is not done here:
the registry only stores paths relative to FLYWHEEL_HOME.

Routing follows the seed's enterprise layout (90% champion / 9% A/B / 1% canary): a
user's stable hash u in [0, 1) sends u < canary_share to the canary, u ≥ 1 −
treatment_share to the treatment, the rest to the champion. Canaries grow from 0 and
treatments from 1, so a canary that starts or ends during an A/B test moves none of the
treatment's users and puts no control user into the treatment: the test's arms stay sticky.

Every version belongs to a lane (lib/tenancy.py): the shared lane, or an isolated or hybrid
tenant's own, named in its cycle. Champion, arms and shares are per lane: a promotion retires
the lane's champion only, and a tenant's users are routed over its lane's layout. A private
lane without a champion of its own serves the base model (isolated) or the shared champion
(hybrid) to its users, neither trained on any tenant's private data.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from flywheel_assets.lib.lake import Lake, utcnow
from flywheel_assets.lib.tables import MODEL_REGISTRY
from flywheel_assets.lib.tenancy import SHARED, TenancyConfig, lane_of

STATUSES = ("candidate", "canary", "treatment", "champion", "retired", "rolled_back")
LIVE = ("champion", "treatment", "canary")
FINAL = ("retired", "rolled_back")
TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"canary", "treatment", "retired", "rolled_back"}),
    "canary": frozenset({"treatment", "champion", "rolled_back", "retired"}),
    "treatment": frozenset({"champion", "rolled_back", "retired"}),
    "champion": frozenset({"retired", "rolled_back"}),
    "retired": frozenset(),
    "rolled_back": frozenset(),
}
DEFAULT_SHARES = {"canary": 0.01, "treatment": 0.09}
_TOLERANCE = 1e-9


class RegistryError(ValueError):
    """A change the registry's rules forbid (unknown version, invalid transition, shares over 1)."""


def bucket(user_id: str, tenant_id: str, salt: str = "") -> float:
    """The user's stable position in [0, 1): first 8 bytes of sha256(salt:tenant:user) / 2**64."""
    digest = hashlib.sha256(f"{salt}:{tenant_id}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route(user_id: str, tenant_id: str, *, champion: str, treatment: str | None = None,
          canary: str | None = None, treatment_share: float = DEFAULT_SHARES["treatment"],
          canary_share: float = DEFAULT_SHARES["canary"], salt: str = "") -> str:
    """The version that serves this user. An absent arm's users go to the champion, so
    the other arms keep their users when one arm comes or goes."""
    return _pick(bucket(user_id, tenant_id, salt), [(canary, canary_share)], [(treatment, treatment_share)], champion)


def _pick(u: float, canaries: list[tuple[str | None, float]], treatments: list[tuple[str | None, float]],
          champion: str) -> str:
    """Canaries take [0, Σ canary shares) upward, treatments (1 − Σ treatment shares, 1] downward."""
    shares = [share for _, share in canaries + treatments]
    if any(share < 0 for share in shares) or sum(shares) > 1 + _TOLERANCE:
        raise ValueError(f"arm shares must be non-negative and sum to at most 1, got {shares}")
    edge = 0.0
    for version, share in canaries:
        edge += share
        if u < edge:
            return version or champion
    edge = 1.0
    for version, share in treatments:
        edge -= share
        if u >= edge:
            return version or champion
    return champion


def _order(row: dict) -> tuple:
    # Rows of one commit share changed_at; the version leaving comes before the one entering.
    return row["changed_at"], row["status"] not in FINAL


class ModelRegistry:
    def __init__(self, lake: Lake, clock: Callable[[], datetime] = utcnow,
                 on_change: Callable[[list[dict]], None] | None = None, tenancy: TenancyConfig | None = None):
        self.lake = lake
        self.clock = clock
        self.tenancy = tenancy or TenancyConfig()  # which tenants are routed in a lane of their own
        self.on_change = on_change  # told the rows of every change once they are committed (defs/records.py)

    def register(self, version: str, *, base: str, base_path: str, adapter_path: str | None = None,
                 parent: str | None = None, cycle: str | None = None, status: str = "candidate",
                 reason: str, actor: str, metadata: dict | None = None) -> dict:
        """Add a version. A base model (no parent, no adapter) becomes champion with
        all traffic when there is no champion yet."""
        history = self._history()
        latest = _latest(history)
        if version in latest:
            raise RegistryError(f"{version} is already registered (status {latest[version]['status']})")
        if status not in STATUSES or status in FINAL:
            raise RegistryError(f"{version} cannot be registered as {status!r}: use one of {LIVE + ('candidate',)}")
        is_base = parent is None and adapter_path is None
        if status == "candidate" and is_base and _champion(latest) is None:
            status = "champion"
        row = {"version": version, "parent": parent, "base": base, "base_path": base_path,
               "adapter_path": adapter_path, "cycle": cycle, "metadata_json": "{}"}
        return self._change(history, row, status, reason=reason, actor=actor, metadata=metadata)

    def transition(self, version: str, to_status: str, *, reason: str, actor: str,
                   traffic_share: float | None = None, metadata: dict | None = None) -> dict:
        """Move a version to to_status; promoting to champion retires the current one in the same commit."""
        if to_status == "rolled_back":
            if traffic_share:
                raise RegistryError(f"{version}: a rolled-back version serves no traffic")
            return self.rollback(version, reason=reason, actor=actor, metadata=metadata)
        history = self._history()
        current = self._require(_latest(history), version)
        _check(version, current["status"], to_status)
        return self._change(history, current, to_status, reason=reason, actor=actor,
                            traffic_share=traffic_share, metadata=metadata)

    def rollback(self, version: str, *, reason: str, actor: str, metadata: dict | None = None) -> dict:
        """Mark a version rolled_back; a rolled-back champion's predecessor (the most recent
        retired champion of its lane that no forget request withdrew) serves again, in the same commit."""
        history = self._history()
        latest = _latest(history)
        current = self._require(latest, version)
        _check(version, current["status"], "rolled_back")
        at = self._now(history)
        rows = [_next(current, "rolled_back", 0.0, reason, actor, at, metadata)]
        if current["status"] == "champion":
            lane = lane_of(current)
            # a version withdrawn by `flywheel forget` (tainted_by) is never reinstated
            previous = next((r["version"] for r in reversed(history) if r["status"] == "champion"
                             and r["version"] != version and lane_of(r) == lane
                             and latest[r["version"]]["status"] == "retired"
                             and not json.loads(latest[r["version"]]["metadata_json"] or "{}").get("tainted_by")), None)
            if previous is None and lane == SHARED:
                raise RegistryError(f"cannot roll back champion {version}: no retired champion to reinstate "
                                    "(withdrawn versions excluded)")
            if previous is not None:  # else the private lane serves its fallback again (module docstring)
                rows.append(_next(latest[previous], "champion", max(0.0, 1.0 - _arm_total(latest, version, lane)),
                                  f"reinstated after rollback of {version}: {reason}", actor, at, None))
        self._append(rows)
        return rows[0]

    def withdraw(self, versions: set[str], *, clean: Callable[[dict], bool], reason: str, actor: str,
                 metadata: dict, retrain_after: datetime | None = None) -> list[dict]:
        """Take versions out of service in one commit (lib/privacy/forget.py): a live or candidate
        version is rolled back; a retired or rolled-back one keeps its status and gains `metadata`.
        A withdrawn champion is replaced by the newest retired champion that is `clean`; with
        `retrain_after`, that version asks the training trigger for a new cycle."""
        history = self._history()
        latest = _latest(history)
        at = self._now(history)
        rows = [_next(latest[v], latest[v]["status"] if latest[v]["status"] in FINAL else "rolled_back",
                      0.0, reason, actor, at, metadata) for v in sorted(versions) if v in latest]
        for lane in sorted({lane_of(r) for r in latest.values()}):
            champion = _champion(latest, lane)
            if champion is None or champion["version"] not in versions:
                continue
            replacement = next((latest[r["version"]] for r in reversed(history) if r["status"] == "champion"
                                and r["version"] not in versions and lane_of(r) == lane
                                and latest[r["version"]]["status"] == "retired" and clean(latest[r["version"]])), None)
            if replacement is None and lane == SHARED:
                raise RegistryError(f"cannot withdraw champion {champion['version']}: no clean version was ever champion")
            if replacement is None:
                continue  # the private lane serves its fallback (module docstring)
            remaining = sum(r["traffic_share"] for v, r in latest.items()
                            if v not in versions and r["status"] in ("canary", "treatment") and lane_of(r) == lane)
            extra = {"retrain_after": retrain_after.isoformat()} if retrain_after else None
            rows.append(_next(replacement, "champion", max(0.0, 1.0 - remaining),
                              f"reinstated: {champion['version']} withdrawn ({reason})", actor, at, extra))
        if rows:
            self._append(rows)
        return rows

    def current(self) -> list[dict]:
        """The latest row of every version, ordered by changed_at."""
        return sorted(_latest(self._history()).values(), key=_order)

    def get(self, version: str) -> dict | None:
        return _latest(self._history()).get(version)

    def champion(self, lane: str = SHARED) -> dict | None:
        """The lane's own champion (None for a private lane that has none yet)."""
        return _champion(_latest(self._history()), lane)

    def lane_champion(self, lane: str = SHARED, current: list[dict] | None = None) -> dict | None:
        """The version serving the lane's users outside its canary and treatment arms: its own
        champion, else (a private lane) the base the shared champion sits on when the lane is
        isolated, the shared champion itself when it is hybrid; None without a shared champion."""
        latest = {r["version"]: r for r in (self.current() if current is None else current)}
        own = _champion(latest, lane)
        isolated = lane != SHARED and self.tenancy.policy(lane) != "hybrid"
        # an isolated lane's champion must have been trained on its tenant's data alone: one trained
        # while the tenant was hybrid (over the shared model) is not served once it is isolated
        if own is not None and not (isolated and _foreign_ancestor(own, latest, lane)):
            return own
        shared = _champion(latest, SHARED)
        if lane == SHARED or shared is None or not isolated:
            return shared
        if shared["base"] not in latest:
            raise RegistryError(f"lane {lane} is isolated but the base {shared['base']} is not registered")
        return latest[shared["base"]]

    def history(self, version: str | None = None) -> list[dict]:
        """Every change (of one version, or of all), oldest first."""
        return [r for r in self._history() if version is None or r["version"] == version]

    def training_parent(self, lane: str = SHARED) -> dict | None:
        """The version a lane's next adapter is trained over: the lane's champion (an isolated
        lane's first, the base), except a hybrid lane's, always over the shared champion of
        the day, so its tenant gets the shared model's progress with its own on top."""
        if lane != SHARED and self.tenancy.policy(lane) == "hybrid":
            return self.champion(SHARED)
        return self.lane_champion(lane)

    def serving(self, current: list[dict] | None = None, lane: str = SHARED) -> dict[str, list[dict]]:
        """The lane's versions that serve traffic, by status: champion, treatment, canary (of
        `current`, a `current()` already read, or a new read)."""
        live = {status: [] for status in LIVE}
        for row in self.current() if current is None else current:
            if row["status"] in live and lane_of(row) == lane:
                live[row["status"]].append(row)
        return live

    def router(self, current: list[dict] | None = None) -> Callable[[str, str], str]:
        """route(user_id, tenant_id) over a snapshot of the current layout (one read for many users).

        The tenant's lane decides the layout. Canaries take their traffic_share from u = 0
        upward, treatments from u = 1 downward (module docstring); the lane's champion serves
        the rest. The salt is the lane's own champion's version, so a new champion reshuffles
        its users (a private lane without one: the lane's name).
        """
        current = self.current() if current is None else current
        layouts = {}
        for lane in self.tenancy.lanes():
            champion = self.lane_champion(lane, current)
            if champion is None:
                raise RegistryError("no champion: nothing to route to")
            live = self.serving(current, lane)
            # a private lane on its fallback is salted by its name: a new shared champion does not
            # reshuffle its users (and its A/B test's arms) while it has no champion of its own
            salt = live["champion"][0]["version"] if live["champion"] else (lane or champion["version"])
            layouts[lane] = (champion["version"], salt, [(r["version"], r["traffic_share"]) for r in live["canary"]],
                             [(r["version"], r["traffic_share"]) for r in live["treatment"]])

        def route_user(user_id: str, tenant_id: str) -> str:
            champion, salt, canaries, treatments = layouts[self.tenancy.lane(tenant_id)]
            return _pick(bucket(user_id, tenant_id, salt), canaries, treatments, champion)
        return route_user

    def route(self, user_id: str, tenant_id: str) -> str:
        return self.router()(user_id, tenant_id)

    def _change(self, history: list[dict], row: dict, status: str, *, reason: str, actor: str,
                traffic_share: float | None = None, metadata: dict | None = None) -> dict:
        latest = _latest(history)
        lane = lane_of(row)
        arms = _arm_total(latest, row["version"], lane)
        if status in DEFAULT_SHARES:
            share = DEFAULT_SHARES[status] if traffic_share is None else traffic_share
            if share < 0 or arms + share > 1 + _TOLERANCE:
                raise RegistryError(f"{row['version']} -> {status}: share {share} with {arms:g} already "
                                    "held by other canary/treatment arms exceeds 1")
        elif status == "champion":
            share = max(0.0, 1.0 - arms) if traffic_share is None else traffic_share
        elif traffic_share:
            raise RegistryError(f"{row['version']} -> {status}: a {status} version serves no traffic")
        else:
            share = 0.0
        at = self._now(history)
        rows = []
        old = _champion(latest, lane)
        if status == "champion" and old is not None:
            rows.append(_next(old, "retired", 0.0, f"replaced by {row['version']}: {reason}", actor, at, None))
        rows.append(_next(row, status, share, reason, actor, at, metadata))
        self._append(rows)
        return rows[-1]

    def _history(self) -> list[dict]:
        return sorted(self.lake.read(MODEL_REGISTRY).to_pylist(), key=_order)

    def _now(self, history: list[dict]) -> datetime:
        """The clock's time, nudged one microsecond past the last change if it is not after it."""
        now = self.clock()
        now = (now if now.tzinfo else now.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
        if history and now <= history[-1]["changed_at"]:
            now = history[-1]["changed_at"] + timedelta(microseconds=1)
        return now

    def _append(self, rows: list[dict]) -> None:
        self.lake.append(MODEL_REGISTRY, pa.Table.from_pylist(rows, schema=MODEL_REGISTRY.schema))
        if self.on_change is not None:
            self.on_change(rows)

    @staticmethod
    def _require(latest: dict[str, dict], version: str) -> dict:
        if version not in latest:
            raise RegistryError(f"unknown version {version!r}")
        return latest[version]


def _check(version: str, from_status: str, to_status: str) -> None:
    if to_status not in STATUSES:
        raise RegistryError(f"{version} cannot go from {from_status} to {to_status}: not a status {STATUSES}")
    if to_status not in TRANSITIONS[from_status]:
        allowed = ", ".join(sorted(TRANSITIONS[from_status])) or f"none, {from_status} is final"
        raise RegistryError(f"{version} cannot go from {from_status} to {to_status} (allowed: {allowed})")


def _latest(history: list[dict]) -> dict[str, dict]:
    return {row["version"]: row for row in history}


def _arm_total(latest: dict[str, dict], excluding: str, lane: str = SHARED) -> float:
    """Traffic of the lane's users held by its canary and treatment versions other than `excluding`."""
    return sum(r["traffic_share"] for v, r in latest.items()
               if v != excluding and r["status"] in ("canary", "treatment") and lane_of(r) == lane)


def _foreign_ancestor(row: dict, latest: dict[str, dict], lane: str) -> bool:
    """Whether an adapter of another lane is in the row's lineage (a base model is no lane's)."""
    while row is not None:
        if row["adapter_path"] and lane_of(row) != lane:
            return True
        row = latest.get(row["parent"]) if row.get("parent") else None
    return False


def _champion(latest: dict[str, dict], lane: str = SHARED) -> dict | None:
    return next((r for r in latest.values() if r["status"] == "champion" and lane_of(r) == lane), None)


def _next(row: dict, status: str, share: float, reason: str, actor: str, at: datetime,
          metadata: dict | None) -> dict:
    """The version's next row: same identity and paths, new status; metadata merged into what it had."""
    merged = {**json.loads(row.get("metadata_json") or "{}"), **(metadata or {})}
    changed = {**row, "event_id": uuid.uuid4().hex, "status": status, "traffic_share": float(share),
               "reason": reason, "actor": actor, "changed_at": at, "metadata_json": json.dumps(merged, sort_keys=True)}
    return {name: changed.get(name) for name in MODEL_REGISTRY.schema.names}
