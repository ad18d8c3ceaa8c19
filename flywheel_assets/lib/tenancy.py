"""Tenancy policies and training lanes (README: Tenancy).

Each tenant has a policy: `pooled` (its data trains the shared model), `opt_out` (served and
analysed, never trained on, never sent to the teacher), `isolated` (its own datasets,
adapters, registry lane, gate, A/B test and routing, trained only on its data) or `hybrid`
(the same lane, its adapters trained only on its data over the shared champion).

A lane is a line of model versions: the shared lane ("") learns from the pooled tenants'
data, and every isolated or hybrid tenant has a lane named after it that learns from that
tenant's data alone. A lane's cycles are keyed `cycle-0001@<tenant>`, so its dataset
(`datasets/cycle-0001@<tenant>`), adapter (`cycle-0001@<tenant>-lora`) and registry rows
carry the lane in their names. A tenant's users are routed in its lane; a private lane with
no champion of its own serves the base model (isolated) or the shared champion (hybrid), so
no tenant is ever served a version trained on another tenant's private data.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, model_validator

SHARED = ""  # the shared lane's name
SEPARATOR = "@"
PRIVATE = ("isolated", "hybrid")
DEFAULT_TENANT = "default"  # the tenant of a row without one
_LANE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

Policy = Literal["pooled", "opt_out", "isolated", "hybrid"]


class TenancyConfig(BaseModel):
    """Per-tenant data policy (module docstring; README: Tenancy)."""

    default: Literal["pooled", "opt_out"] = "pooled"  # tenants `policies` does not name
    policies: dict[str, Policy] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _private_tenants_name_lanes(self) -> "TenancyConfig":
        for tenant, policy in self.policies.items():
            if policy in PRIVATE and tenant == DEFAULT_TENANT:
                raise ValueError(f"tenancy.policies: '{DEFAULT_TENANT}' (rows without a tenant: the cold start, "
                                 f"imported data) cannot be {policy}")
            if policy in PRIVATE and not _LANE_NAME.match(tenant):
                raise ValueError(f"tenancy.policies: an {policy} tenant names its lane (cycle-0001@{tenant}), so its "
                                 f"name must be 1-64 letters, digits, '_' or '-'; got {tenant!r}")
        return self

    def policy(self, tenant: str | None) -> str:
        return self.policies.get(tenant or DEFAULT_TENANT, self.default)

    def trains_on(self, tenant: str | None) -> bool:
        """Some lane may train on the tenant's data (every policy but opt_out)."""
        return self.policy(tenant) != "opt_out"

    def lane(self, tenant: str | None) -> str:
        """The lane whose versions serve the tenant's users: its own when isolated or hybrid."""
        return (tenant or DEFAULT_TENANT) if self.policy(tenant) in PRIVATE else SHARED

    def private_lanes(self) -> dict[str, str]:
        """{tenant: policy} of every isolated or hybrid tenant, by name."""
        return {tenant: policy for tenant, policy in sorted(self.policies.items()) if policy in PRIVATE}

    def lanes(self) -> list[str]:
        return [SHARED, *self.private_lanes()]

    def trainable_sql(self, column: str = "tenant_id") -> str:
        """A SQL condition: some lane may train on the row (its tenant is not opted out)."""
        return self._policy_sql(column, lambda policy: policy != "opt_out")

    def lane_sql(self, lane: str, column: str = "tenant_id") -> str:
        """A SQL condition: the row may train `lane` (the shared lane: a pooled tenant's row;
        a private lane: its tenant's row, if the tenant is still isolated or hybrid)."""
        if lane != SHARED:
            return f"coalesce({column}, '{DEFAULT_TENANT}') = {_sql_list([lane])}" \
                if self.policy(lane) in PRIVATE else "false"
        return self._policy_sql(column, lambda policy: policy == "pooled")

    def served_sql(self, lane: str, column: str = "tenant_id") -> str:
        """A SQL condition: the row's tenant is served by `lane`'s versions (the A/B test of a
        lane compares its own users only)."""
        tenant = f"coalesce({column}, '{DEFAULT_TENANT}')"
        if lane != SHARED:
            return f"{tenant} = {_sql_list([lane])}"
        private = list(self.private_lanes())
        return f"{tenant} NOT IN ({_sql_list(private)})" if private else "true"

    def lane_expr(self, column: str = "tenant_id") -> str:
        """A SQL expression: the lane of the row's tenant (lane())."""
        private = list(self.private_lanes())
        tenant = f"coalesce({column}, '{DEFAULT_TENANT}')"
        return f"CASE WHEN {tenant} IN ({_sql_list(private)}) THEN {tenant} ELSE '' END" if private else "''"

    def _policy_sql(self, column: str, allowed) -> str:
        tenant = f"coalesce({column}, '{DEFAULT_TENANT}')"
        if allowed(self.default):
            names = [t for t, policy in self.policies.items() if not allowed(policy)]
            return f"{tenant} NOT IN ({_sql_list(names)})" if names else "true"
        names = [t for t, policy in self.policies.items() if allowed(policy)]
        return f"{tenant} IN ({_sql_list(names)})" if names else "false"


def lane_of_cycle(cycle: str | None) -> str:
    """`cycle-0003@acme` → `acme`; a shared cycle (or none: a base model) → the shared lane."""
    return cycle.rpartition(SEPARATOR)[2] if cycle and SEPARATOR in cycle else SHARED


def lane_of_cycle_sql(column: str = "cycle") -> str:
    """lane_of_cycle as a SQL expression over a cycle column."""
    return f"CASE WHEN contains({column}, '{SEPARATOR}') THEN split_part({column}, '{SEPARATOR}', -1) ELSE '' END"


def lane_of(row: dict) -> str:
    """The lane of a registry row (of its cycle)."""
    return lane_of_cycle(row.get("cycle"))


def cycle_key(number: int, lane: str = SHARED) -> str:
    return f"cycle-{number:04d}" + (f"{SEPARATOR}{lane}" if lane != SHARED else "")


def next_cycle(existing: list[str], lane: str = SHARED) -> str:
    """The lane's next cycle key after `existing` (every lane's keys; other lanes' are ignored)."""
    numbers = [int(key[6:].partition(SEPARATOR)[0]) for key in existing
               if key.startswith("cycle-") and lane_of_cycle(key) == lane and key[6:].partition(SEPARATOR)[0].isdigit()]
    return cycle_key(max(numbers, default=0) + 1, lane)


def _sql_list(values: list[str]) -> str:
    return ", ".join("'" + value.replace("'", "''") + "'" for value in sorted(values))
