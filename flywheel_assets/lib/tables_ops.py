"""The operational record's tables: the model registry, offline evaluations, A/B looks and the
forget audit (re-exported by lib/tables.py, which lists every table and documents them)."""

from __future__ import annotations

import pyarrow as pa

from flywheel_assets.lib.table_schema import UTC_TS, Table, cols


MODEL_REGISTRY = Table(
    "gold", "model_registry",
    "Every model version and every change of its status, append-only: the latest row per version is its state.",
    cols(
        ("event_id", pa.string(), "uuid4 hex of the change"),
        ("version", pa.string(), "model version, e.g. base-v0 or cycle-0001-lora"),
        ("parent", pa.string(), "version it was trained from; null for a base model"),
        ("base", pa.string(), "base model version it sits on (itself for a base model)"),
        ("base_path", pa.string(), "base model directory, relative to FLYWHEEL_HOME"),
        ("adapter_path", pa.string(), "LoRA adapter directory, relative to FLYWHEEL_HOME; null for a base model"),
        ("cycle", pa.string(), "training cycle that produced it (`cycle-0001@<tenant>` in a tenant's lane: README Tenancy); null for a base model"),
        ("status", pa.string(), "candidate, canary, treatment, champion, retired or rolled_back"),
        ("traffic_share", pa.float64(), "share of traffic after this change (the champion serves what the other arms leave)"),
        ("reason", pa.string(), "why the change happened"),
        ("actor", pa.string(), "who or what made it: a sensor name, `cli:<user>`, `demo`"),
        ("changed_at", UTC_TS, "when (UTC); one order for the whole history"),
        ("metadata_json", pa.string(), "the version's metadata so far (metrics, report paths) as a JSON object"),
    ),
    key=("event_id",),
)

OFFLINE_EVALUATIONS = Table(
    "gold", "offline_evaluations",
    "Held-out results per cycle: the candidate and the champion on the same tasks, overall and per task type.",
    cols(
        ("cycle", pa.string(), "training cycle"),
        ("version", pa.string(), "model version evaluated"),
        ("role", pa.string(), "candidate or champion"),
        ("scope", pa.string(), "'overall' or a task type"),
        ("n", pa.int64(), "tasks"),
        ("success", pa.float64(), "share of tasks whose final answer the verifier accepts"),
        ("success_low", pa.float64(), "95% Wilson interval, lower end"),
        ("success_high", pa.float64(), "95% Wilson interval, upper end"),
        ("tool_name_accuracy", pa.float64(), "share calling exactly the right tools in order"),
        ("argument_accuracy", pa.float64(), "share with the right tools and arguments"),
        ("difference", pa.float64(), "candidate − champion success on the same tasks (overall rows of the candidate)"),
        ("difference_low", pa.float64(), "95% paired interval, lower end"),
        ("difference_high", pa.float64(), "95% paired interval, upper end"),
        ("gate_passed", pa.bool_(), "the promotion gate's verdict (candidate rows)"),
        ("gate_reason", pa.string(), "why"),
        ("evaluated_at", UTC_TS, "when"),
    ),
    key=("cycle", "version", "scope"),
    partition_by=("cycle",),
)

AB_RESULTS = Table(
    "gold", "ab_results",
    "Every look at every A/B test and staged-rollout step, with the decision and its reason.",
    cols(
        ("test_id", pa.string(), "ab-<treatment version>"),
        ("cycle", pa.string(), "cycle of the treatment"),
        ("treatment", pa.string(), "version under test"),
        ("control", pa.string(), "champion it is compared with"),
        ("stage", pa.string(), "gate, canary or treatment"),
        ("looked_at", UTC_TS, "when (the flywheel clock)"),
        ("outcome", pa.string(), "SHIP, ROLLBACK or CONTINUE (canary: PROCEED, ROLLBACK or CONTINUE)"),
        ("rule", pa.string(), "the rule that decided: srm, min_users, negative, guardrail, ship, max_duration, inconclusive, ..."),
        ("reason", pa.string(), "the decision in a sentence"),
        ("effect", pa.float64(), "treatment − control mean session quality"),
        ("effect_low", pa.float64(), "anytime-valid interval, lower end"),
        ("effect_high", pa.float64(), "anytime-valid interval, upper end"),
        ("p_value", pa.float64(), "fixed-horizon Welch p-value (information only)"),
        ("srm_p", pa.float64(), "sample-ratio-mismatch χ² p-value"),
        ("users_control", pa.int64(), "users in the control arm"),
        ("users_treatment", pa.int64(), "users in the treatment arm"),
        ("decision_json", pa.string(), "the whole decision, guardrails included"),
    ),
    key=("test_id", "looked_at"),
)

FORGET_REQUESTS = Table(
    "audit", "forget_requests",
    "Every `flywheel forget` and every retention expiry carried out, append-only: who asked, when, and how much went; never an identifier or content.",
    cols(
        ("request_id", pa.string(), "forget-<random hex>, or expire-<random hex> for a retention expiry"),
        ("requested_by", pa.string(), "who asked (--by; the CLI's default is cli:<user>); retention:<tenant> for an expiry"),
        ("requested_at", UTC_TS, "when (the flywheel clock)"),
        ("subject_sha256", pa.string(), "sha256 of tenant (or *) and user id: proves a request covered a user without naming them (an expiry: of tenant and cut-off)"),
        ("tenant_scoped", pa.bool_(), "the request named a tenant"),
        ("policy", pa.string(), "retire or retrain (privacy.on_forget, or --policy); expire for a retention expiry"),
        ("rows_deleted", pa.int64(), "rows deleted over every table"),
        ("rows_by_table_json", pa.string(), "rows deleted per table (JSON object)"),
        ("files_rewritten", pa.int64(), "landing and gateway journal files with lines blanked"),
        ("lines_blanked", pa.int64(), "lines blanked in those files"),
        ("cycles_tainted", pa.list_(pa.string()), "cycles whose training set held the user's (the expired sessions') trajectories"),
        ("versions_withdrawn", pa.list_(pa.string()), "model versions trained through one of those cycles (an expiry withdraws none)"),
        ("champion_after", pa.string(), "the champion after the request"),
        ("retrain_requested", pa.bool_(), "a new cycle was asked of the training trigger"),
        ("passes", pa.int64(), "delete-and-check passes it took (more than 1: a writer brought rows back)"),
    ),
    key=("request_id",),
)
