"""What lands in the landing zone before any user: phase 0 and the demo usage log.

* cold start (the seed's phase 0): the shipped golden trajectories and synthetic
  ones from a teacher (the scripted expert, or an OpenAI-compatible endpoint);
* the embedded demo's usage log (data/demo), with malformed lines among it.

Files are written under fixed names, atomically (temp name, then rename), and only
when absent, so seeding twice lands nothing new.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flywheel_assets.lib import clock
from flywheel_assets.lib.config import FlywheelConfig, load_config
from flywheel_assets.lib.domains import load_domain
from flywheel_assets.lib.simulation.teachers import cold_start_lines, make_teacher

DATA = Path(__file__).resolve().parents[3] / "data"
GOLDEN = DATA / "golden" / "golden_trajectories.jsonl"


def write_cold_start(config: FlywheelConfig) -> dict:
    """Golden + synthetic trajectories into landing/trajectories; counts of what was written.
    The shipped golden file is the built-in world's: another domain gets its own
    (cold_start.golden_file) or none."""
    settings = config.cold_start
    folder = config.landing / "trajectories"
    domain = load_domain(config.domain)
    golden_file = Path(settings.golden_file) if settings.golden_file else \
        (GOLDEN if config.domain.name == "builtin" else None)
    golden = _copy(golden_file, folder / "cold-start-golden.jsonl") if golden_file else False
    teacher = make_teacher(settings.teacher, settings.seed, domain, config.teacher)
    name = settings.teacher if config.domain.name == "builtin" else f"{config.domain.name}-{settings.teacher}"
    target = folder / f"cold-start-synthetic-{name}-{settings.seed}-{settings.synthetic_trajectories}.jsonl"
    synthetic = 0
    if not target.exists():
        lines = cold_start_lines(settings.synthetic_trajectories, settings.seed, teacher=teacher, domain=domain)
        # made now on the flywheel's clock (the demo's simulated day 0), not the machine's: the
        # rows' day partitions and every "since" window then do not depend on the day it runs
        made = clock.now(config).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = [{**line, "created_at": made} for line in lines]
        write_landing_file(target, "".join(json.dumps(line) + "\n" for line in lines))
        synthetic = len(lines)
    return {"golden_files": int(golden), "synthetic_trajectories": synthetic,
            "teacher_rejects": getattr(teacher, "rejected", 0)}


def seed_demo_usage(config: FlywheelConfig, data: Path = DATA) -> list[Path]:
    copied = []
    for kind in ("events", "trajectories", "annotations"):
        for source in sorted((data / "demo" / kind).glob("*")):
            if source.is_file() and _copy(source, config.landing / kind / f"demo-{source.name}"):
                copied.append(config.landing / kind / f"demo-{source.name}")
    return copied


def _copy(source: Path, target: Path) -> bool:
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temporary)
    temporary.replace(target)
    return True


def write_landing_file(target: Path, text: str) -> None:
    """Atomically (temp name, then rename): the landing sensor never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(text)
    temporary.replace(target)


if __name__ == "__main__":
    config = load_config()
    counts = write_cold_start(config)
    copied = seed_demo_usage(config)
    print(f"cold start: {counts}; demo usage: {len(copied)} new files in {config.landing}")
