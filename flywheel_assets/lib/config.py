"""The one configuration object. Every default is a number from the seed chapter.

Settings come from an optional JSON file named by FLYWHEEL_CONFIG (any subset of
the fields below, nested by section) and FLYWHEEL_HOME for the runtime root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

# the release settings (trigger, A/B test, rollout) and the gateway's live in their own modules;
# re-exported here
from flywheel_assets.lib.config_release import ABConfig, PhaseConfig, RolloutConfig, TriggerConfig  # noqa: F401
from flywheel_assets.lib.config_serving import GatewayConfig, UpstreamConfig  # noqa: F401
from flywheel_assets.lib.tenancy import TenancyConfig  # noqa: F401

DEFAULT_HOME = "data/home"


class ScoringWeights(BaseModel):
    """The seed's quality_score: 0.5 plus these terms, clamped to [-1, 1]."""

    base: float = 0.5
    accepted: float = 0.3
    not_accepted: float = -0.3
    no_retry: float = 0.1
    many_retries: float = -0.2
    many_retries_at: int = 3
    edit_ratio: float = -0.3
    continued: float = 0.1
    error_reported: float = -0.4


class TierSpec(BaseModel):
    name: str
    lower: float  # inclusive lower edge; the top tier also includes its upper edge
    weight: float
    description: str


class TierConfig(BaseModel):
    """Seed ranges made non-overlapping: each tier is [lower, next tier's lower)."""

    tiers: list[TierSpec] = Field(
        default_factory=lambda: [
            TierSpec(name="platinum", lower=0.85, weight=5.0, description="Human-verified"),
            TierSpec(name="gold", lower=0.60, weight=2.0, description="High-confidence auto-judged"),
            TierSpec(name="silver", lower=0.30, weight=1.0, description="Clear implicit acceptance signal"),
            TierSpec(name="bronze", lower=-1.0, weight=0.3, description="Negative training examples"),
        ]
    )
    # The seed describes platinum as human-verified: without a human label a score
    # in platinum's range is capped at the next tier down.
    platinum_requires_human: bool = True
    # The seed's silver is a "clear implicit acceptance signal", yet its quality_score gives
    # an answer the user asked to retry 0.5 − 0.3 = 0.2, and judges that check form, not
    # truth, lift the fused score into silver: the model would learn the answers its users
    # turned down. A trajectory its user rejected (retried, or left without accepting) is
    # therefore a negative example, in the last tier, unless a human label says otherwise.
    rejected_is_negative: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> "TierConfig":
        lowers = [t.lower for t in self.tiers]
        if lowers != sorted(lowers, reverse=True):
            raise ValueError("tiers must be listed from the highest lower edge to the lowest")
        if self.tiers[-1].lower > -1.0:
            raise ValueError("the last tier must start at -1.0 so that every score has a tier")
        return self

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def weights(self) -> dict[str, float]:
        return {t.name: t.weight for t in self.tiers}


class FusionConfig(BaseModel):
    """combined_score = implicit_weight * implicit + judge_weight * judges + explicit_weight *
    explicit (renormalised over the parts that exist); a human annotation replaces it.
    explicit is the user's latest thumbs (up +1, down −1) or rating r of 1–5 ((r − 3) / 2) on
    that very answer: the strongest signal a user gives, so it weighs most by default."""

    implicit_weight: float = 0.7
    judge_weight: float = 0.3
    explicit_weight: float = Field(1.4, ge=0.0)  # 0 leaves thumbs and ratings out of the score
    llm_judge_weight: float = 0.5  # share of the LLM judge in judge_score, when it is enabled
    # Replace the hand weights above with score_calibration's latest fit to human labels. Off by
    # default: the fit is only as good as the labels behind it (a few dozen in the demo, chosen by
    # people rather than drawn at random), and turning it on moves rows between tiers and so into
    # or out of training sets: a person should see its before/after agreement first.
    calibrated: bool = False
    synthetic_reward: float = 0.8
    length_outlier_z: float = 3.0
    loop_repeats: int = 3


class CalibrationConfig(BaseModel):
    """score_calibration (lib/feedback/calibration.py): a logistic regression of the human labels'
    sign (good > 0, bad < 0) on the score sources, with an L2 penalty, judged by k-fold
    cross-validation. Below min_labels labels, or min_per_class of either verdict, it reports each
    source's agreement with people but fits nothing."""

    min_labels: int = Field(30, ge=2)
    min_per_class: int = Field(10, ge=2)  # every fold then holds both verdicts
    folds: int = Field(5, ge=2)
    # penalty l2/2·|w|² beside the summed log-loss (the intercept is free): its pull towards 0 stays
    # the same while the log-loss grows with the labels, so it steadies a fit on 30 labels and
    # fades on 3,000 (and keeps weights finite when one source separates good from bad exactly)
    l2: float = Field(1.0, gt=0.0)
    seed: int = 0  # which labels share a fold

    @model_validator(mode="after")
    def _folds_hold_both_verdicts(self) -> "CalibrationConfig":
        if self.min_per_class < self.folds:
            raise ValueError("calibration.min_per_class must be at least calibration.folds")
        return self


