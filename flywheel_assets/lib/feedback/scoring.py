"""Implicit feedback, attribution, fusion and tiers: one grouped DuckDB pass each.

The seed scores a session with one SQL query per session (N+1); here every session
is scored by one GROUP BY over the whole event table, and the tier of every
trajectory by one CASE over the whole score table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig, FusionConfig, ScoringWeights, TierConfig
from flywheel_assets.lib.feedback.judges import JUDGES

if TYPE_CHECKING:
    from flywheel_assets.lib.feedback.calibration import FittedFusion

SCORED_EVENTS = ("output_accepted", "retry_requested", "output_edited", "session_continued", "error_reported")
_SCORED = "(" + ", ".join(f"'{e}'" for e in SCORED_EVENTS) + ")"
EXPLICIT_EVENTS = ("thumbs_up", "thumbs_down", "rating")  # the gateway's /v1/feedback; data.rating in 1–5
_EXPLICIT = "(" + ", ".join(f"'{e}'" for e in EXPLICIT_EVENTS) + ")"


def quality_sql(w: ScoringWeights, accepted: str, retries: str, edit_ratio: str, continued: str, error: str) -> str:
    """The seed's quality_score as a SQL expression over five signal columns."""
    return (
        f"greatest(-1.0, least(1.0, {w.base}"
        f" + CASE WHEN {accepted} THEN {w.accepted} ELSE {w.not_accepted} END"
        f" + CASE WHEN {retries} = 0 THEN {w.no_retry} WHEN {retries} >= {w.many_retries_at} THEN {w.many_retries} ELSE 0 END"
        f" + {w.edit_ratio} * {edit_ratio}"
        f" + CASE WHEN {continued} THEN {w.continued} ELSE 0 END"
        f" + CASE WHEN {error} THEN {w.error_reported} ELSE 0 END))"
    )


def session_feedback(con: duckdb.DuckDBPyConnection, weights: ScoringWeights) -> pa.Table:
    """One row per session with a scored event, from every event. Needs views session_events,
    trajectories. The full recompute; lib/feedback/refresh.py folds new events into the same
    rows (session_state) and gets the same answer.

    edit_ratio is the latest output_edited's (the seed keeps whichever it saw last).
    The score is attributed to the latest accepted trajectory, else to the session's
    latest logged trajectory (the attempt the user gave up on), else to the latest
    trajectory any event names. Ties in time go to the larger value, so that the order
    rows arrive in never changes the answer.
    """
    partials = session_partials(con, "session_events", "trajectories")
    con.register("_session_partials", partials)
    return finish_sessions(con, "_session_partials", weights)


# Each "latest x" is kept as x and x_at, and folded with arg_max over {ts, value}: associative,
# so a session's events can arrive in any number of batches and give the same row.
_LATEST = ("accepted_trajectory_id", "named_trajectory_id", "logged_trajectory_id", "edit_ratio")
_LATEST_AT = {"accepted_trajectory_id": "accepted_at", "named_trajectory_id": "named_at",
              "logged_trajectory_id": "logged_at", "edit_ratio": "edited_at"}


def session_partials(con: duckdb.DuckDBPyConnection, events: str, trajectories: str,
                     trajectory_sessions: str | None = None) -> pa.Table:
    """Per session, the signals of `events` (a view) and the latest trajectory `trajectories`
    logs for it, as foldable state. Only the sessions of `trajectory_sessions` (a view of
    session ids) take trajectories when given; otherwise those with an event do."""
    wanted = trajectory_sessions or f"(SELECT DISTINCT session_id FROM {events} WHERE event_type IN {_SCORED})"
    return con.execute(f"""
        WITH signals AS (
            SELECT session_id,
                   min(user_id) AS user_id, min(tenant_id) AS tenant_id,
                   bool_or(event_type = 'output_accepted') AS task_accepted,
                   count(*) FILTER (WHERE event_type = 'retry_requested') AS retry_count,
                   bool_or(event_type = 'session_continued') AS session_continued,
                   bool_or(event_type = 'error_reported') AS error_reported,
                   count(*) AS n_events, min(ts) AS first_ts, max(ts) AS last_ts,
                   arg_max(edit_ratio, {{'ts': ts, 'v': edit_ratio}}) FILTER (WHERE event_type = 'output_edited') AS edit_ratio,
                   max(ts) FILTER (WHERE event_type = 'output_edited' AND edit_ratio IS NOT NULL) AS edited_at,
                   arg_max(trajectory_id, {{'ts': ts, 'v': trajectory_id}}) FILTER (WHERE event_type = 'output_accepted') AS accepted_trajectory_id,
                   max(ts) FILTER (WHERE event_type = 'output_accepted' AND trajectory_id IS NOT NULL) AS accepted_at,
                   arg_max(trajectory_id, {{'ts': ts, 'v': trajectory_id}}) AS named_trajectory_id,
                   max(ts) FILTER (WHERE trajectory_id IS NOT NULL) AS named_at
            FROM {events}
            WHERE event_type IN {_SCORED} AND ts IS NOT NULL AND session_id IS NOT NULL
            GROUP BY session_id
        ), logged AS (
            SELECT session_id,
                   arg_max(trajectory_id, {{'ts': created_at, 'v': trajectory_id}}) AS logged_trajectory_id,
                   max(created_at) FILTER (WHERE trajectory_id IS NOT NULL) AS logged_at
            FROM {trajectories}
            WHERE session_id IN (SELECT session_id FROM {wanted}) AND created_at IS NOT NULL
            GROUP BY session_id
        )
        SELECT * FROM signals FULL JOIN logged USING (session_id)
    """).to_arrow_table()


