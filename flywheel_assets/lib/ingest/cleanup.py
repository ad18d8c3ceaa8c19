"""Stale leftovers of failed ingests, deleted by the next one once they are older than
ingest.stale_after_s (run under the ingest lock, so no live ingest owns them).

- `flywheel ingest` and `flywheel annotate` stage their copies in the landing zone under
  a STAGING_PREFIX dot-name and rename them when done; a killed call leaves one behind.
- A Delta write that fails (a full disk, a kill) can leave data files no commit names
  (`*.parquet`, or `*.parquet#<n>` when killed while writing it), and temporary commit
  files in `_delta_log`. Only the bronze tables are swept: the
  ingest is their only writer. A file named by any commit or checkpoint still in the
  log is kept, so time travel is untouched. Object-store lakes are not swept (their
  stores expire incomplete uploads themselves).

Agents' own temporary files (.tmp, .part, dot-names) are theirs, never deleted.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow.parquet as pq

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.ingest.landing import KINDS, STAGING_PREFIX, walk
from flywheel_assets.lib.lake import ColdTierMissing, Lake
from flywheel_assets.lib.tables import ANNOTATIONS, INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES

BRONZE = (SESSION_EVENTS, TRAJECTORIES, ANNOTATIONS, QUARANTINE, INGESTED_FILES)


def clean_stale(config: FlywheelConfig, lake: Lake, now: float | None = None) -> list[str]:
    """Delete stale staging copies and orphan bronze files; the paths deleted."""
    cutoff = (time.time() if now is None else now) - config.ingest.stale_after_s
    stale = [path for kind in KINDS for path, info in walk(config.landing / kind)
             if path.name.startswith(STAGING_PREFIX) and info.st_mtime < cutoff]
    if "://" not in lake.root:
        for table in BRONZE:
            dt = lake.delta(table)
            if dt is not None:
                live = {Path(unquote(uri.removeprefix("file://"))) for uri in dt.file_uris()}
                stale += [path for path in _orphans(Path(lake.uri(table)), cutoff) if path not in live]
                try:  # a killed tier move's partial files
                    cold = lake.cold(table, dt)
                except ColdTierMissing:  # an unreachable cold store does not stop an ingest
                    cold = None
                if cold is not None and "://" not in lake.cold_uri(table, dt):
                    live = {Path(unquote(uri.removeprefix("file://"))) for uri in cold.file_uris()}
                    stale += [path for path in _orphans(Path(lake.cold_uri(table, dt)), cutoff) if path not in live]
    deleted = []
    for path in stale:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        deleted.append(str(path))
    return deleted


# deltalake writes a data file as `<name>.parquet#<n>` and renames it when complete: a killed write
# leaves that name behind, and no commit can ever name it
_PARTIAL = re.compile(r"\.parquet#\d+$")


def _orphans(root: Path, cutoff: float) -> list[Path]:
    log = root / "_delta_log"
    if not log.is_dir():
        return []
    found, unnamed = [], []
    for path, info in walk(root):
        if info.st_mtime >= cutoff:
            continue
        if path.parent == log:
            if path.name.endswith(".tmp") or path.name.startswith("_commit_"):
                found.append(path)
        elif log not in path.parents:
            if _PARTIAL.search(path.name):
                found.append(path)
            elif path.name.endswith(".parquet"):
                unnamed.append(path)
    if unnamed:  # the log is read only when a candidate needs it (it grows with every commit)
        named = _named_files(log)
        if any("://" in name or name.startswith("/") for name in named):
            return found  # a writer that names files by absolute URI: nothing here can be told apart safely
        found += [path for path in unnamed if path.relative_to(root).as_posix() not in named]
    return found


def _named_files(log: Path) -> set[str]:
    """Every data file an add or remove action in the log's commits and checkpoints names."""
    named: set[str] = set()
    for entry in os.scandir(log):
        if entry.name.endswith(".json") and entry.name[:-5].isdigit():
            with open(entry.path, encoding="utf-8") as handle:
                for line in handle:
                    if not line.strip():
                        continue
                    action = json.loads(line)
                    for kind in ("add", "remove"):
                        if kind in action:
                            named.add(unquote(action[kind]["path"]))
        elif ".checkpoint" in entry.name and entry.name.endswith(".parquet"):
            present = [kind for kind in ("add", "remove") if kind in pq.read_schema(entry.path).names]
            checkpoint = pq.read_table(entry.path, columns=present)
            for kind in present:
                named.update(unquote(row["path"]) for row in checkpoint.column(kind).to_pylist() if row)
    return named
