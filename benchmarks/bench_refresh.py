"""Cost that follows new data: the daily refresh of the scores and the curated set over a long history.

Writes a history of N events (default 50M) over N/5 sessions, one trajectory each, spread
over D days (default 50) straight to the bronze Delta tables with their ingested_at, as
the ingest leaves them (bench_data.py measures the ingest itself), and refreshes after each
day as a deployment would (session_feedback, judge_scores, trajectory_scores and
curated_trajectories, each folding in only what is new: the first day is a full run), then
merges the key index as the nightly lake_maintenance does (key_index.merge: the lookups of the
next day binary-search one sorted run per key column; only that day's files stay loose). The
conversations are varied texts, a few of them copies or near copies of another, so
de-duplication has groups to keep up to date. Then it lands one new day (default 1M events:
sessions that start today, and events that continue yesterday's sessions) and times its
daily refresh in a process of its own, for its wall time and peak memory. With --compare
(the default up to 10M events: a full recompute of a 50M-event history does not fit this
machine's memory) it recomputes all four in full, in another process, and compares: the
refreshed tables must equal the recomputed ones row for row.

    .venv/bin/python benchmarks/bench_refresh.py [--events 50000000] [--new-events 1000000]
        [--days 50] [--compare | --no-compare] [--workdir DIR] [--keep] [--quick]

--quick checks that it works (200k + 20k events) and writes its JSON to /tmp.
Targets (≤ 5 s, ≤ 2 GB for the refresh) are reported as ✓/✗; wall time is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import machine, mark, print_rows  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # bench_refresh-<history events>.json, e.g. bench_refresh-50M.json
QUICK_RESULTS = Path(tempfile.gettempdir()) / "bench_refresh-quick.json"
TARGET_S, TARGET_MB = 5.0, 2048
KINDS = np.array(["output_accepted", "retry_requested", "output_edited", "session_continued", "error_reported",
                  "thumbs_up", "rating", "page_view"])
KIND_P = np.array([0.30, 0.12, 0.08, 0.25, 0.05, 0.05, 0.05, 0.10])
START = datetime(2026, 9, 1, tzinfo=timezone.utc)
EVENTS_PER_SESSION = 5


def _sessions(rng, first: int, count: int, day: int) -> dict:
    """`count` sessions numbered from `first`, starting during `day`, one trajectory each."""
    ids = np.arange(first, first + count)
    start_s = day * 86_400 + rng.integers(0, 86_400 - 3_600, count)
    return {"ids": ids, "start_s": start_s}


def _events(rng, sessions: dict, n: int, ingested: datetime, id_offset: int) -> pa.Table:
    pick = rng.integers(0, len(sessions["ids"]), n)
    session = sessions["ids"][pick]
    ts_s = sessions["start_s"][pick] + rng.integers(0, 1_800, n)
    kind = KINDS[rng.choice(len(KINDS), n, p=KIND_P)]
    ratio = np.where(kind == "output_edited", rng.random(n).round(2), np.nan)
    rating = rng.integers(1, 6, n)
    session_ids = np.char.add("s", session.astype(str))
    return pa.table({
        "event_id": np.char.add("e", np.arange(id_offset, id_offset + n).astype(str)),
        "session_id": session_ids,
        "trajectory_id": np.char.add("t", session.astype(str)),
        "user_id": np.char.add("u", (session % 997_331).astype(str)),
        "tenant_id": np.full(n, "default"),
        "event_type": kind,
        "ts": pa.array((ts_s * 1_000_000).astype("int64") + int(START.timestamp() * 1e6), pa.timestamp("us", tz="UTC")),
        "edit_ratio": pa.array(ratio, pa.float64(), from_pandas=True),
        "data_json": np.where(kind == "rating", np.char.add(np.char.add('{"rating": ', rating.astype(str)), "}"), "{}"),
        "ingested_at": pa.array(np.full(n, int(ingested.timestamp() * 1e6)), pa.timestamp("us", tz="UTC")),
    })


def _texts(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n user prompts and answers of random words; 5% of the conversations copy another of the
    same day, 2% copy one with a word of its answer changed (a near copy when it is long)."""
    vocabulary = np.array([f"w{i}" for i in range(5_000)])
    prompt_words = vocabulary[rng.integers(0, len(vocabulary), (n, 8))]
    answer_words = vocabulary[rng.integers(0, len(vocabulary), (n, 60))]
    lengths = rng.integers(12, 61, n)
    source = np.arange(n)
    copy = rng.random(n)
    source[copy < 0.07] = rng.integers(0, n, int((copy < 0.07).sum()))
    prompt_words, answer_words, lengths = prompt_words[source], answer_words[source].copy(), lengths[source]
    near = np.flatnonzero((copy >= 0.05) & (copy < 0.07))
    answer_words[near, rng.integers(0, 12, len(near))] = "changed"
    prompts = np.array([" ".join(words) for words in prompt_words], dtype=object)
    answers = np.array([" ".join(words[:length]) for words, length in zip(answer_words, lengths)], dtype=object)
    return prompts, answers


