"""Heuristic judges of trajectory content: cheap, deterministic, vectorised.

Each judge scores a trajectory in [0, 1] (1 is good); heuristic_score maps their
mean to [-1, 1] so that it can be fused with the implicit feedback score. Columns
and their meaning are documented in tables.JUDGE_SCORES.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from flywheel_assets.lib.config import FusionConfig
from flywheel_assets.lib.tables import TRAJECTORIES

_INPUT_COLUMNS = ("trajectory_id", "task_type", "turns", "tool_calls", "tools_offered", "final_response")
INPUT_SCHEMA = pl.Schema(
    {name: dtype for name, dtype in pl.from_arrow(TRAJECTORIES.schema.empty_table()).schema.items()
     if name in _INPUT_COLUMNS}
)
JUDGES = ("tool_call_validity", "tool_success_rate", "final_answer_present", "loop_free", "length_ok")
OUTPUT_SCHEMA = pl.Schema(
    {
        "trajectory_id": pl.String,
        "task_type": pl.String,
        "total_chars": pl.Int64,
        **{judge: pl.Float64 for judge in JUDGES},
        "heuristic_score": pl.Float64,
        "failed_judges": pl.String,
    }
)
CONTENT_SCHEMA = pl.Schema({name: dtype for name, dtype in OUTPUT_SCHEMA.items()
                            if name not in ("length_ok", "heuristic_score", "failed_judges")})
FAIL_BELOW = 0.5
# Task types smaller than this are too few for a meaningful length distribution.
LENGTH_MIN_ROWS = 5
# Identical lengths can leave a std of rounding noise rather than exactly 0.
_STD_EPSILON = 1e-12
_ROW = "_row"


def heuristic_judges(trajectories: pl.DataFrame, fusion: FusionConfig) -> pl.DataFrame:
    """One row of judge scores per trajectory, in input order; length_ok against these rows."""
    judged = content_judges(trajectories, fusion)
    return score_judges(with_length_ok(judged, length_stats(judged), fusion.length_outlier_z))


def content_judges(trajectories: pl.DataFrame, fusion: FusionConfig) -> pl.DataFrame:
    """Every judge that reads only its own trajectory (all but length_ok), with task_type and
    total_chars, which length_ok compares across the task type."""
    if trajectories.height == 0:
        return pl.DataFrame(schema=CONTENT_SCHEMA)
    # The cast lets hand-built frames (all-null or empty lists, wider ints) behave like the table.
    rows = trajectories.lazy().select(INPUT_SCHEMA.names()).cast(dict(INPUT_SCHEMA)).with_row_index(_ROW)
    return (
        rows.select(_ROW, "trajectory_id", "task_type", "final_response", total_chars=_conversation_chars())
        .join(_tool_call_judges(rows, fusion.loop_repeats), on=_ROW, how="left")
        .join(_reply_loops(rows, fusion.loop_repeats), on=_ROW, how="left")
        .with_columns(
            final_answer_present=_as_score(_non_blank(pl.col("final_response"))),
            loop_free=_as_score(
                ~(pl.col("tool_call_loop").fill_null(False) | pl.col("reply_loop").fill_null(False))
            ),
        )
        .sort(_ROW)
        .select(CONTENT_SCHEMA.names())
        .cast(dict(CONTENT_SCHEMA))
        .collect()
    )


def length_stats(population: pl.DataFrame) -> pl.DataFrame:
    """Per task type: how many, and the mean and sample std of log1p(total_chars) (a row without
    a length counts, but has no log length). `population`: task_type and total_chars, a row per
    trajectory or, with a column n, per n trajectories. The sums run over each task type's
    distinct lengths in sorted order, so the same population gives the same bits however it was
    split or ordered: an incremental refresh's verdicts and a full recompute's agree."""
    counts = population.group_by("task_type", "total_chars").agg(
        n=pl.col("n").sum() if "n" in population.columns else pl.len()
    ).sort("task_type", "total_chars", nulls_last=True).with_columns(
        group=pl.col("task_type").rle_id(), log=pl.col("total_chars").cast(pl.Float64).log1p())
    group = counts["group"].to_numpy()
    size = int(group[-1]) + 1 if len(group) else 0
    rows = counts["n"].cast(pl.Float64).to_numpy()
    logs = counts["log"].fill_null(0.0).to_numpy()
    weights = np.where(counts["log"].is_null().to_numpy(), 0.0, rows)
    # (bincount adds in array order: the same sorted input, the same bits)
    known = np.bincount(group, weights=weights, minlength=size)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.bincount(group, weights=weights * logs, minlength=size) / known
        std = np.sqrt(np.bincount(group, weights=weights * (logs - mean[group]) ** 2, minlength=size) / (known - 1))
    firsts = counts.filter(pl.col("group").is_first_distinct())
    return pl.DataFrame({
        "task_type": firsts["task_type"],
        "n": np.bincount(group, weights=rows, minlength=size).astype(np.uint32),
        "mean": pl.Series(mean, dtype=pl.Float64).fill_nan(None),
        "std": pl.Series(np.where(known > 1, std, np.nan), dtype=pl.Float64).fill_nan(None),
    }, schema={"task_type": pl.String, "n": pl.UInt32, "mean": pl.Float64, "std": pl.Float64})


def with_length_ok(judged: pl.DataFrame, stats: pl.DataFrame, outlier_z: float) -> pl.DataFrame:
    """length_ok: 0 when log1p(characters) lies more than outlier_z sample std from its task
    type's mean in `stats` (length_stats of the whole population)."""
    log_length = pl.col("total_chars").cast(pl.Float64).log1p()
    too_few = (pl.col("n") < LENGTH_MIN_ROWS) | pl.col("std").is_null() | (pl.col("std") <= _STD_EPSILON)
    outlier = ((log_length - pl.col("mean")) / pl.col("std")).abs() > outlier_z
    return (judged.drop("length_ok", strict=False)
            .join(stats, on="task_type", how="left", nulls_equal=True, maintain_order="left")
            .with_columns(length_ok=pl.when(too_few | pl.col("n").is_null()).then(1.0).otherwise(_as_score(~outlier)))
            .drop("n", "mean", "std"))


