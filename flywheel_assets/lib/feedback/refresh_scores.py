"""session_feedback, judge_scores and trajectory_scores refreshed from what is new.

Each refresh folds the new rows of its inputs (lib/feedback/refresh.py) into the stored
state of the rows they touch and upserts those rows (Lake.upsert); a full recompute is the same code
from an empty state, so both give the same table (flywheel_assets_tests/feedback/
test_refresh.py and benchmarks/bench_refresh.py compare them).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import polars as pl
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.feedback.judges import content_judges, length_stats, score_judges, with_length_ok
from flywheel_assets.lib.feedback.refresh import Feed, Refresh, StaleWatermark, fingerprint
from flywheel_assets.lib.feedback.scoring import (
    _EXPLICIT, _SCORED, feedback_partials_sql, finish_sessions, fold_feedback_sql, session_partials, trajectory_scores,
)
from flywheel_assets.lib.ingest.lock import ingest_lock, refresh_lock_name
from flywheel_assets.lib.lake import Lake, conform, sql_literal, utcnow
from flywheel_assets.lib.storage.key_index import keyed
from flywheel_assets.lib.tables import (
    ANNOTATIONS, JUDGE_SCORES, LLM_JUDGMENTS, SESSION_EVENTS, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES, Table,
)

EVENTS = Feed(SESSION_EVENTS, "ingested_at")
LOGGED = Feed(TRAJECTORIES, "ingested_at")
LABELS = Feed(ANNOTATIONS, "ingested_at")
GRADES = Feed(LLM_JUDGMENTS, "judged_at")
SESSIONS_CHANGED = Feed(SESSION_FEEDBACK, "updated_at", append_only=False)
JUDGES_CHANGED = Feed(JUDGE_SCORES, "updated_at", append_only=False)
_STATE_COLUMNS = ("user_id", "tenant_id", "task_accepted", "retry_count", "session_continued", "error_reported",
                  "n_events", "first_ts", "last_ts", "edit_ratio", "edited_at", "accepted_trajectory_id",
                  "accepted_at", "named_trajectory_id", "named_at", "logged_trajectory_id", "logged_at")
_FEEDBACK_COLUMNS = ("retries", "errors", "explicit_score", "explicit_at", "annotation_score", "annotated_at")
_SCORE_INPUTS = ("trajectory_id", "session_id", "tenant_id", "task_type", "model_version", "origin", "is_synthetic",
                 "created_at", "reward")


@dataclass
class Outcome:
    rows: pa.Table  # the rows written: every row in a full recompute, the changed ones otherwise
    version: int | None
    full: bool
    reason: str
    new_rows: dict[str, int]


def run_refresh(lake: Lake, output: Table, feeds: tuple[Feed, ...], settings: int, full: bool,
                body: Callable[[Refresh, duckdb.DuckDBPyConnection], tuple[pa.Table, set]]) -> Outcome:
    # Two refreshes of one table side by side would both fold the same new rows in (and upsert
    # inserts of one key twice): one at a time, by a lock beside the ingest's.
    with ingest_lock(lake.config.landing, lake.config.ingest.lock_timeout_s, owner=f"refresh {output.name}",
                     name=refresh_lock_name(output.name)):
        refresh = Refresh.plan(lake, output, feeds, settings, full)
        with _without_cycle_collection():
            try:
                rows, partitions = body(refresh, duckdb.connect())
            except StaleWatermark as stale:
                refresh = Refresh.plan(lake, output, feeds, settings, full=True)
                refresh.reason = str(stale)
                rows, partitions = body(refresh, duckdb.connect())
        now = utcnow()
        rows = rows.drop_columns([name for name in ("updated_at",) if name in rows.column_names])
        rows = conform(rows.append_column("updated_at", pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")),
                                                                   rows.num_rows)), output)
        version = refresh.commit(rows, partitions, now)
    return Outcome(rows, version, refresh.full, refresh.reason, dict(refresh.new_rows))


@contextmanager
def _without_cycle_collection():
    """Python's cycle collector paused: a refresh makes and drops hundreds of thousands of row
    dicts and strings, none in a cycle, and each full collection walks every live one (about
    1.5 s of a 1M-event day's curation)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def refresh_session_feedback(lake: Lake, config: FlywheelConfig, full: bool = False) -> Outcome:
    def body(refresh: Refresh, con: duckdb.DuckDBPyConnection):
        con.register("new_events", refresh.read_new(EVENTS, ["session_id", "trajectory_id", "user_id", "tenant_id",
                                                             "event_type", "ts", "edit_ratio"]))
        con.register("new_logged", refresh.read_new(LOGGED, ["session_id", "trajectory_id", "created_at"]))
        if refresh.full:
            partials, old = session_partials(con, "new_events", "new_logged"), None
        else:
            con.execute(f"""CREATE TEMP TABLE touched AS
                SELECT DISTINCT session_id AS key FROM new_events WHERE event_type IN {_SCORED} AND session_id IS NOT NULL
                UNION SELECT DISTINCT session_id FROM new_logged WHERE session_id IS NOT NULL""")
            con.register("old", old := keyed(con, lake, SESSION_FEEDBACK, "session_id", "touched"))
            # a session new to the table takes every trajectory logged for it; a known one only the new ones
            con.execute(f"""CREATE TEMP TABLE fresh AS
                SELECT DISTINCT session_id AS key FROM new_events WHERE event_type IN {_SCORED}
                EXCEPT SELECT session_id FROM old""")
            logged = keyed(con, lake, TRAJECTORIES, "session_id", "fresh", ["session_id", "trajectory_id", "created_at"])
            con.register("logged_before", logged)
            con.execute("CREATE TEMP TABLE logged AS SELECT * FROM new_logged UNION ALL BY NAME SELECT * FROM logged_before")
            con.execute("CREATE TEMP TABLE wanted AS SELECT key AS session_id FROM touched")
            partials = session_partials(con, "new_events", "logged", trajectory_sessions="wanted")
        con.register("partials", partials)
        state = "SELECT * FROM partials" + (f" UNION ALL BY NAME SELECT session_id, {', '.join(_STATE_COLUMNS)} FROM old"
                                            if old is not None else "")
        rows = finish_sessions(con, f"({state})", config.scoring)
        return rows, _days(rows, "first_day") | (_days(old, "first_day") if old is not None else set())

    settings = fingerprint("session_feedback", config.scoring.model_dump())
    return run_refresh(lake, SESSION_FEEDBACK, (EVENTS, LOGGED), settings, full, body)


def refresh_judge_scores(lake: Lake, config: FlywheelConfig, full: bool = False) -> Outcome:
    llm = config.llm_judge

    def body(refresh: Refresh, con: duckdb.DuckDBPyConnection):
        new = refresh.read_new(LOGGED, ["trajectory_id", "task_type", "turns", "tool_calls", "tools_offered",
                                        "final_response", "created_at"])
        judged = content_judges(pl.from_arrow(new), config.fusion).with_columns(
            created_day=pl.from_arrow(new.column("created_at")).dt.strftime("%Y-%m-%d") if new.num_rows else pl.lit(None))
        graded = set(refresh.read_new(GRADES, ["trajectory_id", "model"], where=f"model = {sql_literal(llm.model)}")
                     .column("trajectory_id").to_pylist()) if llm.enabled else set()
        old_days: set = set()
        if refresh.full:
            stats = length_stats(judged)
        else:
            # the population's lengths and verdicts counted (in DuckDB, as it reads them), no ids: a
            # verdict is a function of task type and length, so the rows whose verdict flips are
            # looked up by their lengths
            lake.register(con, JUDGE_SCORES, name="stored_judges")
            stored = pl.from_arrow(con.execute("""SELECT task_type, total_chars, length_ok, count(*) AS n
                FROM stored_judges GROUP BY ALL""").to_arrow_table())
            population = pl.concat([stored.select("task_type", "total_chars", pl.col("n").cast(pl.Int64)),
                                    judged.select("task_type", "total_chars", n=pl.lit(1, pl.Int64))])
            stats = length_stats(population)
            z = config.fusion.length_outlier_z
            flips = with_length_ok(stored.select("task_type", "total_chars", was="length_ok"), stats, z) \
                .filter(pl.col("was") != pl.col("length_ok"))["total_chars"].unique()
            con.register("lengths", pa.table({"key": flips.to_arrow().cast(pa.int64())}))
            flipped = with_length_ok(pl.from_arrow(keyed(con, lake, JUDGE_SCORES, "total_chars", "lengths",
                                                         ["trajectory_id", "task_type", "total_chars", "length_ok"]))
                                     .rename({"length_ok": "was"}), stats, z) \
                .filter(pl.col("was") != pl.col("length_ok"))["trajectory_id"].to_list()
            redo = set(flipped) | (graded - set(judged["trajectory_id"].to_list()))
            con.register("redo", pa.table({"key": pa.array(sorted(redo), pa.string())}))
            again = pl.from_arrow(keyed(con, lake, JUDGE_SCORES, "trajectory_id", "redo"))
            old_days = set(again["created_day"].to_list())
            judged = pl.concat([judged, again.select(judged.columns)], how="vertical_relaxed")
        scored = score_judges(with_length_ok(judged, stats, config.fusion.length_outlier_z))
        scored = scored.with_columns(created_day=judged["created_day"])
        rows = _with_llm(lake, config, scored)
        return rows.to_arrow(), set(rows["created_day"].to_list()) | old_days

    settings = fingerprint("judge_scores", config.fusion.model_dump(), llm.enabled, llm.model)
    return run_refresh(lake, JUDGE_SCORES, (LOGGED, GRADES) if llm.enabled else (LOGGED,), settings, full, body)


def _with_llm(lake: Lake, config: FlywheelConfig, judged: pl.DataFrame) -> pl.DataFrame:
    """The LLM judge's grade fused in where llm_judgments holds one."""
    if not config.llm_judge.enabled:
        return judged.with_columns(llm_score=pl.lit(None, dtype=pl.Float64), judge_score=pl.col("heuristic_score"))
    grades = pl.from_arrow(lake.read(LLM_JUDGMENTS, columns=["trajectory_id", "llm_score"],
                                     filter_sql=f"model = {sql_literal(config.llm_judge.model)}"))
    weight = config.fusion.llm_judge_weight
    return judged.join(grades.unique("trajectory_id", keep="last"), on="trajectory_id", how="left",
                       maintain_order="left").with_columns(
        judge_score=pl.when(pl.col("llm_score").is_not_null())
        .then((1 - weight) * pl.col("heuristic_score") + weight * pl.col("llm_score"))
        .otherwise(pl.col("heuristic_score")))


def refresh_trajectory_scores(lake: Lake, config: FlywheelConfig, calibration=None, calibration_id: str = "",
                              full: bool = False) -> Outcome:
    """`calibration` (a FittedFusion) and its id as in scoring.trajectory_scores; a new id
    recomputes every row."""

    def body(refresh: Refresh, con: duckdb.DuckDBPyConnection):
        new_ids = refresh.read_new(LOGGED, ["trajectory_id"])
        con.register("new_events", refresh.read_new(
            EVENTS, ["trajectory_id", "event_type", "ts", "data_json"],
            where=f"trajectory_id IS NOT NULL AND event_type IN {_SCORED[:-1]}, {_EXPLICIT[1:]}"))
        con.register("new_labels", refresh.read_new(LABELS, ["trajectory_id", "score", "annotated_at"]))
        sessions = refresh.read_new(SESSIONS_CHANGED, ["session_id", "final_trajectory_id"])
        judges = refresh.read_new(JUDGES_CHANGED, ["trajectory_id"])
        if refresh.full:
            lake.register(con, SESSION_FEEDBACK)
            lake.register(con, JUDGE_SCORES)
            con.register("trajectories", lake.read(TRAJECTORIES, columns=list(_SCORE_INPUTS)))
            folded = fold_feedback_sql(feedback_partials_sql("new_events", "new_labels"))
            rows = trajectory_scores(con, config, calibration, feedback=folded)
            return rows, _days(rows, "created_day")
        con.register("new_ids", new_ids)
        con.register("sessions", sessions)
        con.register("judged", judges)
        con.execute("CREATE TEMP VIEW changed_sessions AS SELECT session_id AS key FROM sessions")
        con.register("finals_before", keyed(con, lake, TRAJECTORY_SCORES, "final_of_session", "changed_sessions",
                                            ["trajectory_id"]))
        con.execute("""CREATE TEMP TABLE affected AS
            SELECT trajectory_id AS key FROM new_ids UNION SELECT trajectory_id FROM new_events
            UNION SELECT trajectory_id FROM new_labels UNION SELECT trajectory_id FROM judged
            UNION SELECT final_trajectory_id FROM sessions WHERE final_trajectory_id IS NOT NULL
            UNION SELECT trajectory_id FROM finals_before""")
        con.register("old", old := keyed(con, lake, TRAJECTORY_SCORES, "trajectory_id", "affected"))
        # a trajectory new to the table: what was said of it before it was logged (events or
        # labels ingested earlier) is read back from the history, once
        con.execute("CREATE TEMP TABLE unseen AS SELECT key FROM affected EXCEPT SELECT trajectory_id FROM old")
        # (at the versions planned: what this refresh counts as new is in them, nothing newer)
        con.register("said_before", keyed(con, lake, SESSION_EVENTS, "trajectory_id", "unseen",
                                          ["trajectory_id", "event_type", "ts", "data_json"],
                                          refresh.versions[SESSION_EVENTS.name]))
        con.register("labelled_before", keyed(con, lake, ANNOTATIONS, "trajectory_id", "unseen",
                                              ["trajectory_id", "score", "annotated_at"], refresh.versions[ANNOTATIONS.name]))
        known = "(SELECT * FROM {} WHERE trajectory_id NOT IN (SELECT key FROM unseen))"
        stored = f"SELECT trajectory_id, {', '.join(_FEEDBACK_COLUMNS)} FROM old"
        folded = fold_feedback_sql(
            f"{feedback_partials_sql(known.format('new_events'), known.format('new_labels'))} UNION ALL BY NAME "
            f"{stored} UNION ALL BY NAME {feedback_partials_sql('said_before', 'labelled_before')}")
        con.register("trajectories", keyed(con, lake, TRAJECTORIES, "trajectory_id", "affected", list(_SCORE_INPUTS)))
        con.register("session_feedback", keyed(con, lake, SESSION_FEEDBACK, "final_trajectory_id", "affected"))
        con.register("judge_scores", keyed(con, lake, JUDGE_SCORES, "trajectory_id", "affected"))
        rows = trajectory_scores(con, config, calibration, feedback=folded)
        return rows, _days(rows, "created_day") | _days(old, "created_day")

    settings = fingerprint("trajectory_scores", config.scoring.model_dump(), config.fusion.model_dump(),
                           config.tiers.model_dump(), calibration_id if calibration is not None else "")
    feeds = (LOGGED, EVENTS, LABELS, SESSIONS_CHANGED, JUDGES_CHANGED)
    return run_refresh(lake, TRAJECTORY_SCORES, feeds, settings, full, body)


def _days(rows: pa.Table, column: str) -> set:
    return set(rows.column(column).to_pylist()) if rows.num_rows else set()
