"""Sufficient statistics and estimators for A/B tests where the user is the unit.

A per-session metric m (quality_score in [-1, 1], or a 0/1 error or retry indicator)
is summed per user: Y_u = Σ m over the user's sessions, N_u = the user's session count.
An arm's metric is the ratio ΣY/ΣN (the per-session mean), whose variance comes from
the delta method over users (Deng, Knoblich, Lu 2018, "Applying the Delta Method in
Metric Analytics"), because sessions of one user are not independent.

Three refinements live in the same sums:
* a user's weight is capped: beyond `cap` sessions, Y_u and N_u are scaled by cap/N_u
  (the user's own mean is kept), so no user dominates and the delta method's
  assumption holds; the largest raw N_u is kept to flag a heavy user;
* CUPED (Deng, Xu, Kohavi, Walker 2013): each user's pre-experiment mean quality X_u
  is a covariate; Σx, Σx², ΣxY, ΣxN give the regression of the linearised metric on X;
* NaN and infinite values never enter a sum: they are counted in `rejected`.

Everything here works from `ArmStats`, sums per arm, so an analysis never holds rows
in memory and two disjoint sets of users combine by addition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
from scipy import special

ARMS = ("control", "treatment")
_BATCH_ROWS = 1 << 17
_PER_ARM_FIELDS = 14


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm: sums over users of Y, Y², N², YN, plus the
    session-level Σm² that the seed's session t-test needs. Y and N are after the
    per-user cap; `sessions` is the raw count and `sum_n` the capped ΣN."""

    users: int = 0
    sessions: int = 0  # raw ΣN
    sum_y: float = 0.0  # ΣY (capped)
    sum_y2: float = 0.0  # ΣY²
    sum_n2: float = 0.0  # ΣN²
    sum_yn: float = 0.0  # ΣYN
    sum_m2: float = 0.0  # Σm² over sessions, uncapped (the classic policy's)
    sum_n: float | None = None  # capped ΣN; None means no cap, so `sessions`
    sum_x: float = 0.0  # covariate sums; all 0 without a covariate
    sum_x2: float = 0.0
    sum_xy: float = 0.0
    sum_xn: float = 0.0
    rejected: int = 0  # NaN or infinite values kept out of every sum
    max_sessions: int = 0  # the largest raw N_u (the heavy-user flag)

    def __post_init__(self):
        if self.sum_n is None:
            object.__setattr__(self, "sum_n", float(self.sessions))

    @property
    def sum_m(self) -> float:
        return self.sum_y

    @property
    def mean(self) -> float:
        """The per-session mean ΣY/ΣN (NaN without sessions)."""
        return self.sum_y / self.sum_n if self.sum_n else math.nan

    @property
    def top_user_share(self) -> float:
        """The heaviest user's share of the arm's raw sessions."""
        return self.max_sessions / self.sessions if self.sessions else 0.0

    def __add__(self, other: ArmStats) -> ArmStats:
        """Exact for disjoint sets of users. A user whose sessions are split across the
        two parts counts twice and loses the cross terms of Y², so recompute from the
        whole table (`arm_stats`) when batches share users."""
        summed = ArmStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))
        return replace(summed, max_sessions=max(self.max_sessions, other.max_sessions))

    merge = __add__

    @classmethod
    def from_users(cls, y: Sequence[float], n: Sequence[int], m2: Sequence[float] | None = None, *,
                   x: Sequence[float] | None = None, cap: float | None = None) -> ArmStats:
        """From per-user sums Y_u, session counts N_u and Σm² per user; m2 may be left out
        when every user has one session (then it is Y²). `x` is the covariate per user,
        `cap` the most sessions a user weighs. A user whose Y, Σm² or x is not finite is
        left out and counted in `rejected`."""
        y_arr, n_arr = np.asarray(y, dtype=float), np.asarray(n, dtype=float)
        if m2 is None:
            if np.any(n_arr > 1):
                raise ValueError("m2 (Σm² per user) is needed when users have several sessions")
            m2_arr = y_arr * y_arr
        else:
            m2_arr = np.asarray(m2, dtype=float)
        x_arr = np.zeros_like(y_arr) if x is None else np.asarray(x, dtype=float)
        finite = np.isfinite(y_arr) & np.isfinite(m2_arr) & np.isfinite(x_arr)
        rejected = int(np.count_nonzero(~finite))
        y_arr, n_arr, m2_arr, x_arr = y_arr[finite], n_arr[finite], m2_arr[finite], x_arr[finite]
        weight = np.minimum(1.0, cap / np.maximum(n_arr, 1.0)) if cap else np.ones_like(n_arr)
        yc, nc = y_arr * weight, n_arr * weight
        return cls(users=int(np.count_nonzero(n_arr)), sessions=int(n_arr.sum()), sum_y=float(yc.sum()),
                   sum_y2=float(yc @ yc), sum_n2=float(nc @ nc), sum_yn=float(yc @ nc), sum_m2=float(m2_arr.sum()),
                   sum_n=float(nc.sum()), sum_x=float(x_arr.sum()), sum_x2=float(x_arr @ x_arr),
                   sum_xy=float(x_arr @ yc), sum_xn=float(x_arr @ nc), rejected=rejected,
                   max_sessions=int(n_arr.max()) if n_arr.size else 0)


