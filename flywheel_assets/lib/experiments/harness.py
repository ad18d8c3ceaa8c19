"""A simulation harness for the A/B policy with its own data model, not the usage simulator's.

Users differ (each has their own chance to accept, report an error, retry, continue),
a session's quality is the seed's formula over those discrete outcomes (so scores are
skewed and take a few dozen values), a user has 1–5 sessions on consecutive days from
the day they arrive, arrivals spread evenly over max_days, and the policy looks once a
day, stopping at its first SHIP or ROLLBACK: the way the rollout runs it. Most users
also have a few sessions before the test, whose mean quality is the CUPED covariate.

A treatment effect δ turns a rejected session into an accepted one with probability
r = δ / (0.6 (1 − E[p_accept])): acceptance moves the score by 0.6 and the seed's
formula never reaches its clamp with these outcomes, so the true effect on the
per-session mean is exactly δ. Guardrails (error reports, retries) do not move.

Everything is numpy over a batch of experiments at once; the policy itself is the
product's `decide`, fed the same sufficient statistics the lake query produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from flywheel_assets.lib.config import ABConfig, ScoringWeights
from flywheel_assets.lib.experiments.ab import decide
from flywheel_assets.lib.experiments.ab_stats import ArmStats, ratio_estimate
from flywheel_assets.lib.experiments.power import PRIMARY, Plan, make_plan

GUARDRAILS = ("error_reported", "retried")
_START = np.datetime64("2026-01-01T00:00:00")


@dataclass(frozen=True)
class Population:
    """The harness's users: Beta(a, b) per-user chances and discrete session outcomes."""

    accept: tuple[float, float] = (2.0, 1.5)
    error: tuple[float, float] = (0.6, 10.0)
    retry: tuple[float, float] = (0.8, 5.0)
    many_retries: float = 0.25  # of sessions with a retry, the share with ≥ 3
    continued: tuple[float, float] = (2.0, 2.0)
    edit_ratios: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0)
    edit_probs: tuple[float, ...] = (0.6, 0.2, 0.15, 0.05)
    session_probs: tuple[float, ...] = (0.35, 0.25, 0.18, 0.12, 0.10)  # 1..5 sessions
    pre_session_probs: tuple[float, ...] = (0.3, 0.2, 0.2, 0.1, 0.1, 0.1)  # 0..5 sessions before the test
    weights: ScoringWeights = field(default_factory=ScoringWeights)

    @property
    def rescue(self) -> float:
        """r per unit of δ: the chance per unit effect that a rejected session is accepted."""
        w = self.weights
        return 1.0 / ((w.accepted - w.not_accepted) * (1 - self.accept[0] / sum(self.accept)))


@dataclass(frozen=True)
class Setting:
    name: str
    effect: float = 0.0
    share: float = 0.09
    heavy_users: int = 0  # per experiment, each with heavy_sessions spread over the days
    heavy_sessions: int = 10_000
    treatment_loss: float = 0.0  # share of treatment users whose sessions never arrive (SRM)


@dataclass
class Outcome:
    setting: Setting
    experiments: int
    users: int
    ship: float
    rollback: float
    srm_detected: float
    median_days_to_ship: float | None
    variance_reduction: float
    heavy_flagged: float

    def row(self) -> dict:
        return {"setting": self.setting.name, "effect": self.setting.effect, "share": self.setting.share,
                "experiments": self.experiments, "users": self.users, "ship": self.ship, "rollback": self.rollback,
                "srm_detected": self.srm_detected, "median_days_to_ship": self.median_days_to_ship,
                "variance_reduction": self.variance_reduction, "heavy_flagged": self.heavy_flagged}


def _sessions(rng: np.random.Generator, population: Population, chances: dict[str, np.ndarray], shape: tuple,
              rescue: np.ndarray | float = 0.0) -> dict[str, np.ndarray]:
    """Quality, error and retry of sessions of shape (..., users, k) by the seed's formula."""
    w = population.weights

    def draw(p):
        return rng.random(shape) < p[..., None]
    p_accept = chances["accept"] + rescue * (1 - chances["accept"])
    accepted = draw(p_accept)
    error = draw(chances["error"])
    retried = draw(chances["retry"])
    many = retried & (rng.random(shape) < population.many_retries)
    continued = draw(chances["continued"])
    edit = np.asarray(population.edit_ratios)[
        np.searchsorted(np.cumsum(population.edit_probs), rng.random(shape), side="right").clip(
            0, len(population.edit_ratios) - 1)]
    quality = (w.base + np.where(accepted, w.accepted, w.not_accepted) + np.where(~retried, w.no_retry, 0.0)
               + np.where(many, w.many_retries, 0.0) + w.edit_ratio * edit + np.where(continued, w.continued, 0.0)
               + np.where(error, w.error_reported, 0.0))
    return {"quality": np.clip(quality, -1.0, 1.0), "error_reported": error.astype(float),
            "retried": retried.astype(float)}


