"""How fast the flywheel turns, where the time goes, and what to do about it (seed 75.5).

Two views, both from timestamps the tables already carry:

* per trajectory: logged (created_at) → scored (its session's last feedback event) →
  selected (the first dataset manifest holding it) → trained (its cycle's adapter
  registered) → served (that adapter promoted to champion): throughput per stage and
  latency between stages;
* per cycle ("turn"): from the previous cycle's dataset to this cycle's verdict, split
  into the seed's five stages: collection (until the trigger's count of new scored
  trajectories is reached), data quality (until their high-quality share is too),
  trigger (until the dataset is made), training (until the adapter is registered),
  verification (gate, canary and A/B test, until promoted, rolled back or retired).

velocity_score = 7 × promoted cycles / Σ cycle days over the last `window_cycles`
concluded cycles: improvements shipped per week at the measured pace. The bottleneck is
the seed stage holding the most days over those cycles plus the ones still open.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import duckdb
import polars as pl

from flywheel_assets.lib.automation.trigger import phase
from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.observability.timeline import CycleFacts, cycle_facts
from flywheel_assets.lib.tenancy import SHARED, lane_of, lane_of_cycle
from flywheel_assets.lib.tables import (
    DATASET_MANIFESTS, SESSION_FEEDBACK, TRAINING_DATASET, TRAJECTORIES, TRAJECTORY_SCORES,
)

DAY_SECONDS = 86400.0


@dataclass(frozen=True)
class SeedStage:
    key: str
    name: str
    cause: str
    remedy: str
    speedup: tuple[float, float]


# The seed's "Key Bottleneck by Stage" table, in loop order.
SEED_STAGES = (
    SeedStage("collection", "Trajectory collection", "Low user volume", "Internal use, beta, synthetic data", (2, 5)),
    SeedStage("data_quality", "Data quality", "Noisy signals", "Multi-judge fusion, manual spot-check", (1.5, 3)),
    SeedStage("trigger", "Training trigger", "Manual delay", "Automated trigger conditions", (2, 4)),
    SeedStage("training", "Training speed", "GPU shortage", "Efficient LoRA, gradient accumulation", (2, 3)),
    SeedStage("verification", "Deployment verification", "Manual approval", "Auto A/B + auto-promotion", (3, 10)),
)
STAGE_KEYS = tuple(s.key for s in SEED_STAGES)
# Per-trajectory steps, in order, and the column holding when each was reached.
STEPS = (("logged", "logged_at"), ("scored", "scored_at"), ("selected", "selected_at"),
         ("trained", "trained_at"), ("served", "served_at"))


def trajectory_steps(lake: Lake, config: FlywheelConfig, facts: list[CycleFacts]) -> pl.DataFrame:
    """Every usage trajectory with the time it reached each step (null where not yet)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for table in (TRAJECTORIES, TRAJECTORY_SCORES, SESSION_FEEDBACK, TRAINING_DATASET):
        lake.register(con, table)
    usage = pl.from_arrow(con.execute("""
        SELECT t.trajectory_id, t.created_at AS logged_at,
               CASE WHEN s.trajectory_id IS NOT NULL
                    THEN greatest(t.created_at, coalesce(f.last_ts, t.created_at)) END AS scored_at,
               coalesce(s.combined_score >= $threshold, false) AS high_quality
        FROM trajectories t
        LEFT JOIN trajectory_scores s USING (trajectory_id)
        LEFT JOIN session_feedback f ON f.session_id = t.session_id
        WHERE t.origin = 'usage'
    """, {"threshold": config.curation.high_quality_threshold}).to_arrow_table())
    membership = pl.from_arrow(
        con.execute("SELECT DISTINCT cycle, trajectory_id FROM training_dataset").to_arrow_table())
    return with_cycle_steps(usage, membership, facts)


def with_cycle_steps(usage: pl.DataFrame, membership: pl.DataFrame, facts: list[CycleFacts]) -> pl.DataFrame:
    """Add selected_at, trained_at and served_at: the earliest cycle holding the trajectory that reached each."""
    timestamp = usage.schema["logged_at"]
    cycles = pl.DataFrame(
        {"cycle": [f.cycle for f in facts], "selected_at": [f.dataset_at for f in facts],
         "trained_at": [f.trained_at for f in facts], "served_at": [f.promoted_at for f in facts]},
        schema={"cycle": pl.String, "selected_at": timestamp, "trained_at": timestamp, "served_at": timestamp})
    reached = (membership.join(cycles, on="cycle").group_by("trajectory_id")
               .agg(pl.col("selected_at").min(), pl.col("trained_at").min(), pl.col("served_at").min()))
    return usage.join(reached, on="trajectory_id", how="left")


def _days(later: datetime | None, earlier: datetime | None) -> float:
    if later is None or earlier is None:
        return 0.0
    return max(0.0, (later - earlier).total_seconds() / DAY_SECONDS)


