"""Tier budgets → one cycle's training set, deterministic and balanced by task type.

Within a tier, candidates are ordered by md5(seed:trajectory_id) inside their task
type, then taken round-robin across task types (every type's 1st pick, then every
type's 2nd, ...) up to the tier's budget; with `curation.corrections_first` the teacher's
corrections come first in their tier, round-robin among themselves. The same seed and
inputs always give the same rows, whatever order the inputs arrive in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.tenancy import lane_of_cycle


_CANDIDATES = """
    WITH holdout_prompts AS (SELECT DISTINCT prompt_key FROM curated WHERE split = 'holdout'),
    candidates AS (
        SELECT *, md5($seed || ':' || trajectory_id) AS shuffle
        FROM curated
        WHERE split = 'train' AND dedup_status = 'kept' AND ($lane)
          AND prompt_key NOT IN (SELECT prompt_key FROM holdout_prompts)
    )"""


def tier_budgets(config: FlywheelConfig, available: dict[str, int]) -> dict[str, int]:
    """The seed's budgets per tier; with `curation.spare_to_better_tiers`, what a tier
    cannot fill goes to the tiers that have candidates left, best first, never to the
    last (negative) tier: a dataset is not left at a third of its size because its users
    were satisfied, so that silver ran short, while gold candidates wait."""
    budgets = config.curation.budgets(config.tiers)
    if not config.curation.spare_to_better_tiers:
        return budgets
    filled = {tier: min(budget, available.get(tier, 0)) for tier, budget in budgets.items()}
    spare = sum(budgets.values()) - sum(filled.values())
    for tier in config.tiers.names[:-1]:
        extra = min(spare, available.get(tier, 0) - filled[tier])
        filled[tier] += extra
        spare -= extra
    return filled


def select_training_rows(curated: pa.Table, cycle: str, config: FlywheelConfig, salt: str = "") -> pa.Table:
    """Candidates: kept (not duplicate), in the train split, of a tenant the cycle's lane trains on
    (lib/tenancy.py: the shared lane's pooled tenants, or a private lane's own), whose prompt is not
    a held-out prompt. A `salt` (the comparison arms give their cycle) draws another selection
    from the same rows."""
    if "origin" not in curated.column_names:  # a table curated before the column existed
        curated = curated.append_column("origin", pa.nulls(curated.num_rows, pa.string()))
    con = duckdb.connect()
    con.register("curated", curated)
    candidates = _CANDIDATES.replace("$lane", config.tenancy.lane_sql(lane_of_cycle(cycle)))
    seed = f"{config.curation.seed}:{salt}" if salt else str(config.curation.seed)
    available = dict(con.execute(candidates + " SELECT tier, count(*) FROM candidates GROUP BY tier",
                                 {"seed": seed}).fetchall())
    budgets = tier_budgets(config, available)
    con.register("budgets", pa.table({"tier": list(budgets), "budget": list(budgets.values())}))
    return con.execute(candidates + """, by_type AS (
            SELECT *, row_number() OVER (PARTITION BY tier, first, task_type ORDER BY shuffle) AS type_rank
            FROM (SELECT *, coalesce(origin = 'correction' AND $corrections_first, false) AS first FROM candidates)
        ), ranked AS (
            SELECT *, row_number() OVER (PARTITION BY tier ORDER BY first DESC, type_rank, task_type, shuffle)
                   AS selection_rank
            FROM by_type
        )
        SELECT $cycle AS cycle, trajectory_id, session_id, task_type, r.tier, weight, combined_score,
               messages_json, tools_json, selection_rank
        FROM ranked r JOIN budgets b ON r.tier = b.tier
        WHERE selection_rank <= b.budget
        ORDER BY shuffle
    """, {"seed": seed, "cycle": cycle, "corrections_first": config.curation.corrections_first}).to_arrow_table()


def export_chat_jsonl(rows: pa.Table, path: Path) -> str:
    """Write the OpenAI chat format TRL and axolotl read (messages, tools) plus weight
    and tier, atomically; returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    digest = hashlib.sha256()
    with temporary.open("w", encoding="utf-8") as handle:
        for line in chat_jsonl_lines(rows):
            digest.update(line.encode())
            handle.write(line)
    temporary.replace(path)
    return digest.hexdigest()


def chat_jsonl_lines(rows: pa.Table) -> Iterator[str]:
    """The lines of export_chat_jsonl, each ending in a newline, in the rows' order."""
    for row in rows.to_pylist():
        yield json.dumps({
            "messages": json.loads(row["messages_json"]), "tools": json.loads(row["tools_json"] or "[]"),
            "weight": row["weight"], "tier": row["tier"], "task_type": row["task_type"],
            "trajectory_id": row["trajectory_id"],
        }, ensure_ascii=False) + "\n"


def count_by(rows: pa.Table, column: str) -> dict[str, int]:
    values = rows.column(column).to_pylist()
    return {value: values.count(value) for value in sorted(set(values))}