def _chances(rng: np.random.Generator, population: Population, shape: tuple) -> dict[str, np.ndarray]:
    return {name: rng.beta(*getattr(population, name), size=shape)
            for name in ("accept", "error", "retry", "continued")}


def _counts(rng: np.random.Generator, probs: tuple[float, ...], shape: tuple, start: int) -> np.ndarray:
    return start + np.searchsorted(np.cumsum(probs), rng.random(shape), side="right").clip(0, len(probs) - 1)


def pilot_sigmas(rng: np.random.Generator, population: Population, days: int, users: int = 20_000) -> dict[str, float]:
    """Per-user σ of each metric on champion-only traffic over the last `days`, as the rollout
    measures it before a test: users arrive over the window, so the late ones are seen for a
    session or two, exactly as at a test's last look."""
    chances = _chances(rng, population, (users,))
    n = _counts(rng, population.session_probs, (users,), 1)
    seen = np.clip(days - rng.integers(0, days, size=users), 0, n)
    sessions = _sessions(rng, population, chances, (users, len(population.session_probs)))
    mask = np.arange(len(population.session_probs)) < seen[:, None]
    return {name: ratio_estimate(ArmStats.from_users((values * mask).sum(1), seen, np.zeros(users))).per_user_sigma
            for name, values in sessions.items()}


_FIELDS = 14  # ArmStats fields, in order


def _arm_fields(ys: dict[str, np.ndarray], n: np.ndarray, x: np.ndarray, treated: np.ndarray,
                cap: float) -> dict[str, np.ndarray]:
    """ArmStats fields per metric, experiment and arm, shape (batch, 2, 14), from per-user
    arrays (batch, users): one batched matrix product per metric against the arm masks."""
    live = n > 0
    weight = np.minimum(1.0, cap / np.maximum(n, 1))
    nc = n * weight
    arms = np.stack([~treated & live, treated & live], axis=-1).astype(float)  # (batch, users, 2)
    xl = x * live
    shared = np.stack([live, n, nc * nc, nc, xl, xl * x, x * nc]).astype(float).transpose(1, 0, 2) @ arms
    largest = np.stack([np.where(~treated, n, 0).max(1), np.where(treated, n, 0).max(1)], axis=-1)
    zeros = np.zeros_like(largest, dtype=float)
    result = {}
    for name, y in ys.items():
        yc = y * weight
        own = np.stack([yc, yc * yc, yc * nc, x * yc]).transpose(1, 0, 2) @ arms  # (batch, 4, 2)
        columns = [shared[:, 0], shared[:, 1], own[:, 0], own[:, 1], shared[:, 2], own[:, 2], zeros, shared[:, 3],
                   shared[:, 4], shared[:, 5], own[:, 3], shared[:, 6], zeros, largest]
        result[name] = np.stack(columns, axis=-1)
    return result


def _as_arm(row: np.ndarray) -> ArmStats:
    return ArmStats(int(row[0]), int(round(row[1])), *(float(v) for v in row[2:12]), rejected=int(row[12]),
                    max_sessions=int(row[13]))


