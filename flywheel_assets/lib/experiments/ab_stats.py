"""Sufficient statistics and estimators for A/B tests where the user is the unit.

A per-session metric m (quality_score in [-1, 1], or a 0/1 error or retry indicator)
is summed per user: Y_u = Σ m over the user's sessions, N_u = the user's session count.
An arm's metric is the ratio ΣY/ΣN (the per-session mean), whose variance comes from
the delta method over users (Deng, Knoblich, Lu 2018, "Applying the Delta Method in
Metric Analytics"), because sessions of one user are not independent.

Everything here works from `ArmStats`, seven sums per arm, so an analysis never holds
rows in memory and two disjoint sets of users combine by addition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
from scipy import special

ARMS = ("control", "treatment")
_BATCH_ROWS = 1 << 17


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm: sums over users of Y, Y², N², YN, plus the
    session-level Σm² that the seed's session t-test needs (its Σm is `sum_y`)."""

    users: int = 0
    sessions: int = 0  # ΣN
    sum_y: float = 0.0  # ΣY, which is also Σm over sessions
    sum_y2: float = 0.0  # ΣY²
    sum_n2: float = 0.0  # ΣN²
    sum_yn: float = 0.0  # ΣYN
    sum_m2: float = 0.0  # Σm² over sessions

    @property
    def sum_m(self) -> float:
        return self.sum_y

    @property
    def mean(self) -> float:
        """The per-session mean ΣY/ΣN (NaN without sessions)."""
        return self.sum_y / self.sessions if self.sessions else math.nan

    def __add__(self, other: ArmStats) -> ArmStats:
        """Exact for disjoint sets of users. A user whose sessions are split across the
        two parts counts twice and loses the cross terms of Y², so recompute from the
        whole table (`arm_stats`) when batches share users."""
        return ArmStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    merge = __add__

    @classmethod
    def from_users(cls, y: Sequence[float], n: Sequence[int], m2: Sequence[float] | None = None) -> ArmStats:
        """From per-user sums Y_u, session counts N_u and Σm² per user; m2 may be left out
        when every user has one session (then it is Y²)."""
        y_arr, n_arr = np.asarray(y, dtype=float), np.asarray(n, dtype=float)
        if m2 is None:
            if np.any(n_arr > 1):
                raise ValueError("m2 (Σm² per user) is needed when users have several sessions")
            m2_arr = y_arr * y_arr
        else:
            m2_arr = np.asarray(m2, dtype=float)
        return cls(users=int(np.count_nonzero(n_arr)), sessions=int(n_arr.sum()), sum_y=float(y_arr.sum()),
                   sum_y2=float(y_arr @ y_arr), sum_n2=float(n_arr @ n_arr), sum_yn=float(y_arr @ n_arr),
                   sum_m2=float(m2_arr.sum()))


def arm_stats(source: Any, metric_column: str = "metric", *, con: duckdb.DuckDBPyConnection | None = None,
              user_column: str = "user_id", arm_column: str = "arm") -> dict[str, ArmStats]:
    """ArmStats per arm of one metric from a sessions table (one row per session)."""
    return arm_stats_by_metric(source, [metric_column], con=con, user_column=user_column,
                               arm_column=arm_column)[metric_column]


def arm_stats_by_metric(source: Any, metric_columns: Sequence[str], *,
                        con: duckdb.DuckDBPyConnection | None = None, user_column: str = "user_id",
                        arm_column: str = "arm") -> dict[str, dict[str, ArmStats]]:
    """ArmStats per metric and arm, all metrics in one grouped query (per user, then per arm).

    `source` is a table name, view or table function (`read_parquet(...)`) of `con`, or
    an in-memory table DuckDB can scan (pyarrow, polars, pandas). Sessions where a
    metric is NULL are skipped for that metric, and a user counts for a metric only with
    at least one non-NULL session. Both arms are always in the result, empty when absent.
    """
    con = con or duckdb.connect()
    if isinstance(source, str):
        relation = source
    else:
        relation = "_ab_sessions"
        con.register(relation, _in_batches(source))
    per_user, per_arm = [], []
    for k, column in enumerate(metric_columns):
        m = f"CAST({_quote(column)} AS DOUBLE)"
        per_user.append(f"sum({m}) AS y{k}, count({m}) AS n{k}, sum({m} * {m}) AS q{k}")
        per_arm.append(f"count(*) FILTER (WHERE n{k} > 0), sum(n{k})::BIGINT, sum(y{k}), sum(y{k} * y{k}), "
                       f"sum(n{k} * n{k})::DOUBLE, sum(y{k} * n{k}), sum(q{k})")
    sql = f"""
        WITH per_user AS (
            SELECT {_quote(arm_column)} AS arm, {', '.join(per_user)}
            FROM {relation}
            GROUP BY {_quote(arm_column)}, {_quote(user_column)}
        )
        SELECT arm, {', '.join(per_arm)} FROM per_user GROUP BY arm
    """
    result = {column: {arm: ArmStats() for arm in ARMS} for column in metric_columns}
    for arm, *values in con.execute(sql).fetchall():
        for k, column in enumerate(metric_columns):
            users, sessions, *sums = values[7 * k: 7 * k + 7]
            result[column][str(arm)] = ArmStats(int(users), int(sessions or 0), *(float(s or 0.0) for s in sums))
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

    @property
    def per_user_sigma(self) -> float:
        """σ such that variance = σ²/users: the planning input of `planned_users_per_arm`."""
        return math.sqrt(self.variance * self.users)