def fold_sessions_sql(partials: str) -> str:
    """Partial states (several rows per session, any order) → one state per session."""
    latest = ",\n".join(
        f"arg_max({value}, {{'ts': {at}, 'v': {value}}}) FILTER (WHERE {at} IS NOT NULL) AS {value}, max({at}) AS {at}"
        for value, at in _LATEST_AT.items())
    return f"""
        SELECT session_id, min(user_id) AS user_id, min(tenant_id) AS tenant_id,
               coalesce(bool_or(task_accepted), false) AS task_accepted, coalesce(sum(retry_count), 0)::BIGINT AS retry_count,
               coalesce(bool_or(session_continued), false) AS session_continued,
               coalesce(bool_or(error_reported), false) AS error_reported,
               coalesce(sum(n_events), 0)::BIGINT AS n_events, min(first_ts) AS first_ts, max(last_ts) AS last_ts,
               {latest}
        FROM {partials} GROUP BY session_id"""


def finish_sessions(con: duckdb.DuckDBPyConnection, partials: str, weights: ScoringWeights) -> pa.Table:
    """Folded state → SESSION_FEEDBACK rows (sessions with a scored event only)."""
    quality = quality_sql(weights, "task_accepted", "retry_count", "coalesce(edit_ratio, 0.0)", "session_continued",
                          "error_reported")
    return con.execute(f"""
        SELECT session_id, user_id, tenant_id, task_accepted, retry_count, coalesce(edit_ratio, 0.0) AS edit_ratio,
               session_continued, error_reported, {quality} AS quality_score, n_events, first_ts, last_ts,
               coalesce(accepted_trajectory_id, logged_trajectory_id, named_trajectory_id) AS final_trajectory_id,
               accepted_trajectory_id, accepted_at, named_trajectory_id, named_at, logged_trajectory_id, logged_at,
               edited_at, strftime(first_ts AT TIME ZONE 'UTC', '%Y-%m-%d') AS first_day
        FROM ({fold_sessions_sql(partials)}) WHERE n_events > 0
        ORDER BY session_id
    """).to_arrow_table()


def tier_sql(tiers: TierConfig, score: str, human_verified: str, user_rejected: str = "false") -> str:
    """CASE expression naming the tier; [lower, next lower) so the edges never overlap.
    A trajectory its user rejected is in the last tier when `rejected_is_negative`."""
    top, second = tiers.tiers[0], tiers.tiers[1]
    cases = [f"WHEN {user_rejected} THEN '{tiers.tiers[-1].name}'"] if tiers.rejected_is_negative else []
    for position, tier in enumerate(tiers.tiers):
        name = tier.name
        if position == 0 and tiers.platinum_requires_human:
            name = f"CASE WHEN {human_verified} THEN '{top.name}' ELSE '{second.name}' END"
        else:
            name = f"'{name}'"
        cases.append(f"WHEN round({score}, 9) >= {tier.lower} THEN {name}")
    return "CASE " + " ".join(cases) + f" ELSE '{tiers.tiers[-1].name}' END"


def weight_sql(tiers: TierConfig, tier: str) -> str:
    return "CASE " + " ".join(f"WHEN {tier} = '{t.name}' THEN {t.weight}" for t in tiers.tiers) + " END"


def hand_fusion_sql(fusion: FusionConfig, implicit: str, judge: str, explicit: str) -> str:
    """The hand-weighted fusion: the weighted mean of the parts that exist (0 when none does)."""
    w_implicit, w_judge, w_explicit = fusion.implicit_weight, fusion.judge_weight, fusion.explicit_weight
    return (
        f"CASE WHEN {implicit} IS NULL AND {judge} IS NULL AND ({explicit} IS NULL OR {w_explicit} = 0) THEN 0.0"
        f" ELSE ({w_implicit} * coalesce({implicit}, 0.0) + {w_judge} * coalesce({judge}, 0.0)"
        f" + {w_explicit} * coalesce({explicit}, 0.0))"
        f" / nullif({w_implicit} * ({implicit} IS NOT NULL)::INT + {w_judge} * ({judge} IS NOT NULL)::INT"
        f" + {w_explicit} * ({explicit} IS NOT NULL)::INT, 0) END"
    )