def run_setting(setting: Setting, config: ABConfig, users: int, experiments: int, seed: int,
                population: Population | None = None, batch: int = 16) -> Outcome:
    """`experiments` tests of `users` users each (both arms, arriving over max_days), looked
    at daily with `config`; the rate of each first decision."""
    population = population or Population()
    config = config.model_copy(update={"treatment_share": setting.share})
    rng = np.random.default_rng(seed)
    days = int(math.ceil(config.max_days))
    width = len(population.session_probs)
    ships, rollbacks, srm, ship_days, reductions, heavy = 0, 0, 0, [], [], 0
    for start in range(0, experiments, batch):
        b = min(batch, experiments - start)
        shape = (b, users)
        chances = _chances(rng, population, shape)
        treated = rng.random(shape) < setting.share
        n = _counts(rng, population.session_probs, shape, 1)
        if setting.treatment_loss:
            n = np.where(treated & (rng.random(shape) < setting.treatment_loss), 0, n)
        arrival = rng.integers(0, days, size=shape)
        rescue = setting.effect * population.rescue * treated
        sessions = _sessions(rng, population, chances, (*shape, width), rescue)
        prefix = {name: np.concatenate([np.zeros((*shape, 1)), np.cumsum(v, axis=-1)], axis=-1)
                  for name, v in sessions.items()}
        x = _covariate(rng, population, chances, shape)
        heavy_part = _heavy(rng, population, setting, b, days)
        decided = np.zeros(b, dtype=bool)
        srm_seen = np.zeros(b, dtype=bool)
        for look in range(1, days + 1):
            seen = np.clip(look - arrival, 0, n)
            y = {name: np.take_along_axis(p, seen[..., None], axis=-1)[..., 0] for name, p in prefix.items()}
            arm_n, arm_x, arm_t = seen, x, treated
            if heavy_part is not None:
                hy, hn, hx, ht = heavy_part(look)
                y = {name: np.concatenate([y[name], hy[name]], axis=1) for name in y}
                arm_n, arm_x, arm_t = (np.concatenate([a, h], axis=1) for a, h in ((seen, hn), (x, hx), (treated, ht)))
            imputed = _impute(arm_x, arm_n > 0)
            fields = _arm_fields(y, arm_n, imputed, arm_t, config.max_sessions_per_user)
            now = (_START + np.timedelta64(look, "D")).astype(object)
            for k in np.flatnonzero(~decided):
                arms = {name: (_as_arm(f[k, 0]), _as_arm(f[k, 1])) for name, f in fields.items()}
                decision = decide(*arms[PRIMARY], config, started_at=_START.astype(object), now=now,
                                  guardrails={g: arms[g] for g in GUARDRAILS})
                srm_seen[k] |= "srm" in decision.flags
                if look == days:
                    reductions.append(decision.details["variance_reduction"])
                    heavy += "heavy_user" in decision.flags
                if decision.outcome == "SHIP":
                    ships += 1
                    ship_days.append(look)
                elif decision.outcome == "ROLLBACK":
                    rollbacks += 1
                if decision.outcome != "CONTINUE":
                    decided[k] = True
                    if look < days:
                        reductions.append(decision.details["variance_reduction"])
                        heavy += "heavy_user" in decision.flags
        srm += int(srm_seen.sum())
    return Outcome(setting, experiments, users, ships / experiments, rollbacks / experiments, srm / experiments,
                   float(np.median(ship_days)) if ship_days else None, float(np.mean(reductions)),
                   heavy / experiments)


def _covariate(rng: np.random.Generator, population: Population, chances: dict[str, np.ndarray],
               shape: tuple) -> np.ndarray:
    """Each user's mean quality over their sessions before the test (NaN without any)."""
    pre = _counts(rng, population.pre_session_probs, shape, 0)
    width = len(population.pre_session_probs) - 1
    quality = _sessions(rng, population, chances, (*shape, width))["quality"]
    total = (quality * (np.arange(width) < pre[..., None])).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pre > 0, total / pre, np.nan)


def _impute(x: np.ndarray, live: np.ndarray) -> np.ndarray:
    """A user without a covariate gets the mean of the known ones (as the lake query does)."""
    known = np.isfinite(x) & live
    mean = np.where(known, x, 0.0).sum(1) / np.maximum(known.sum(1), 1)
    return np.where(np.isfinite(x), x, mean[:, None])


def _heavy(rng: np.random.Generator, population: Population, setting: Setting, batch: int, days: int):
    """Heavy users drawn from the same model, their sessions spread evenly over the days:
    a function of the look giving (y by metric, n, x, treated), each (batch, heavy_users)."""
    if not setting.heavy_users:
        return None
    shape = (batch, setting.heavy_users)
    chances = _chances(rng, population, shape)
    treated = rng.random(shape) < setting.share
    rescue = setting.effect * population.rescue * treated
    sessions = _sessions(rng, population, chances, (*shape, setting.heavy_sessions), rescue)
    prefix = {name: np.concatenate([np.zeros((*shape, 1)), np.cumsum(v, axis=-1)], axis=-1)
              for name, v in sessions.items()}
    x = _covariate(rng, population, chances, shape)

    def at(look: int):
        seen = setting.heavy_sessions * look // days
        return ({name: p[..., seen] for name, p in prefix.items()}, np.full(shape, seen), x, treated)
    return at


def plan_for(config: ABConfig, share: float, seed: int, population: Population | None = None) -> Plan:
    """The plan the rollout would make from a champion-only pilot of this population."""
    sigmas = pilot_sigmas(np.random.default_rng(seed), population or Population(), int(math.ceil(config.max_days)))
    return make_plan(config.model_copy(update={"treatment_share": share}), sigmas, share)