def _trajectories(rng, sessions: dict, ingested: datetime) -> pa.Table:
    from flywheel_assets.lib.tables import TURN

    n = len(sessions["ids"])
    prompts, answers = _texts(rng, n)
    contents = np.empty(2 * n, dtype=object)
    contents[0::2], contents[1::2] = prompts, answers
    roles = np.tile(np.array(["user", "assistant"], dtype=object), n)
    turns = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
                                     pa.StructArray.from_arrays([pa.array(roles, pa.string()),
                                                                 pa.array(contents, pa.string())],
                                                                fields=list(TURN)))
    ids = sessions["ids"]
    return pa.table({
        "trajectory_id": np.char.add("t", ids.astype(str)), "session_id": np.char.add("s", ids.astype(str)),
        "user_id": np.char.add("u", (ids % 997_331).astype(str)), "tenant_id": np.full(n, "default"),
        "model_version": np.full(n, "base-v0"), "task_type": np.where(ids % 3 == 0, "calc", "weather"),
        "origin": np.full(n, "usage"), "is_synthetic": np.zeros(n, bool),
        "created_at": pa.array((sessions["start_s"] * 1_000_000).astype("int64") + int(START.timestamp() * 1e6),
                               pa.timestamp("us", tz="UTC")),
        "turns": turns, "final_response": pa.array(answers, pa.string()),
        "user_prompt": pa.array(prompts, pa.string()), "tools_json": np.full(n, "[]"),
        "ingested_at": pa.array(np.full(n, int(ingested.timestamp() * 1e6)), pa.timestamp("us", tz="UTC")),
    })