def ratio_estimate(stats: ArmStats) -> RatioEstimate:
    """var(Ȳ/N̄) ≈ (1/n)[σ²_Y/μ_N² − 2 μ_Y σ_YN/μ_N³ + μ_Y² σ²_N/μ_N⁴] (Deng et al. 2018),
    with sample (n − 1) moments. NaN below two users or without sessions."""
    n = stats.users
    if n < 2 or stats.sessions == 0:
        return RatioEstimate(stats.mean, math.nan, n)
    mu_y, mu_n = stats.sum_y / n, stats.sessions / n
    var_y = (stats.sum_y2 - n * mu_y * mu_y) / (n - 1)
    var_n = (stats.sum_n2 - n * mu_n * mu_n) / (n - 1)
    cov_yn = (stats.sum_yn - n * mu_y * mu_n) / (n - 1)
    ratio = mu_y / mu_n
    # The same formula written as the variance of the linearisation Y − R·N, which stays
    # non-negative when rounding would make the three-term form dip below zero.
    linear = max(var_y - 2 * ratio * cov_yn + ratio * ratio * var_n, 0.0)
    return RatioEstimate(ratio, linear / (n * mu_n * mu_n), n)


@dataclass(frozen=True)
class Difference:
    """treatment − control of the ratio means, with Welch's standard error."""

    effect: float
    se: float
    df: float  # Welch–Satterthwaite
    p_value: float  # two-sided, fixed horizon
    control: RatioEstimate
    treatment: RatioEstimate


def welch_difference(control: ArmStats, treatment: ArmStats) -> Difference:
    c, t = ratio_estimate(control), ratio_estimate(treatment)
    effect = t.mean - c.mean
    se = math.sqrt(c.variance + t.variance)
    if math.isnan(se):
        return Difference(effect, se, math.nan, math.nan, c, t)
    denominator = c.variance ** 2 / (c.users - 1) + t.variance ** 2 / (t.users - 1)
    df = (c.variance + t.variance) ** 2 / denominator if denominator > 0 else math.inf
    return Difference(effect, se, df, _two_sided_t(effect, se, df), c, t)


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


def planned_users_per_arm(mde: float, sigma: float, alpha: float = 0.05, power: float = 0.8, *,
                          ship_threshold: float = 0.0) -> int:
    """Users per arm (equal split) for the sequential policy to ship a true effect `mde`
    with probability `power` at the final look, the confidence sequence tuned for that
    size (planned_units = 2n). sigma is the per-user standard deviation of the metric
    (`RatioEstimate.per_user_sigma`, or the plain std when every user has one session).

    Shipping needs the interval's lower bound above 0 and the estimate at least
    `ship_threshold` (the policy's minimum effect), so the estimate must exceed
    max(half-width, threshold): n solves mde − max(h(n), threshold) = z_power · se(n).
    Looks before the last only add chances to ship, so the real power is a little higher.
    """
    if mde <= ship_threshold:
        raise ValueError(f"an effect of {mde} cannot be shipped reliably under a threshold of {ship_threshold}")
    z_power = float(special.ndtri(power))

    def enough(n: int) -> bool:
        units = 2 * n
        se = sigma * math.sqrt(2 / n)
        half_width = math.sqrt(units) * se * cs_margin(units, cs_rho2(units, alpha), alpha)
        return mde - max(half_width, ship_threshold) >= z_power * se

    high = 2
    while not enough(high):
        high *= 2
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


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