def _turn(config: FlywheelConfig, steps: pl.DataFrame, start: datetime | None, end: datetime,
          facts: CycleFacts | None, now: datetime) -> dict:
    """One turn's stage times in days. `end` is the dataset time (or now for the open turn)."""
    window = steps.filter(pl.col("scored_at").is_not_null() & (pl.col("scored_at") <= end))
    real = window.height
    if start is not None:
        window = window.filter(pl.col("logged_at") > start)
    window = window.sort("scored_at")
    settings = config.trigger.phase2 if phase(real, config.trigger) == 2 else config.trigger.phase1
    needed = settings.min_new_trajectories
    times = window["scored_at"].to_list()
    high = window["high_quality"].cast(pl.Int64).cum_sum().to_list()
    count_met = times[needed - 1] if len(times) >= needed else None
    quality_met = None
    if count_met is not None:
        quality_met = next((times[i] for i in range(needed - 1, len(times))
                            if high[i] / (i + 1) >= settings.min_high_quality_rate), None)
    begin = start if start is not None else (steps["logged_at"].min() if steps.height else None)
    stages = {
        "collection": _days(count_met or end, begin),
        "data_quality": _days(quality_met or end, count_met) if count_met else 0.0,
        "trigger": _days(end, quality_met) if quality_met else 0.0,
        "training": 0.0, "verification": 0.0,
    }
    turn = {"cycle": facts.cycle if facts else None, "start": begin, "dataset_at": facts.dataset_at if facts else None,
            "new_scored": len(times), "needed": needed, "high_quality_rate": high[-1] / len(times) if times else 0.0,
            "needed_high_quality_rate": settings.min_high_quality_rate, "outcome": "collecting", "concluded": False}
    if facts is not None:
        stages["training"] = _days(facts.trained_at or now, facts.dataset_at)
        stages["verification"] = _days(facts.concluded_at or now, facts.trained_at) if facts.trained_at else 0.0
        turn["outcome"] = facts.outcome
        turn["concluded"] = facts.concluded_at is not None
    turn["stages"] = stages
    turn["cycle_days"] = sum(stages.values())
    return turn


def turns(config: FlywheelConfig, steps: pl.DataFrame, facts: list[CycleFacts], now: datetime) -> list[dict]:
    """One turn per cycle, oldest first, then the open turn collecting data for the next cycle."""
    result, previous = [], None
    for fact in facts:
        result.append(_turn(config, steps, previous, fact.dataset_at, fact, now))
        previous = fact.dataset_at
    result.append(_turn(config, steps, previous, now, None, now))
    return result


def _step_table(steps: pl.DataFrame, now: datetime, throughput_days: float) -> list[dict]:
    first = steps["logged_at"].min() if steps.height else None
    span = max(1 / 24, min(throughput_days, _days(now, first))) if first is not None else throughput_days
    since = now - timedelta(days=span)
    rows, previous = [], None
    for name, column in STEPS:
        reached = steps.filter(pl.col(column).is_not_null())
        recent = reached.filter((pl.col(column) >= since) & (pl.col(column) <= now)).height
        row = {"step": name, "trajectories": reached.height, "per_day": recent / span,
               "latency_median_h": None, "latency_p90_h": None}
        if previous is not None:
            hours = (reached.filter(pl.col(previous).is_not_null())
                     .select(((pl.col(column) - pl.col(previous)).dt.total_seconds() / 3600).clip(lower_bound=0))
                     .to_series())
            if hours.len():
                row["latency_median_h"] = float(hours.median())
                row["latency_p90_h"] = float(hours.quantile(0.9, interpolation="linear"))
        rows.append(row)
        previous = column
    return rows


