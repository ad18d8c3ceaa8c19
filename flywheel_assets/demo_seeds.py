"""`make demo-seeds`: the demo's five-arm table over several seeds, every seed's row and the median.

Reads each home's reports/flywheel_demo.json (written by `make demo`'s final comparison)
and prints one row per seed — every arm's held-out success, the champion's margin over
the best other arm and over the base with their standard errors — then the median row,
which is what the headline quotes. Written also to the first home's parent as
demo-seeds.md.

    python -m flywheel_assets.demo_seeds data/home-seed-0 data/home-seed-1 data/home-seed-2
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ARMS = ("base", "control", "teacher_budget", "no_teacher", "champion")


def row(numbers: dict) -> dict:
    success = numbers["success"]
    return {**{arm: success.get(arm) for arm in ARMS}, "best_other": numbers["best_other"],
            "over_best": numbers["over_best"], "over_best_se": _ratio(numbers["over_best"], numbers["over_best_se"]),
            "over_base": numbers["over_base"], "over_base_se": _ratio(numbers["over_base"], numbers["over_base_se"])}


def _ratio(difference: float, se: float) -> float | None:
    return difference / se if se else None


def table(rows: dict[str, dict]) -> str:
    lines = ["| seed | " + " | ".join(ARMS) + " | best other arm | champion − best other (SE) | "
             "champion − base (SE) |", "|---" * (len(ARMS) + 4) + "|"]

    def cells(r: dict) -> str:
        arms = " | ".join("—" if r[a] is None else f"{r[a]:.1%}" for a in ARMS)
        return (f"{arms} | {r['best_other']} | {r['over_best'] * 100:+.1f} ({_se(r['over_best_se'])}) | "
                f"{r['over_base'] * 100:+.1f} ({_se(r['over_base_se'])})")

    for seed, r in rows.items():
        lines.append(f"| {seed} | {cells(r)} |")
    median = {key: _median([r[key] for r in rows.values()]) for key in next(iter(rows.values())) if key != "best_other"}
    median["best_other"] = "/".join(sorted({r["best_other"] for r in rows.values()}))
    lines.append(f"| **median** | {cells(median)} |")
    return "\n".join(lines)


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _se(value: float | None) -> str:
    return "no spread" if value is None else f"{value:.1f} SE"


def main(argv: list[str] | None = None) -> int:
    homes = [Path(h) for h in (argv if argv is not None else sys.argv[1:])]
    if not homes:
        print(__doc__)
        return 2
    rows = {}
    for home in homes:
        report = home / "reports" / "flywheel_demo.json"
        if not report.is_file():
            print(f"{report}: missing (did `make demo` finish in {home}?)", file=sys.stderr)
            return 1
        rows[home.name] = row(json.loads(report.read_text()))
    text = table(rows)
    print(text)
    (homes[0].parent / "demo-seeds.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