class PrivacyConfig(BaseModel):
    """What `flywheel forget` does with the model versions trained on a forgotten user's data
    (README: Privacy). Both take them out of service and put the newest clean champion back;
    `retrain` also starts a new cycle on the data as it now is (gate, canary and A/B as usual)."""

    on_forget: Literal["retire", "retrain"] = "retire"
    # A forget waits this long for the runs that write what they derived from the lake (a training
    # run, curation) to finish, and those runs wait this long for a forget (README: Privacy)
    lock_timeout_s: float = 3600.0


class CurationConfig(BaseModel):
    target_size: int = 5000
    seed: int = 0
    holdout_fraction: float = 0.05
    near_duplicate_jaccard: float = 0.9
    high_quality_threshold: float = 0.7
    # budget a tier cannot fill goes to better tiers with candidates left (select.tier_budgets)
    spare_to_better_tiers: bool = True
    # a teacher's correction of a request users failed is taken before the tier's other rows:
    # the teacher was paid for it, and drawn at random among the users' own answers half of
    # them were left out of the dataset (README "The proof")
    corrections_first: bool = True

    def budgets(self, tiers: TierConfig) -> dict[str, int]:
        n = self.target_size
        seed_budgets = {
            "platinum": max(50, n // 25),
            "gold": max(200, n // 5),
            "silver": max(500, n // 2),
            "bronze": max(100, n // 10),
        }
        return {name: seed_budgets.get(name, n) for name in tiers.names}


class IngestConfig(BaseModel):
    max_line_bytes: int = 1_000_000
    batch_lines: int = 500_000
    # A line nested deeper than this (objects and arrays) is quarantined as too_deep: Python's
    # json and everything downstream recurse per level, and no real conversation needs more.
    max_json_depth: int = 100
    # How long an ingest waits for another one over the same landing zone before it gives up.
    lock_timeout_s: float = 600.0
    # Our own leftovers older than this are deleted by the next ingest: `flywheel ingest`'s
    # staging copies and the Delta files a failed write left in a bronze table.
    stale_after_s: float = 3600.0


class TeacherEndpointConfig(BaseModel):
    """The teacher's OpenAI-compatible endpoint, used when cold_start.teacher is "openai"
    (FLYWHEEL_TEACHER_URL / _MODEL / _API_KEY)."""

    url: str | None = None
    model: str = "gpt-4o"
    api_key: str | None = None


class LLMJudgeConfig(BaseModel):
    """Off unless FLYWHEEL_LLM_JUDGE_URL is set (any OpenAI-compatible endpoint)."""

    url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout_s: float = 30.0
    max_trajectories_per_run: int = 200

    @property
    def enabled(self) -> bool:
        return bool(self.url)


class ColdStartConfig(BaseModel):
    """Phase 0: the shipped golden trajectories plus synthetic ones from a teacher."""

    synthetic_trajectories: int = 1500  # tasks the teacher is given (fewer when the domain has fewer)
    seed: int = 11
    # "scripted" (alias "oracle"): the domain's reference answers, offline; or "openai":
    # FLYWHEEL_TEACHER_URL / _MODEL / _API_KEY
    teacher: str = "scripted"
    golden_file: str | None = None  # trajectories copied as they are; None: the shipped file, built-in domain only


class CorrectionsConfig(BaseModel):
    """Teacher corrections (lib/feedback/corrections.py): each day up to daily_budget requests
    users gave up on are solved again by the cold-start teacher and land as trajectories with
    origin `correction`. 0 turns them off."""

    daily_budget: int = Field(300, ge=0)
    seed: int = 17


class BaseModelConfig(BaseModel):
    """The embedded base model (a ≈2.5M-parameter Llama), or any HF model id / local path."""

    model_id: str | None = None
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    max_length: int = 128
    pretrain_steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0


class LoraConfigModel(BaseModel):
    """FINDINGS.md: r64 on every linear layer plus the embeddings at lr 3e-3 beat full
    fine-tuning of a 1M-parameter model; lr 1e-2 diverged. The embedded model keeps
    input and output embeddings untied so that a merged adapter equals the unmerged one
    (a LoRA on a tied embedding would change the output layer only once merged)."""

    rank: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"])
    learning_rate: float = 3e-3
    # Measured on a demo's cycle-2 data over its cycle-1 champion (600 held-out tasks, README
    # "LoRA adapter per cycle"): 200 steps with DPO 0.3 gave 57.0%, 300 steps with DPO 0.1 63.3%.
    steps: int = 300
    batch_size: int = 32
    dpo_beta: float = 0.1
    dpo_weight: float = 0.1
    seed: int = 0


class EvaluationConfig(BaseModel):
    tasks: int = 600  # held-out tasks evaluated (the first of the domain's held-out set)
    gate_margin: float = 0.02
    batch_size: int = 300
    max_new_tokens: int = Field(40, ge=1)  # per assistant turn; a BFCL turn with several calls needs ~200


class DomainConfig(BaseModel):
    """The tasks, tools and checker the model is trained and judged on (lib/domains, docs/domains.md).

    name: `builtin` (the embedded default's five task types), `bfcl` (Berkeley Function-Calling
    Leaderboard files), or `package.module:factory` — your own Domain, built from `options`.
    """

    name: str = "builtin"
    data_dir: str | None = None  # bfcl: a folder in BFCL's format; default the bfcl-eval package's data
    categories: list[str] = Field(default_factory=lambda: [
        "simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple"])
    heldout_fraction: float = Field(0.2, ge=0.0, le=1.0)  # share of tasks held out, split by task id
    split_seed: int = 0
    heldout_tasks: int = Field(600, ge=1)  # builtin: size of its fixed held-out set
    options: dict = Field(default_factory=dict)  # passed to a plug-in's factory


class MaintenanceConfig(BaseModel):
    """lake_maintenance (README: Storage upkeep): retention, tiers, compaction and vacuum."""

    vacuum_retention_hours: float = Field(24.0, ge=0)  # files out of the log this long are deleted (unless pinned)
    # a tiered table's rows ingested longer ago move to the cold tier (lib/storage/tiers.py); None: never
    cold_after_days: float | None = Field(30.0, ge=0)
    zorder: bool = True  # Z-order the tiered tables' hot rows on session_id when rows came in since
    # per-tenant retention (lib/privacy/retention.py): a tenant's sessions whose last activity is
    # older than its days are deleted everywhere; `retention_days` for every tenant not listed in
    # `tenant_retention_days`. None: kept forever
    retention_days: float | None = Field(None, gt=0)
    tenant_retention_days: dict[str, float | None] = Field(default_factory=dict)

    @field_validator("tenant_retention_days")
    @classmethod
    def _positive(cls, days: dict[str, float | None]) -> dict[str, float | None]:
        if bad := {tenant: d for tenant, d in days.items() if d is not None and d <= 0}:
            raise ValueError(f"a retention is a number of days above 0 (or null: kept forever), got {bad}")
        return days

    def retention_for(self, tenant: str) -> float | None:
        return self.tenant_retention_days.get(tenant, self.retention_days)

    @property
    def expires(self) -> bool:
        return self.retention_days is not None or any(d is not None for d in self.tenant_retention_days.values())


class VelocityConfig(BaseModel):
    """flywheel_velocity: how much history the score, the bottleneck and the throughputs cover."""

    window_cycles: int = Field(3, ge=1)  # latest concluded cycles the score and the bottleneck average over
    throughput_days: float = Field(14.0, gt=0)  # throughput per stage over the last days (the seed's forced trigger)


class LoopHealthConfig(BaseModel):
    """loop_health: warn and alert thresholds of each negative-feedback-loop check (README: Loop health).

    Shares and rates are in [0, 1]; held-out success and acceptance are shares of tasks.
    """

    # share of a cycle's training rows made by the loop itself (teacher-synthetic, or usage
    # served by an adapter the flywheel trained); higher is worse
    loop_data_share_warn: float = 0.9
    loop_data_share_alert: float = 0.97
    # held-out success of the cycle's candidate below the best champion so far; a drop, higher is worse
    heldout_drift_warn: float = 0.05
    heldout_drift_alert: float = 0.10
    # share of trajectories users accepted as they were that a heuristic judge fails; higher is worse
    judge_disagreement_warn: float = 0.10
    judge_disagreement_alert: float = 0.20
    # first-attempt acceptance (without edit) minus held-out success of the same model version;
    # higher is worse, and it must also be significant (z ≥ divergence_min_z)
    online_divergence_warn: float = 0.08
    online_divergence_alert: float = 0.15
    divergence_min_z: float = 2.0
    # distinct n-grams of the cycle's training text over the first cycle's; lower is worse
    ngram_diversity_warn: float = 0.8
    ngram_diversity_alert: float = 0.6
    # task-type entropy of the rows the model learns from (non-bronze), over log(types); lower is worse
    task_entropy_warn: float = 0.8
    task_entropy_alert: float = 0.6
    ngram: int = Field(2, ge=1)
    diversity_sample: int = Field(300, ge=10)  # rows per cycle the n-grams are counted on (size-independent)
    min_trajectories: int = Field(30, ge=1)  # fewer usage trajectories in a cycle's window: no verdict


class SimulationConfig(BaseModel):
    """Demo mode: simulated users, one day of usage per tick of the `simulated_users` sensor
    (README: Usage simulator). Off by default when a real model is configured
    (base_model.model_id): fake users must not mix with real ones unless asked for."""

    # None: on for the embedded model only; true also with a real model (the opt-in real-model
    # profile, data/profiles/): simulated users then use it like real ones would
    enabled: bool | None = None
    users_per_tick: int = Field(100, ge=1)  # the same users every day: also the A/B test's population
    sessions_per_user: tuple[int, int] = (1, 2)  # inclusive range, drawn per user and day
    interval_minutes: float = Field(5.0, ge=0)  # wall time from the end of one simulated day to the next
    biased_users: float = Field(0.0, ge=0.0, le=1.0)  # share of users who accept wrong answers too
    seed: int = 0
    # the gateway's address (e.g. http://127.0.0.1:8000): the users then go through it over HTTP
    # like real agents (set gateway.trust_client_time there); None: they call the models in-process
    via_gateway: str | None = None


class FlywheelConfig(BaseModel):
    home: Path = Path(DEFAULT_HOME)
    models_root: Path | None = None  # the model store (base, adapters); None: FLYWHEEL_HOME/models
    scoring: ScoringWeights = Field(default_factory=ScoringWeights)
    tiers: TierConfig = Field(default_factory=TierConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    tenancy: TenancyConfig = Field(default_factory=TenancyConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    maintenance: MaintenanceConfig = Field(default_factory=MaintenanceConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    llm_judge: LLMJudgeConfig = Field(default_factory=LLMJudgeConfig)
    teacher: TeacherEndpointConfig = Field(default_factory=TeacherEndpointConfig)
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    corrections: CorrectionsConfig = Field(default_factory=CorrectionsConfig)
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    lora: LoraConfigModel = Field(default_factory=LoraConfigModel)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    domain: DomainConfig = Field(default_factory=DomainConfig)
    trigger: PhaseConfig = Field(default_factory=PhaseConfig)
    ab: ABConfig = Field(default_factory=ABConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    velocity: VelocityConfig = Field(default_factory=VelocityConfig)
    loop_health: LoopHealthConfig = Field(default_factory=LoopHealthConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    def simulation_off(self) -> str | None:
        """Why simulated users must not run here, or None in demo mode."""
        if self.simulation.enabled is False:
            return "simulation.enabled is false"
        if self.base_model.model_id and not self.simulation.enabled:
            return (f"a real model is configured (base_model.model_id = {self.base_model.model_id}) "
                    "and simulation.enabled is not true")
        return None

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def lake(self) -> Path:
        return self.home / "lake"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def models(self) -> Path:
        return self.models_root.resolve() if self.models_root else self.home / "models"

    def stored_path(self, path: Path) -> str:
        """A path as the registry keeps it: relative to home when under it (a home moves whole),
        absolute otherwise (a model store elsewhere); readers join it to home either way."""
        return str(path.relative_to(self.home)) if path.is_relative_to(self.home) else str(path.resolve())

    @property
    def reports(self) -> Path:
        return self.home / "reports"


# The settings an environment variable may set, in one place: load_config reads them (the CLI,
# notebooks), the Dagster resources name them as dg.EnvVar (the UI shows the name, not the value).
# (section, field, variable); the lake's root and credentials are Lake's (lib/lake.py).
ENVIRONMENT = (
    ("llm_judge", "url", "FLYWHEEL_LLM_JUDGE_URL"), ("llm_judge", "model", "FLYWHEEL_LLM_JUDGE_MODEL"),
    ("llm_judge", "api_key", "FLYWHEEL_LLM_JUDGE_API_KEY"),
    ("teacher", "url", "FLYWHEEL_TEACHER_URL"), ("teacher", "model", "FLYWHEEL_TEACHER_MODEL"),
    ("teacher", "api_key", "FLYWHEEL_TEACHER_API_KEY"), (None, "models_root", "FLYWHEEL_MODELS_DIR"),
)


def load_config(home: str | os.PathLike | None = None, config_path: str | None = None,
                environ=None) -> FlywheelConfig:
    """Read FLYWHEEL_CONFIG (JSON), FLYWHEEL_HOME and the ENVIRONMENT settings; explicit arguments win."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get("FLYWHEEL_CONFIG")
    raw: dict = json.loads(Path(path).read_text()) if path else {}
    raw["home"] = str(home or raw.get("home") or environ.get("FLYWHEEL_HOME") or DEFAULT_HOME)
    for section, key, variable in ENVIRONMENT:
        if environ.get(variable):
            (raw.setdefault(section, {}) if section else raw)[key] = environ[variable]
    return FlywheelConfig.model_validate(raw)