def arm_stats(source: Any, metric_column: str = "metric", *, con: duckdb.DuckDBPyConnection | None = None,
              user_column: str = "user_id", arm_column: str = "arm", covariate_column: str | None = None,
              cap: float | None = None) -> dict[str, ArmStats]:
    """ArmStats per arm of one metric from a sessions table (one row per session)."""
    return arm_stats_by_metric(source, [metric_column], con=con, user_column=user_column, arm_column=arm_column,
                               covariate_column=covariate_column, cap=cap)[metric_column]


def arm_stats_by_metric(source: Any, metric_columns: Sequence[str], *,
                        con: duckdb.DuckDBPyConnection | None = None, user_column: str = "user_id",
                        arm_column: str = "arm", covariate_column: str | None = None,
                        cap: float | None = None) -> dict[str, dict[str, ArmStats]]:
    """ArmStats per metric and arm, all metrics in one grouped query (per user, then per arm).

    `source` is a table name, view or table function (`read_parquet(...)`) of `con`, or
    an in-memory table DuckDB can scan (pyarrow, polars, pandas). Sessions where a
    metric is NULL are skipped for that metric; NaN and ±inf are skipped and counted in
    `rejected`; a user counts for a metric only with at least one finite session.
    `covariate_column` holds the user's pre-experiment value on each of their rows (NULL
    when unknown: such a user gets the mean of the known ones, which keeps the estimate
    unbiased since the covariate predates assignment). Both arms are always in the result.
    """
    con = con or duckdb.connect()
    if isinstance(source, str):
        relation = source
    else:
        relation = "_ab_sessions"
        con.register(relation, _in_batches(source))
    covariate = f"avg(CAST({_quote(covariate_column)} AS DOUBLE))" if covariate_column else "0.0"
    per_user, weighted, per_arm = [], [], []
    for k, column in enumerate(metric_columns):
        m = f"CAST({_quote(column)} AS DOUBLE)"
        ok = f"FILTER (WHERE isfinite({m}))"
        per_user.append(f"sum({m}) {ok} AS y{k}, count({m}) {ok} AS n{k}, sum({m} * {m}) {ok} AS q{k}, "
                        f"count({m}) FILTER (WHERE NOT isfinite({m})) AS bad{k}")
        w = f"least(1.0, {float(cap)} / greatest(n{k}, 1))" if cap else "1.0"
        weighted.append(f"coalesce(y{k}, 0) * {w} AS yc{k}, n{k} * {w} AS nc{k}, "
                        f"coalesce(x, avg(x) FILTER (WHERE n{k} > 0) OVER (), 0.0) AS x{k}")
        live = f"FILTER (WHERE n{k} > 0)"
        per_arm.append(f"count(*) {live}, sum(n{k})::BIGINT, sum(yc{k}), sum(yc{k} * yc{k}), sum(nc{k} * nc{k}), "
                       f"sum(yc{k} * nc{k}), sum(q{k}), sum(nc{k}), sum(x{k}) {live}, sum(x{k} * x{k}) {live}, "
                       f"sum(x{k} * yc{k}) {live}, sum(x{k} * nc{k}) {live}, sum(bad{k})::BIGINT, max(n{k})")
    sql = f"""
        WITH per_user AS (
            SELECT {_quote(arm_column)} AS arm, {', '.join(per_user)}, {covariate} AS x
            FROM {relation}
            GROUP BY {_quote(arm_column)}, {_quote(user_column)}
        ), weighted AS (
            SELECT *, {', '.join(weighted)} FROM per_user
        )
        SELECT arm, {', '.join(per_arm)} FROM weighted GROUP BY arm
    """
    result = {column: {arm: ArmStats() for arm in ARMS} for column in metric_columns}
    for arm, *values in con.execute(sql).fetchall():
        for k, column in enumerate(metric_columns):
            users, sessions, *sums, rejected, largest = values[_PER_ARM_FIELDS * k: _PER_ARM_FIELDS * (k + 1)]
            result[column][str(arm)] = ArmStats(int(users), int(sessions or 0), *(float(v or 0.0) for v in sums),
                                                rejected=int(rejected or 0), max_sessions=int(largest or 0))
    return result


