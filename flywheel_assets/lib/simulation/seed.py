"""Copy the shipped data (golden trajectories, demo usage log) into the landing zone.

Files are copied under their own names, atomically (temp name, then rename), and
only when absent, so seeding twice lands nothing new.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flywheel_assets.lib.config import FlywheelConfig, load_config

DATA = Path(__file__).resolve().parents[3] / "data"


def seed_landing(config: FlywheelConfig, data: Path = DATA) -> list[Path]:
    sources = [(data / "golden" / "golden_trajectories.jsonl", "trajectories")]
    for kind in ("events", "trajectories", "annotations"):
        sources += [(path, kind) for path in sorted((data / "demo" / kind).glob("*")) if path.is_file()]
    copied = []
    for source, kind in sources:
        target = config.landing / kind / f"seed-{source.name}"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, temporary)
        temporary.replace(target)
        copied.append(target)
    return copied


if __name__ == "__main__":
    config = load_config()
    copied = seed_landing(config)
    print(f"seeded {len(copied)} files into {config.landing}" if copied else f"{config.landing} already seeded")
