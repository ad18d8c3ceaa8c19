"""The comparison arms: what the same training gives without the flywheel, or without a part of it.

Every arm trains what the champion trained — one LoRA adapter per cycle of the champion's
lineage (rolled-back and blocked cycles do not count), with the same settings and steps,
each over the arm's previous model, merged — on a dataset made from the data as it was
when that cycle's dataset was made (the Delta versions its manifest recorded). Arms:

  control         the cold-start trajectories only (golden + synthetic); a different
                  selection each cycle (the selection seed salted by the cycle), as the
                  loop's data differs from cycle to cycle
  teacher_budget  the cold-start trajectories plus as many teacher examples as the loop
                  had corrections, each on a task drawn at random from the users' task
                  distribution instead of on a request users failed: every correction row
                  keeps its tier, weight, split and place, only its task is random — the
                  same teacher budget spent without the flywheel's targeting
  no_teacher      the loop's own data without its teacher corrections (implicit feedback,
                  accepted answers and user edits only), selected as the loop selects.
                  Counterfactual only in part: its usage rows are the ones the full loop's
                  champions produced, which the corrections had already improved

Only what the champion gains beyond the best of them is the flywheel's (FINDINGS.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.curate import prompt_key
from flywheel_assets.lib.curation.select import select_training_rows
from flywheel_assets.lib.domains import Domain
from flywheel_assets.lib.domains import prompt_key as request_key
from flywheel_assets.lib.lake import Lake, rows_where
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, DATASET_MANIFESTS, TRAJECTORIES
from flywheel_assets.lib.training.pipeline import load_for_inference, train_adapter

COLD_START_ORIGINS = ("golden", "synthetic")
CORRECTION_ORIGIN = "correction"
ARMS = ("control", "teacher_budget", "no_teacher")
LABELS = {
    "control": "control: cold-start data only",
    "teacher_budget": "equal teacher budget, random tasks",
    "no_teacher": "the loop without teacher corrections",
}


@dataclass(frozen=True)
class CycleData:
    """A cycle's candidates as its dataset saw them: curated rows with their origin."""

    cycle: str
    curated: pa.Table  # CURATED_TRAJECTORIES at the manifest's version, plus an `origin` column


def lineage(registry, version: dict) -> list[dict]:
    """The registry rows of the adapters a version was trained through, oldest first (empty for a base)."""
    chain = []
    while version is not None and version.get("adapter_path"):
        chain.append(version)
        version = registry.get(version["parent"]) if version.get("parent") else None
    return chain[::-1]


def cycle_data(lake: Lake, cycle: str) -> CycleData:
    """The curated rows and their origins at the Delta versions the cycle's manifest recorded."""
    manifest = lake.read(DATASET_MANIFESTS, filter_sql=f"cycle = '{cycle}'").to_pylist()
    if not manifest:
        raise ValueError(f"cycle {cycle} has no dataset manifest")
    versions = json.loads(manifest[0]["input_versions_json"])
    curated = lake.read(CURATED_TRAJECTORIES, version=versions[CURATED_TRAJECTORIES.name])
    origins = lake.read(TRAJECTORIES, columns=["trajectory_id", "origin"], version=versions[TRAJECTORIES.name])
    if "origin" in curated.column_names:  # curated since it carries the origin: the trajectories' is the same
        curated = curated.drop_columns(["origin"])
    con = duckdb.connect()
    con.register("curated", curated)
    con.register("origins", origins)
    joined = con.execute("SELECT c.*, o.origin FROM curated c JOIN origins o USING (trajectory_id)").to_arrow_table()
    return CycleData(cycle, joined)


def _where(data: CycleData, condition: str) -> pa.Table:
    return rows_where(data.curated, condition)


def control_rows(data: CycleData, config: FlywheelConfig) -> list[dict]:
    cold = _where(data, f"origin IN {COLD_START_ORIGINS}")
    return select_training_rows(cold, data.cycle, config, salt=data.cycle).to_pylist()


def no_teacher_rows(data: CycleData, config: FlywheelConfig) -> list[dict]:
    return select_training_rows(_where(data, f"origin <> '{CORRECTION_ORIGIN}'"), data.cycle, config).to_pylist()


