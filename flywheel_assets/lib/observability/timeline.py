"""When each cycle passed each step of the loop, from the tables' own timestamps.

A cycle's dataset time is its manifest's created_at; its adapter's steps come from the
registry history (changed_at, the flywheel clock): registered (trained), first served
to users (canary, treatment or champion), promoted (champion) and concluded (promoted,
rolled back or retired by the gate or the A/B test).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from flywheel_assets.lib.experiments.registry import LIVE

CONCLUSIONS = {"champion": "promoted", "rolled_back": "rolled_back", "retired": "retired"}


@dataclass(frozen=True)
class CycleFacts:
    cycle: str
    dataset_at: datetime
    rows: int
    version: str | None = None
    trained_at: datetime | None = None
    exposed_at: datetime | None = None
    promoted_at: datetime | None = None
    concluded_at: datetime | None = None
    outcome: str = "in_progress"  # promoted, rolled_back, retired or in_progress


def cycle_facts(manifests: list[dict], history: list[dict]) -> list[CycleFacts]:
    """One CycleFacts per dataset manifest, oldest first. `history` is the registry's, oldest first."""
    by_cycle: dict[str, list[dict]] = {}
    for row in history:
        if row.get("cycle"):
            by_cycle.setdefault(row["cycle"], []).append(row)
    facts = []
    for manifest in sorted(manifests, key=lambda m: m["created_at"]):
        rows = by_cycle.get(manifest["cycle"], [])

        def first(statuses, rows=rows) -> dict | None:
            return next((r for r in rows if r["status"] in statuses), None)

        trained, exposed = (rows[0] if rows else None), first(LIVE)
        promoted, concluded = first(("champion",)), first(tuple(CONCLUSIONS))
        facts.append(CycleFacts(
            cycle=manifest["cycle"], dataset_at=manifest["created_at"], rows=manifest["n_rows"],
            version=trained["version"] if trained else None,
            trained_at=trained["changed_at"] if trained else None,
            exposed_at=exposed["changed_at"] if exposed else None,
            promoted_at=promoted["changed_at"] if promoted else None,
            concluded_at=concluded["changed_at"] if concluded else None,
            outcome=CONCLUSIONS[concluded["status"]] if concluded else "in_progress",
        ))
    return facts


def loop_versions(history: list[dict]) -> set[str]:
    """Versions the flywheel trained itself (adapters of a cycle): their usage is self-generated data."""
    return {row["version"] for row in history if row.get("cycle") or row.get("adapter_path")}