def velocity(config: FlywheelConfig, steps: pl.DataFrame, facts: list[CycleFacts], now: datetime) -> dict:
    """The whole measurement as a JSON-ready dict (see the module docstring for the definitions)."""
    settings = config.velocity
    all_turns = turns(config, steps, facts, now)
    concluded = [t for t in all_turns if t["concluded"]][-settings.window_cycles:]
    open_turns = [t for t in all_turns if not t["concluded"]]
    promoted = sum(t["outcome"] == "promoted" for t in concluded)
    total_days = sum(t["cycle_days"] for t in concluded)
    score = 7 * promoted / total_days if total_days > 0 else 0.0
    mean_cycle = total_days / len(concluded) if concluded else None

    considered = concluded + open_turns
    totals = {key: sum(t["stages"][key] for t in considered) for key in STAGE_KEYS}
    grand = sum(totals.values())
    bottleneck_key = max(STAGE_KEYS, key=lambda k: totals[k]) if grand > 0 else "collection"
    stage = next(s for s in SEED_STAGES if s.key == bottleneck_key)
    projected = None
    if concluded and mean_cycle:
        stage_mean = sum(t["stages"][bottleneck_key] for t in concluded) / len(concluded)
        faster = mean_cycle - stage_mean * (1 - 1 / stage.speedup[0])
        projected = 7 * (promoted / len(concluded)) / faster if faster > 0 else None

    step_rows = _step_table(steps, now, settings.throughput_days)
    last_dataset = facts[-1].dataset_at if facts else None
    eligible = steps.filter(pl.col("logged_at") <= last_dataset) if last_dataset else steps.clear()
    data_yield = (eligible["selected_at"].is_not_null().mean() if eligible.height else None)
    served_yield = (eligible["served_at"].is_not_null().mean() if eligible.height else None)
    # the latest turn that saw new data describes the current pace best
    latest_open = next((t for t in reversed(considered) if t["new_scored"]), all_turns[-1])
    seed_rows = [{**asdict(s), "days": totals[s.key], "days_per_cycle": totals[s.key] / max(len(considered), 1),
                  "share": totals[s.key] / grand if grand else 0.0, "bottleneck": s.key == bottleneck_key}
                 for s in SEED_STAGES]
    return {
        "measured_at": now, "velocity_score": score, "promoted_cycles": promoted, "concluded_cycles": len(concluded),
        "ship_rate": promoted / len(concluded) if concluded else None,
        "turns_per_week": 7 / mean_cycle if mean_cycle else None, "cycle_time_days": mean_cycle,
        "data_yield": data_yield, "served_yield": served_yield,
        "bottleneck": {"stage": stage.key, "name": stage.name, "cause": stage.cause, "remedy": stage.remedy,
                       "speedup": list(stage.speedup), "days": totals[bottleneck_key],
                       "share": totals[bottleneck_key] / grand if grand else 0.0,
                       "reason": _reason(stage, totals, grand, len(considered), step_rows, latest_open, concluded)},
        "projected_score": projected, "steps": step_rows, "seed_stages": seed_rows, "turns": all_turns,
    }


def _reason(stage: SeedStage, totals: dict, grand: float, n: int, steps: list[dict], turn: dict,
            concluded: list[dict]) -> str:
    if grand == 0:
        return "no usage trajectory logged yet: nothing turns the flywheel"
    days = totals[stage.key] / max(n, 1)
    head = f"{stage.name} holds {totals[stage.key] / grand:.0%} of the measured time ({days:.1f} d per cycle)"
    logged_per_day = steps[0]["per_day"]
    detail = {
        "collection": f"{logged_per_day:.0f} usage trajectories/day against {turn['needed']} new ones "
                      f"needed per cycle",
        "data_quality": f"{turn['high_quality_rate']:.0%} of the latest new data is high quality, the trigger "
                        f"needs {turn['needed_high_quality_rate']:.0%}",
        "trigger": "the data was ready before the trigger started the cycle (minimum spacing or manual start)",
        "training": "datasets wait for their adapter",
        "verification": (f"{sum(t['outcome'] == 'promoted' for t in concluded)} of {len(concluded)} concluded "
                         "cycles promoted; the gate, canary and A/B test hold the rest"),
    }[stage.key]
    low, high = stage.speedup
    return (f"{head}: {detail}. Common bottleneck: {stage.cause.lower()}; remedy: {stage.remedy} "
            f"(expected {low:g}-{high:g}x).")


def measure_velocity(config: FlywheelConfig, lake: Lake, now: datetime) -> dict:
    # the shared lane's turns (a private lane's cycles are not in its sequence: lib/tenancy.py)
    facts = cycle_facts([r for r in lake.read(DATASET_MANIFESTS, columns=["cycle", "created_at", "n_rows"]).to_pylist()
                         if lane_of_cycle(r["cycle"]) == SHARED],
                        [r for r in ModelRegistry(lake).history() if lane_of(r) == SHARED])
    return velocity(config, trajectory_steps(lake, config, facts), facts, now)


def velocity_markdown(result: dict) -> str:
    """The stage tables a person reads in the UI."""
    def hours(value):
        return "" if value is None else f"{value:.1f} h"

    lines = ["| step | trajectories | per day (recent) | latency from previous (median / p90) |",
             "|---|---:|---:|---|"]
    for row in result["steps"]:
        latency = (f"{hours(row['latency_median_h'])} / {hours(row['latency_p90_h'])}"
                   if row["latency_median_h"] is not None else "")
        lines.append(f"| {row['step']} | {row['trajectories']} | {row['per_day']:.1f} | {latency} |")
    lines += ["", "| seed stage | days per cycle | share | common bottleneck | remedy | expected speedup |",
              "|---|---:|---:|---|---|---|"]
    for row in result["seed_stages"]:
        name = f"**{row['name']}** ← bottleneck" if row["bottleneck"] else row["name"]
        lines.append(f"| {name} | {row['days_per_cycle']:.2f} | {row['share']:.0%} | {row['cause']} | "
                     f"{row['remedy']} | {row['speedup'][0]:g}-{row['speedup'][1]:g}x |")
    lines += ["", "| cycle | outcome | collection | data quality | trigger | training | verification | cycle days |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for turn in result["turns"]:
        stages = turn["stages"]
        lines.append(f"| {turn['cycle'] or '(next)'} | {turn['outcome']} | "
                     + " | ".join(f"{stages[k]:.2f}" for k in STAGE_KEYS) + f" | {turn['cycle_days']:.2f} |")
    return "\n".join(lines)
