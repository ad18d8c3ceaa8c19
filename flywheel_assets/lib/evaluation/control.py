"""The control arm: what the same training would give without the flywheel's data.

For each cycle the flywheel trained, the control trains one adapter with the same LoRA
settings and steps over the previous control (merged, as cycles chain over the champion),
on a dataset selected the same way (tier budgets, task-type balance, seed) from the
cold-start trajectories only. Any gain the control shows comes from training longer; only
what the flywheel gains beyond it is the flywheel's (FINDINGS.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import duckdb

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.select import select_training_rows
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, TRAJECTORIES
from flywheel_assets.lib.training.pipeline import load_for_inference, train_adapter

COLD_START_ORIGINS = ("golden", "synthetic")


def cold_start_rows(lake: Lake, config: FlywheelConfig, cycle: str) -> list[dict]:
    """The cycle's dataset as training_dataset would select it, from cold-start rows only."""
    con = duckdb.connect()
    lake.register(con, CURATED_TRAJECTORIES, "curated")
    con.register("origins", lake.read(TRAJECTORIES, columns=["trajectory_id", "origin"]))
    curated = con.execute(f"""
        SELECT c.* FROM curated c JOIN origins o USING (trajectory_id)
        WHERE o.origin IN {COLD_START_ORIGINS}
    """).to_arrow_table()
    return select_training_rows(curated, cycle, config).to_pylist()


def train_control(config: FlywheelConfig, lake: Lake, start_dir: Path, cycles: list[str], out_dir: Path,
                  log: Callable[[str], None] = print) -> list[Path]:
    """One merged model per cycle, each trained over the one before; returns their folders."""
    folders, current = [], start_dir
    for cycle in cycles:
        rows = cold_start_rows(lake, config, cycle)
        adapter, merged = out_dir / f"{cycle}-adapter", out_dir / f"{cycle}-merged"
        shutil.rmtree(adapter, ignore_errors=True)
        card = train_adapter(config, current, rows, adapter)
        model, tokenizer = load_for_inference(current, adapter, merged=True)
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        log(f"control {cycle}: {card['examples']} cold-start examples, {config.lora.steps} steps, "
            f"{card['seconds']} s")
        folders.append(merged)
        current = merged
    return folders