def trajectory_scores(con: duckdb.DuckDBPyConnection, config: FlywheelConfig,
                      calibration: FittedFusion | None = None, feedback: str | None = None) -> pa.Table:
    """Fuse implicit feedback, judges and human labels into one score and tier per
    trajectory. Needs views trajectories, session_events, session_feedback,
    judge_scores, annotations.

    Attribution: the session's score goes to its final trajectory; a trajectory the
    user asked to retry (and that is not final) is scored as not accepted with its
    own retries and error reports; a line's own reward (synthetic data) is used when
    no event names the trajectory. With `calibration` (score_calibration's fit) the
    automatic score is the fitted fusion instead of the hand weights. `feedback` as in
    _fused (lib/feedback/refresh_scores.py gives the folded state of the trajectories it redoes).
    """
    tier = tier_sql(config.tiers, "combined_score", "human_verified", "user_rejected")
    return con.execute(f"""
        {_fused(config, calibration, feedback=feedback)}
        SELECT trajectory_id, session_id, tenant_id, task_type, model_version, origin, is_synthetic,
               created_at, implicit_score, attribution, judge_score, explicit_score, annotation_score, human_verified,
               user_rejected, greatest(-1.0, least(1.0, combined_score)) AS combined_score, score_source,
               {tier} AS tier, {weight_sql(config.tiers, tier)} AS weight,
               retries, errors, explicit_at, annotated_at, final_of_session,
               strftime(created_at AT TIME ZONE 'UTC', '%Y-%m-%d') AS created_day
        FROM fused ORDER BY trajectory_id
    """).to_arrow_table()


def labelled_sources(con: duckdb.DuckDBPyConnection, config: FlywheelConfig) -> pa.Table:
    """Every trajectory with a human label: the label (the latest), each score source as
    trajectory_scores attributes it, and the hand-weighted fusion the label replaced
    (`hand_score`). The views are those of trajectory_scores."""
    judges = ", ".join(JUDGES)
    return con.execute(f"""
        {_fused(config, None, labelled_only=True)}
        SELECT trajectory_id, annotation_score AS label, implicit_score, heuristic_score, llm_score, judge_score,
               explicit_score, greatest(-1.0, least(1.0, automatic_score)) AS hand_score, {judges}
        FROM fused ORDER BY trajectory_id
    """).to_arrow_table()


def feedback_partials_sql(events: str, annotations: str) -> str:
    """Per trajectory, what its users and annotators said of this very answer, foldable
    (fold_feedback_sql): its own retries and error reports (null: no scored event names
    it), its latest thumbs or rating, its latest human label."""
    rating = "TRY_CAST(json_extract_string(data_json, '$.rating') AS DOUBLE)"
    valid = (f"event_type IN {_EXPLICIT} AND (event_type <> 'rating' OR "
             "TRY_CAST(json_extract_string(data_json, '$.rating') AS INTEGER) BETWEEN 1 AND 5)")
    explicit = f"CASE event_type WHEN 'thumbs_up' THEN 1.0 WHEN 'thumbs_down' THEN -1.0 ELSE ({rating} - 3.0) / 2.0 END"
    return f"""
        SELECT trajectory_id,
               CASE WHEN count(*) FILTER (WHERE event_type IN {_SCORED}) > 0
                    THEN count(*) FILTER (WHERE event_type = 'retry_requested') END AS retries,
               bool_or(event_type = 'error_reported') FILTER (WHERE event_type IN {_SCORED}) AS errors,
               arg_max({explicit}, {{'ts': ts, 'v': {explicit}}}) FILTER (WHERE {valid}) AS explicit_score,
               max(ts) FILTER (WHERE {valid}) AS explicit_at,
               NULL::DOUBLE AS annotation_score, NULL::TIMESTAMPTZ AS annotated_at
        FROM {events}
        WHERE trajectory_id IS NOT NULL AND ts IS NOT NULL AND (event_type IN {_SCORED} OR event_type IN {_EXPLICIT})
        GROUP BY trajectory_id
        UNION ALL BY NAME
        SELECT trajectory_id, arg_max(score, {{'ts': annotated_at, 'v': score}}) AS annotation_score,
               max(annotated_at) AS annotated_at
        FROM {annotations} WHERE annotated_at IS NOT NULL GROUP BY trajectory_id"""


