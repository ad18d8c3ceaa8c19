"""What each commit to gold/curated_trajectories changed: new, deleted and changed older rows
(by what changed in them), and the day partitions whose files the commit rewrote.

    .venv/bin/python benchmarks/curated_churn.py [FLYWHEEL_HOME] [--versions 12] [--out FILE.json]

Reads the table's last versions from the home's lake (a `make demo` home keeps its history
until lake_maintenance or a forget purges it; a version no longer readable is skipped); prints
one line per version with its Delta operation, and writes the lines as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

# what changed in an older row, first match wins
KINDS = (
    ("duplicate status", {"dedup_status", "duplicate_of"}),
    ("content (an edit)", {"messages_json", "user_edited", "lsh_keys", "pii_replacements", "pii_kinds"}),
    ("score fields", None),  # anything else: tier, weight, combined_score, split, ...
)


def changed_fields(before: dict, after: dict) -> set[str]:
    def same(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return {name for name in after if name != "updated_at" and not same(before.get(name), after[name])}


def kind_of(fields: set[str]) -> str:
    return next(kind for kind, names in KINDS if names is None or fields & names)


def snapshot(uri: str, version: int) -> tuple[dict[str, dict], set[str]] | None:
    try:
        dt = DeltaTable(uri, version=version)
        files = set(pa.table(dt.get_add_actions()).column("path").to_pylist())
        return {row["trajectory_id"]: row for row in dt.to_pyarrow_table().to_pylist()}, files
    except (DeltaError, OSError):  # vacuumed or purged: its log or files are gone
        return None


def churn(previous: tuple[dict, set], current: tuple[dict, set]) -> dict:
    (before, before_files), (after, after_files) = previous, current
    kinds = Counter()
    for trajectory_id in after.keys() & before.keys():
        if fields := changed_fields(before[trajectory_id], after[trajectory_id]):
            kinds[kind_of(fields)] += 1
    written = after_files - before_files
    days = {part.split("=", 1)[1] for path in written for part in path.split("/") if part.startswith("created_day=")}
    return {"rows": len(after), "new": len(after.keys() - before.keys()), "deleted": len(before.keys() - after.keys()),
            "older_changed": sum(kinds.values()), "by_kind": dict(kinds.most_common()), "files_written": len(written),
            "partitions_rewritten": len(days),
            "partitions": len({row["created_day"] for row in after.values()})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", nargs="?", default="data/home")
    parser.add_argument("--versions", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    uri = str(Path(args.home) / "lake" / "gold" / "curated_trajectories")
    table = DeltaTable(uri)
    operations = {commit["version"]: commit.get("operation") for commit in table.history(limit=args.versions + 1)}
    lines, previous = [], None
    for version in range(max(0, table.version() - args.versions), table.version() + 1):
        current = snapshot(uri, version)
        if previous is not None and current is not None:
            line = {"version": version, "operation": operations.get(version)} | churn(previous, current)
            lines.append(line)
            kinds = ", ".join(f"{kind} {count}" for kind, count in line["by_kind"].items()) or "none"
            print(f"version {version} ({line['operation']}): {line['rows']:,} rows, {line['new']:,} new, "
                  f"{line['deleted']:,} deleted; {line['older_changed']:,} older rows changed ({kinds}); "
                  f"{line['files_written']} files written in {line['partitions_rewritten']} of "
                  f"{line['partitions']} day partitions")
        previous = current
    if args.out:
        args.out.write_text(json.dumps({"home": str(args.home), "versions": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