def score_judges(judged: pl.DataFrame) -> pl.DataFrame:
    """heuristic_score and failed_judges from the five judges."""
    return (
        judged.with_columns(heuristic_score=2.0 * pl.mean_horizontal(*JUDGES) - 1.0)
        .with_columns(
            failed_judges=pl.concat_str(
                [pl.when(pl.col(judge) < FAIL_BELOW).then(pl.lit(judge)) for judge in JUDGES],
                separator=",",
                ignore_nulls=True,
            )
        )
        .select(OUTPUT_SCHEMA.names())
        .cast(dict(OUTPUT_SCHEMA))
    )


def _as_score(condition: pl.Expr) -> pl.Expr:
    return condition.cast(pl.Float64)


def _non_blank(text: pl.Expr) -> pl.Expr:
    return text.fill_null("").str.strip_chars() != ""


def _explode_structs(rows: pl.LazyFrame, column: str, *carried: str) -> pl.LazyFrame:
    """One row per list element (with its trajectory's row index), struct fields as columns."""
    return (
        rows.select(_ROW, column, *carried)
        .explode(column)
        .filter(pl.col(column).is_not_null())
        .unnest(column)
    )


def _tool_call_judges(rows: pl.LazyFrame, loop_repeats: int) -> pl.LazyFrame:
    """tool_call_validity, tool_success_rate and tool_call_loop, for rows with calls."""
    offered = pl.col("tools_offered").list.drop_nulls()
    known_tool = (
        pl.when(offered.list.len().fill_null(0) > 0)
        .then(offered.list.contains(pl.col("name")).fill_null(False))
        .otherwise(_non_blank(pl.col("name")))
    )
    calls = _explode_structs(rows, "tool_calls", "tools_offered").with_columns(
        valid=pl.col("arguments_valid").fill_null(False) & known_tool
    )
    rates = calls.group_by(_ROW).agg(
        tool_call_validity=pl.col("valid").cast(pl.Float64).mean(),
        tool_success_rate=pl.col("success").fill_null(False).cast(pl.Float64).mean(),
    )
    loops = _repeats_at_least(calls, ["name", "arguments"], loop_repeats, "tool_call_loop")
    return rates.join(loops, on=_ROW, how="left")


def _reply_loops(rows: pl.LazyFrame, loop_repeats: int) -> pl.LazyFrame:
    """reply_loop for rows where one non-empty assistant message repeats loop_repeats times."""
    is_reply = (pl.element().struct.field("role") == "assistant") & _non_blank(
        pl.element().struct.field("content")
    )
    # Only trajectories with enough replies can loop; grouping every message's text is costly.
    candidates = rows.filter(pl.col("turns").list.eval(is_reply).list.sum() >= loop_repeats)
    replies = _explode_structs(candidates, "turns").filter(
        (pl.col("role") == "assistant") & _non_blank(pl.col("content"))
    )
    return _repeats_at_least(replies, ["content"], loop_repeats, "reply_loop")


def _repeats_at_least(items: pl.LazyFrame, keys: list[str], times: int, flag: str) -> pl.LazyFrame:
    return (
        items.group_by(_ROW, *keys)
        .len()
        .group_by(_ROW)
        .agg(most_repeats=pl.col("len").max())
        .select(_ROW, (pl.col("most_repeats") >= times).alias(flag))
    )


def _conversation_chars() -> pl.Expr:
    content_chars = pl.element().struct.field("content").str.len_chars()
    return pl.col("turns").list.eval(content_chars).list.sum().fill_null(0)