def fold_feedback_sql(partials: str) -> str:
    return f"""
        SELECT trajectory_id, sum(retries)::BIGINT AS retries, bool_or(errors) AS errors,
               arg_max(explicit_score, {{'ts': explicit_at, 'v': explicit_score}}) FILTER (WHERE explicit_at IS NOT NULL)
                   AS explicit_score, max(explicit_at) AS explicit_at,
               arg_max(annotation_score, {{'ts': annotated_at, 'v': annotation_score}}) FILTER (WHERE annotated_at IS NOT NULL)
                   AS annotation_score, max(annotated_at) AS annotated_at
        FROM ({partials}) GROUP BY trajectory_id"""


def _fused(config: FlywheelConfig, calibration: FittedFusion | None, labelled_only: bool = False,
           feedback: str | None = None) -> str:
    """The WITH clause both queries share: per trajectory its sources, the automatic score
    and the combined score (a human label, a golden row, else the automatic score).
    `feedback` is a relation of folded per-trajectory feedback (fold_feedback_sql); by
    default it is folded from the whole session_events and annotations views."""
    feedback = feedback or fold_feedback_sql(feedback_partials_sql("session_events", "annotations"))
    w, fusion = config.scoring, config.fusion
    superseded = quality_sql(w, "false", "retries", "0.0", "false", "errors")
    explicit = "explicit_score" if fusion.explicit_weight > 0 else "NULL::DOUBLE"
    if calibration is None:
        automatic = hand_fusion_sql(fusion, "implicit_score", "judge_score", "explicit_score")
    else:
        automatic = calibration.sql(implicit="implicit_score", heuristic="heuristic_score", llm="llm_score",
                                    explicit=explicit)
    only = "WHERE t.trajectory_id IN (SELECT trajectory_id FROM annotations)" if labelled_only else ""
    judges = ", ".join(f"j.{judge}" for judge in JUDGES)
    return f"""
        WITH feedback AS ({feedback}
        ), implicit AS (
            SELECT t.*, f.quality_score AS final_score, f.task_accepted AS final_accepted, f.session_id AS final_of_session,
                   o.retries, o.errors,
                   j.judge_score, j.heuristic_score, j.llm_score, {judges}, o.annotation_score, o.explicit_score,
                   o.explicit_at, o.annotated_at
            FROM trajectories t
            -- a trajectory two sessions end on carries one session's score: the latest session's
            LEFT JOIN (SELECT * FROM session_feedback WHERE final_trajectory_id IS NOT NULL
                       QUALIFY row_number() OVER (PARTITION BY final_trajectory_id
                                                  ORDER BY last_ts DESC, session_id DESC) = 1) f
                   ON f.final_trajectory_id = t.trajectory_id
            LEFT JOIN feedback o USING (trajectory_id)
            LEFT JOIN judge_scores j USING (trajectory_id)
            {only}
        ), attributed AS (
            SELECT *,
                CASE WHEN final_score IS NOT NULL THEN final_score
                     WHEN retries > 0 THEN {superseded}
                     WHEN reward IS NOT NULL THEN reward
                     WHEN is_synthetic THEN {fusion.synthetic_reward} END AS implicit_score,
                CASE WHEN final_score IS NOT NULL THEN 'final' WHEN retries > 0 THEN 'superseded'
                     WHEN reward IS NOT NULL OR is_synthetic THEN 'reward' ELSE 'none' END AS attribution
            FROM implicit
        ), automatic AS (
            SELECT *, {automatic} AS automatic_score FROM attributed
        ), fused AS (
            SELECT *,
                annotation_score IS NOT NULL OR origin = 'golden' AS human_verified,
                -- the user turned this answer down: asked for another, or left without accepting
                -- (or judged it so explicitly: a thumbs down or a rating under 3 rejects, a thumbs up
                -- or a rating over 3 clears what the implicit signals said)
                coalesce(annotation_score IS NULL AND origin <> 'golden'
                         AND (CASE WHEN explicit_score IS NOT NULL AND explicit_score <> 0 AND {fusion.explicit_weight} > 0
                                   THEN explicit_score < 0
                                   WHEN final_score IS NOT NULL THEN NOT final_accepted ELSE retries > 0 END),
                         false) AS user_rejected,
                CASE WHEN annotation_score IS NOT NULL THEN annotation_score
                     WHEN origin = 'golden' THEN 1.0
                     ELSE automatic_score END AS combined_score,
                CASE WHEN annotation_score IS NOT NULL THEN 'annotation' WHEN origin = 'golden' THEN 'golden'
                     WHEN implicit_score IS NOT NULL THEN 'fused' ELSE 'judges_only' END AS score_source
            FROM automatic
        )"""


def classify_tiers(scores: list[float], human_verified: list[bool], tiers: TierConfig) -> list[str]:
    """The same CASE the pipeline uses, for a list of scores (tests, notebooks)."""
    con = duckdb.connect()
    con.register("s", pa.table({"score": pa.array(scores, pa.float64()), "human": human_verified}))
    return [r[0] for r in con.execute(f"SELECT {tier_sql(tiers, 'score', 'human')} FROM s").fetchall()]