def _in_batches(source: Any) -> Any:
    """DuckDB scans an arrow table one record batch per thread: a table in one big chunk
    (what `take` or a concatenation gives) would use one core. Slicing is zero-copy."""
    if isinstance(source, pl.DataFrame):
        source = source.to_arrow()
    if isinstance(source, pa.Table):
        source = pa.Table.from_batches(source.to_batches(max_chunksize=_BATCH_ROWS), source.schema)
    return source


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True)
class RatioEstimate:
    mean: float  # ΣY/ΣN
    variance: float  # delta-method variance of the mean
    users: int
    linear_variance: float = math.nan  # per-user variance of the linearised metric (Y − R·N)/μ_N
    covariance_x: float = 0.0  # its covariance with the covariate X
    variance_x: float = 0.0  # the covariate's variance
    mean_x: float = 0.0

    @property
    def per_user_sigma(self) -> float:
        """σ such that variance = σ²/users: the planning input of `lib/experiments/power.py`."""
        return math.sqrt(self.variance * self.users)


def ratio_estimate(stats: ArmStats) -> RatioEstimate:
    """var(Ȳ/N̄) ≈ (1/n)[σ²_Y/μ_N² − 2 μ_Y σ_YN/μ_N³ + μ_Y² σ²_N/μ_N⁴] (Deng et al. 2018),
    with sample (n − 1) moments. NaN below two users or without sessions."""
    n = stats.users
    if n < 2 or not stats.sum_n:
        return RatioEstimate(stats.mean, math.nan, n)
    mu_y, mu_n, mu_x = stats.sum_y / n, stats.sum_n / n, stats.sum_x / n
    var_y = (stats.sum_y2 - n * mu_y * mu_y) / (n - 1)
    var_n = (stats.sum_n2 - n * mu_n * mu_n) / (n - 1)
    cov_yn = (stats.sum_yn - n * mu_y * mu_n) / (n - 1)
    var_x = max((stats.sum_x2 - n * mu_x * mu_x) / (n - 1), 0.0)
    cov_xy = (stats.sum_xy - n * mu_x * mu_y) / (n - 1)
    cov_xn = (stats.sum_xn - n * mu_x * mu_n) / (n - 1)
    ratio = mu_y / mu_n
    # The same formula written as the variance of the linearisation Y − R·N, which stays
    # non-negative when rounding would make the three-term form dip below zero.
    linear = max(var_y - 2 * ratio * cov_yn + ratio * ratio * var_n, 0.0) / (mu_n * mu_n)
    return RatioEstimate(ratio, linear / n, n, linear, (cov_xy - ratio * cov_xn) / mu_n, var_x, mu_x)


@dataclass(frozen=True)
class Difference:
    """treatment − control of the ratio means (CUPED-adjusted when a covariate is there),
    with Welch's standard error."""

    effect: float
    se: float
    df: float  # Welch–Satterthwaite
    p_value: float  # two-sided, fixed horizon
    control: RatioEstimate
    treatment: RatioEstimate
    raw_effect: float = math.nan  # without the covariate adjustment
    variance_reduction: float = 0.0  # 1 − var(adjusted)/var(unadjusted) of the difference
    theta: float = 0.0


def welch_difference(control: ArmStats, treatment: ArmStats, *, sigma_floor: float = 0.0,
                     cuped: bool = True) -> Difference:
    """The difference with CUPED when both arms carry a covariate: θ is pooled over the
    arms (cov(L, X)/var(X), L the linearised metric), the effect is
    (R_t − θX̄_t) − (R_c − θX̄_c) and each arm's variance (var L − 2θ cov + θ² var X)/n.
    Each arm's per-user σ is at least `sigma_floor`, so an arm of identical values (two
    users at 0.5) is never a zero-width certainty."""
    c, t = ratio_estimate(control), ratio_estimate(treatment)
    raw = t.mean - c.mean
    if math.isnan(c.variance) or math.isnan(t.variance):
        return Difference(raw, math.nan, math.nan, math.nan, c, t, raw)
    pooled_var_x = (c.users - 1) * c.variance_x + (t.users - 1) * t.variance_x
    theta = 0.0
    if cuped and pooled_var_x > 0 and c.variance_x > 0 and t.variance_x > 0:
        theta = ((c.users - 1) * c.covariance_x + (t.users - 1) * t.covariance_x) / pooled_var_x

    def arm_variance(arm: RatioEstimate) -> tuple[float, float]:
        adjusted = arm.linear_variance - 2 * theta * arm.covariance_x + theta * theta * arm.variance_x
        floor = sigma_floor * sigma_floor
        return max(adjusted, floor) / arm.users, max(arm.linear_variance, floor) / arm.users

    (vc, vc_raw), (vt, vt_raw) = arm_variance(c), arm_variance(t)
    effect = raw - theta * (t.mean_x - c.mean_x)
    se = math.sqrt(vc + vt)
    reduction = 1 - (vc + vt) / (vc_raw + vt_raw) if vc_raw + vt_raw > 0 else 0.0
    denominator = vc ** 2 / (c.users - 1) + vt ** 2 / (t.users - 1)
    df = (vc + vt) ** 2 / denominator if denominator > 0 else math.inf
    return Difference(effect, se, df, _two_sided_t(effect, se, df), c, t, raw, reduction, theta)


