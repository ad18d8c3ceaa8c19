"""What each refresh of gold/curated_trajectories changed: new rows, older rows changed (and
which fields), and how many day partitions those sit in — the partitions the refresh rewrote.

    .venv/bin/python benchmarks/curated_churn.py [FLYWHEEL_HOME] [--versions 12]

Reads the table's last versions from the home's lake (a `make demo` home keeps its history
until lake_maintenance or a forget purges it); prints one line per version.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

from deltalake import DeltaTable

VOLATILE = ("dedup_status", "duplicate_of")


def rows_at(uri: str, version: int) -> dict[str, dict]:
    return {row["trajectory_id"]: row for row in DeltaTable(uri, version=version).to_pyarrow_table().to_pylist()}


def changed_fields(before: dict, after: dict) -> tuple[str, ...]:
    def same(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return tuple(sorted(name for name in after if name != "updated_at" and not same(before.get(name), after[name])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", nargs="?", default="data/home")
    parser.add_argument("--versions", type=int, default=12)
    args = parser.parse_args()
    uri = str(Path(args.home) / "lake" / "gold" / "curated_trajectories")
    last = DeltaTable(uri).version()
    previous = None
    for version in range(max(0, last - args.versions), last + 1):
        current = rows_at(uri, version)
        if previous is not None:
            new = current.keys() - previous.keys()
            kinds, days = Counter(), set()
            for trajectory_id in current.keys() & previous.keys():
                if fields := changed_fields(previous[trajectory_id], current[trajectory_id]):
                    kinds["duplicate status" if set(fields) & set(VOLATILE) else "score fields"] += 1
                    days.add(current[trajectory_id]["created_day"])
            all_days = {row["created_day"] for row in current.values()}
            print(f"version {version}: {len(current):,} rows, {len(new):,} new; {sum(kinds.values()):,} older rows "
                  f"changed ({', '.join(f'{k} {v}' for k, v in kinds.most_common()) or 'none'}) in {len(days)} "
                  f"of {len(all_days)} day partitions")
        previous = current


if __name__ == "__main__":
    main()