class RandomTeacher:
    """The teacher's answers to tasks drawn at random from the users' task distribution, never
    a held-out one. A correction is given the same task in every cycle (its id picks it)."""

    def __init__(self, domain: Domain, seed: int, pool_size: int = 20_000):
        heldout = domain.heldout_keys()
        self.domain, self.seed = domain, seed
        self.pool = [t for t in domain.user_tasks(pool_size, seed)
                     if request_key(domain.messages_for(t)) not in heldout]
        self._cache: dict[int, tuple[str, str, str] | None] = {}

    def answer(self, correction_id: str) -> tuple[str, str, str] | None:
        """(messages_json, tools_json, prompt_key) of a random task's reference answer, or None
        when the domain's own reference fails its checker (BFCL has a few)."""
        index = int(hashlib.md5(f"{self.seed}:{correction_id}".encode()).hexdigest()[:12], 16) % len(self.pool)
        if index not in self._cache:
            task = self.pool[index]
            messages = self.domain.reference_messages(task, random.Random(f"{self.seed}:{index}"))
            calls = [c for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or []]
            good = self.domain.grade(task, calls, messages[-1].get("content")).success
            first_user = next((m.get("content") for m in messages if m.get("role") == "user"), "")
            self._cache[index] = (json.dumps(messages, ensure_ascii=False), json.dumps(self.domain.tools_for(task)),
                                  prompt_key(first_user)) if good else None
        return self._cache[index]


def teacher_budget_rows(data: CycleData, config: FlywheelConfig, teacher: RandomTeacher) -> list[dict]:
    rows = _where(data, f"origin IN {COLD_START_ORIGINS} OR origin = '{CORRECTION_ORIGIN}'").to_pylist()
    # A correction whose prompt is a holdout prompt is never a candidate for the loop; its
    # replacement's prompt would be, so it is dropped here to spend the same budget.
    holdout = set(_where(data, "split = 'holdout'").column("prompt_key").to_pylist())
    kept = []
    for row in rows:
        if row["origin"] == CORRECTION_ORIGIN:
            if row["prompt_key"] in holdout or (answer := teacher.answer(row["trajectory_id"])) is None:
                continue
            row = {**row, "messages_json": answer[0], "tools_json": answer[1], "prompt_key": answer[2],
                   "user_edited": False}
        kept.append(row)
    table = pa.Table.from_pylist(kept, schema=CURATED_TRAJECTORIES.schema)
    return select_training_rows(table, data.cycle, config, salt=data.cycle).to_pylist()


def train_arm(config: FlywheelConfig, start_dir: Path, cycles: list[CycleData],
              rows_for: Callable[[CycleData], list[dict]], out_dir: Path,
              log: Callable[[str], None] = print, name: str = "arm") -> Path:
    """One merged model per cycle, each over the one before; returns the last (start_dir if none).
    A cycle already trained on the same rows over the same model is kept, not trained again."""
    current, fingerprint = start_dir, start_dir.name  # the base's folder name is its fingerprint
    for data in cycles:
        rows = rows_for(data)
        # what the model is made of: the one before (by its fingerprint, not its path, which
        # differs between a relative and an absolute FLYWHEEL_HOME), the settings, the rows
        fingerprint = hashlib.sha256(json.dumps([fingerprint, config.lora.model_dump(), sorted(
            (r["trajectory_id"], hashlib.md5(r["messages_json"].encode()).hexdigest()) for r in rows)],
            default=str).encode()).hexdigest()
        adapter, merged = out_dir / f"{data.cycle}-adapter", out_dir / f"{data.cycle}-merged"
        stamp = merged / "arm.json"
        if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
            log(f"{name} {data.cycle}: trained already on the same {len(rows)} rows")
            current = merged
            continue
        shutil.rmtree(adapter, ignore_errors=True)
        shutil.rmtree(merged, ignore_errors=True)
        card = train_adapter(config, current, rows, adapter)
        model, tokenizer = load_for_inference(current, adapter, merged=True)
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        stamp.write_text(json.dumps({"fingerprint": fingerprint, "rows": len(rows), "examples": card["examples"]}))
        log(f"{name} {data.cycle}: {len(rows)} rows ({card['examples']} examples), {config.lora.steps} steps, "
            f"{card['seconds']} s")
        current = merged
    return current