def _two_sided_t(effect: float, se: float, df: float) -> float:
    if se == 0:
        return 1.0 if effect == 0 else 0.0
    return float(2 * special.stdtr(df, -abs(effect) / se))


def srm_p_value(control_users: int, treatment_users: int, treatment_share: float) -> float:
    """χ² goodness of fit (1 df) of the user counts against the planned split."""
    total = control_users + treatment_users
    if total == 0:
        return 1.0
    expected = (total * (1 - treatment_share), total * treatment_share)
    statistic = sum((o - e) ** 2 / e for o, e in zip((control_users, treatment_users), expected))
    return float(special.chdtrc(1, statistic))


def cs_rho2(planned_units: float, alpha: float) -> float:
    """The ρ² that makes the confidence sequence narrowest at `planned_units` units
    (the approximate optimum of Howard, Ramdas, McAuliffe, Sekhon 2021, "Time-uniform,
    nonparametric, nonasymptotic confidence sequences", for the normal mixture)."""
    log_term = 2 * math.log(1 / alpha)
    return (log_term + math.log(1 + log_term)) / planned_units


def cs_margin(units: float, rho2: float, alpha: float) -> float:
    """Half-width of the two-sided normal-mixture boundary for a unit-variance mean:
    sqrt(2(nρ² + 1)/(n²ρ²) · log(sqrt(nρ² + 1)/α))."""
    growth = units * rho2 + 1
    return math.sqrt(2 * growth / (units * units * rho2) * math.log(math.sqrt(growth) / alpha))


def confidence_sequence(diff: Difference, alpha: float, planned_units: float) -> tuple[float, float]:
    """Anytime-valid (1 − α) interval for treatment − control: an asymptotic confidence
    sequence (Waudby-Smith, Arbour, Sinha, Kennedy, Ramdas 2023, "Time-uniform central
    limit theory and asymptotic confidence sequences", Annals of Statistics; the form
    GrowthBook uses). In large samples, the probability that the true difference ever
    leaves the interval, over all looks at any numbers of users, is at most α.

    Units are the users of both arms, n = n_c + n_t, arriving one at a time and assigned
    to treatment with probability π. The difference of means is, to first order, the
    mean of the AIPW pseudo-outcomes φ = (μ_t − μ_c) + A(Y − μ_t)/π − (1 − A)(Y − μ_c)/(1 − π)
    (the paper's treatment of randomized experiments), whose variance is
    σ²_t/π + σ²_c/(1 − π); with π estimated by n_t/n that is n·(v_t + v_c), v the
    delta-method variance of each arm's mean. So σ̂ = sqrt(n·(v_c + v_t)) is the per-unit
    standard deviation, and the interval holds for unequal arms (the 90/10 split) as
    well as equal ones. For a ratio metric Y is the user's linearised value
    (Y_u − R·N_u)/μ_N.
    """
    if math.isnan(diff.se):
        return (math.nan, math.nan)
    units = diff.control.users + diff.treatment.users
    sigma_hat = math.sqrt(units) * diff.se
    half_width = sigma_hat * cs_margin(units, cs_rho2(planned_units, alpha), alpha)
    return (diff.effect - half_width, diff.effect + half_width)


@dataclass(frozen=True)
class SessionTTest:
    """The seed's test: Student's pooled-variance t-test over sessions, as if independent."""

    control_mean: float
    treatment_mean: float
    se: float
    df: float
    p_value: float


def session_t_test(control: ArmStats, treatment: ArmStats) -> SessionTTest:
    sc, st = control.sessions, treatment.sessions
    mc, mt = control.mean, treatment.mean
    if sc < 2 or st < 2:
        return SessionTTest(mc, mt, math.nan, math.nan, math.nan)
    pooled = ((control.sum_m2 - sc * mc * mc) + (treatment.sum_m2 - st * mt * mt)) / (sc + st - 2)
    se = math.sqrt(max(pooled, 0.0) * (1 / sc + 1 / st))
    df = sc + st - 2
    return SessionTTest(mc, mt, se, df, _two_sided_t(mt - mc, se, df))


def t_quantile(probability: float, df: float) -> float:
    return float(special.stdtrit(df, probability))