def history(lake, home: Path, rng, events: int, days: int) -> tuple[dict, dict, list[dict]]:
    """`days` days of sessions, appended day by day (one Delta file per day, as daily ingests
    leave them), each followed by its daily refresh and the key index's merge; returns the
    counts, the last day's sessions and each day's refresh."""
    from flywheel_assets.lib.storage import key_index
    from flywheel_assets.lib.tables import ALL_TABLES

    per_day = events // EVENTS_PER_SESSION // days
    made = {"history_events": 0, "history_sessions": 0}
    sessions, refreshes = {}, []
    for day in range(days):
        sessions = _sessions(rng, day * per_day, per_day, day)
        ingested = START + timedelta(days=day + 1)
        _append(lake, _events(rng, sessions, events // days, ingested, day * 10**9),
                _trajectories(rng, sessions, ingested))
        made["history_events"] += events // days
        made["history_sessions"] += per_day
        refreshes.append(refresh_in_child(home, full=False))
        took = sum(refreshes[-1]["seconds"].values())
        started = time.perf_counter()
        merged = key_index.merge(lake, ALL_TABLES)  # lake_maintenance's last step, nightly
        refreshes[-1]["index_merge_s"] = time.perf_counter() - started
        print(f"  day {day + 1}/{days}: {made['history_events']:,} events, refreshed in {took:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in refreshes[-1]['seconds'].items())}); "
              f"key index merged ({merged:,} hashes) in {refreshes[-1]['index_merge_s']:.1f} s", flush=True)
    return made, sessions, refreshes


def new_day(lake, rng, new_events: int, day: int, yesterday: dict) -> dict:
    """Today: nine tenths of the events in sessions that start today, a tenth continuing yesterday's."""
    today = _sessions(rng, day * 10**8, int(new_events * 0.9) // EVENTS_PER_SESSION, day)
    ingested = datetime.now(timezone.utc)
    fresh = _events(rng, today, int(new_events * 0.9), ingested, day * 10**9)
    late = _events(rng, yesterday, new_events - fresh.num_rows, ingested, day * 10**9 + fresh.num_rows)
    _append(lake, pa.concat_tables([fresh, late]), _trajectories(rng, today, ingested))
    return {"new_events": new_events, "new_sessions": len(today["ids"]), "continuing_events": late.num_rows}


def _append(lake, events: pa.Table, trajectories: pa.Table) -> None:
    from flywheel_assets.lib.lake import conform
    from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES

    lake.append(SESSION_EVENTS, conform(events, SESSION_EVENTS))
    lake.append(TRAJECTORIES, conform(trajectories, TRAJECTORIES))


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.curation.refresh_curated import refresh_curated_trajectories
from flywheel_assets.lib.feedback.refresh_scores import (
    refresh_judge_scores, refresh_session_feedback, refresh_trajectory_scores)
config = load_config(); lake = Lake(config)
full = {full!r}
times, modes = {{}}, {{}}
for name, step in (("session_feedback", refresh_session_feedback), ("judge_scores", refresh_judge_scores),
                   ("trajectory_scores", refresh_trajectory_scores),
                   ("curated_trajectories", refresh_curated_trajectories)):
    started = time.perf_counter()
    outcome = step(lake, config, full=full)
    times[name] = time.perf_counter() - started
    modes[name] = {{"full": outcome.full, "reason": outcome.reason, "rows_written": outcome.rows.num_rows,
                   "new_rows": outcome.new_rows, "version": outcome.version}}
print(json.dumps({{"seconds": times, "modes": modes,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def refresh_in_child(home: Path, full: bool) -> dict:
    """The four refreshes in a fresh process: its peak RSS is theirs (plus the interpreter's)."""
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "OMP_NUM_THREADS": "2"}
    env.pop("FLYWHEEL_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", _CHILD.format(repo=str(REPO), full=full)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(lake, versions: dict) -> dict:
    """Rows in one table and not the other, refreshed (at `versions`) against recomputed (now)."""
    import duckdb

    from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, JUDGE_SCORES, SESSION_FEEDBACK, TRAJECTORY_SCORES

    differing = {}
    for table in (SESSION_FEEDBACK, JUDGE_SCORES, TRAJECTORY_SCORES, CURATED_TRAJECTORIES):
        con = duckdb.connect()
        lake.register(con, table, "refreshed", version=versions[table.name])
        lake.register(con, table, "recomputed")
        count = 0
        for a, b in (("refreshed", "recomputed"), ("recomputed", "refreshed")):
            count += con.execute(f"SELECT count(*) FROM (SELECT * EXCLUDE (updated_at) FROM {a} "
                                 f"EXCEPT ALL SELECT * EXCLUDE (updated_at) FROM {b})").fetchone()[0]
        differing[table.name] = {"rows": lake.row_count(table), "differing": count}
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--new-events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=50)
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute in full and compare (default: up to 10M events)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.new_events, args.days = 200_000, 20_000, 5
    compare_full = args.compare if args.compare is not None else args.events <= 10_000_000
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_refresh-"))
    home = work / "home"
    os.environ["FLYWHEEL_HOME"] = str(home)
    os.environ.pop("FLYWHEEL_CONFIG", None)
    from flywheel_assets.lib.config import load_config
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, JUDGE_SCORES, SESSION_FEEDBACK, TRAJECTORY_SCORES

    lake = Lake(load_config())
    recompute, differing = None, {}
    try:
        print(f"history: {args.events:,} events over {args.days} days, then {args.new_events:,} new", flush=True)
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        made, yesterday, per_day = history(lake, home, rng, args.events, args.days)
        build_s = time.perf_counter() - started
        made.update(new_day(lake, rng, args.new_events, args.days, yesterday))
        daily = refresh_in_child(home, full=False)
        # what the key index (lib/storage/key_index.py) keeps beside the lake, after the new day
        footprint = {name: _bytes(home / folder) for name, folder in (("key_index", "cache/key_index"),
                                                                      ("lake", "lake"))}
        if compare_full:
            versions = lake.versions(SESSION_FEEDBACK, JUDGE_SCORES, TRAJECTORY_SCORES, CURATED_TRAJECTORIES)
            recompute = refresh_in_child(home, full=True)
            differing = compare(lake, versions)
        rows_in = {t.name: lake.row_count(t) for t in (SESSION_FEEDBACK, JUDGE_SCORES, TRAJECTORY_SCORES,
                                                       CURATED_TRAJECTORIES)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    daily_s = sum(daily["seconds"].values())
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores; above 2, neighbours shared them)")
    equal = all(d["differing"] == 0 for d in differing.values()) if compare_full else None
    full_s = sum(recompute["seconds"].values()) if recompute else None
    rows = [("step", "daily refresh (s)", "on day 1 / mid / last of the history (s)", "full recompute (s)",
             "rows written daily", "rows in table")]
    middle = per_day[len(per_day) // 2]
    for name in daily["seconds"]:
        rows.append((name, f"{daily['seconds'][name]:.2f}",
                     f"{per_day[0]['seconds'][name]:.2f} / {middle['seconds'][name]:.2f} / "
                     f"{per_day[-1]['seconds'][name]:.2f}",
                     f"{recompute['seconds'][name]:.2f}" if recompute else "not run",
                     f"{daily['modes'][name]['rows_written']:,}", f"{rows_in[name]:,}"))
    rows.append(("all four", f"{daily_s:.2f}", "", f"{full_s:.2f}" if recompute else "", "", ""))
    print_rows("Daily refresh against a full recompute of the same tables", rows)
    print(f"\ndaily refresh {daily_s:.2f} s {mark(daily_s <= TARGET_S)} (≤ {TARGET_S:g} s), "
          f"peak RSS {daily['peak_rss_mb']:.0f} MB {mark(daily['peak_rss_mb'] <= TARGET_MB)} (≤ {TARGET_MB} MB)"
          + (f"; full recompute {full_s:.2f} s, peak RSS {recompute['peak_rss_mb']:.0f} MB: "
             f"{full_s / daily_s:.1f}× the refresh's time" if recompute else ""))
    merges = [day["index_merge_s"] for day in per_day]
    print(f"key index merged nightly (lake_maintenance's last step): {merges[0]:.1f} s after day 1, "
          f"{merges[-1]:.1f} s after day {len(merges)}")
    print(f"key index: {footprint['key_index']['files']:,} files, {footprint['key_index']['bytes'] / 1e6:.0f} MB "
          f"(the lake: {footprint['lake']['bytes'] / 1e6:.0f} MB)")
    if compare_full:
        print(f"refreshed = recomputed: {mark(equal)} "
              f"({json.dumps({k: v['differing'] for k, v in differing.items()})})")
    else:
        print("refreshed = recomputed: not compared at this size (--compare runs the full recompute)")
    result = {"machine": machine(), "load_average_at_end": os.getloadavg(), "data": made,
              "build_s": round(build_s, 1), "history_refreshes": per_day, "daily": daily, "recompute": recompute,
              "differing": differing, "equal": equal, "rows_in_tables": rows_in, "daily_s": daily_s,
              "full_s": full_s, "footprint": footprint, "targets": {"seconds": TARGET_S, "peak_rss_mb": TARGET_MB},
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = QUICK_RESULTS if args.quick else RESULTS / f"bench_refresh-{_size(args.events)}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if equal is not False else 1


def _bytes(folder: Path) -> dict:
    files = [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []
    return {"files": len(files), "bytes": sum(path.stat().st_size for path in files)}


def _size(events: int) -> str:
    return f"{events // 1_000_000}M" if events % 1_000_000 == 0 else str(events)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
