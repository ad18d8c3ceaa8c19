"""Data-half benchmark: landing JSONL → bronze Delta → session scores and tiers.

One run generates N synthetic events over S sessions, ingests them with the real
`ingest_landing`, scores every session with `session_feedback` and tiers the scores
with `tier_sql`, then measures the seed's query-per-session reference on a sample of
the same sessions twice (benchmarks/seed_store.py): over the same Delta table, where
each query scans it, and over the same rows loaded into SQLite with an index on
session_id, the store the seed would have queried (its load, index build and size
reported too). Checks that every path gives the same scores and both stores the same
rows. Prints a results table and writes benchmarks/results/bench_data-latest.json.

    .venv/bin/python benchmarks/bench_data.py [--events 10000000] [--sessions EVENTS/5]
        [--files 10] [--reference-sessions 200] [--indexed-sessions 20000] [--workdir DIR] [--keep]

--quick checks that it works in a few seconds (2,000 events, 400 sessions, 20 and 100
sampled) and writes its JSON to /tmp, never over a measured -latest.json.

Targets are reported as ✓/✗ and never fail the run: wall-clock time is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

from common import ResourceSampler, machine, mark, print_rows  # noqa: E402  (benchmarks/ is on sys.path)
from event_data import generate  # noqa: E402
from seed_store import SESSION_QUERY, build_indexed_store, folder_bytes, seed_quality_score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_data-latest.json"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "bench_data-quick.json"
QUICK = {"events": 2_000, "sessions": 400, "files": 1, "reference_sessions": 20, "indexed_sessions": 100}

TARGET_EVENTS_PER_S = 300_000
TARGET_PEAK_RSS_MB = 4096
TARGET_SCORING_S = 15.0
TARGET_SPEEDUP = 500

@contextmanager
def stage_timers(totals: dict[str, float]):
    """Time the ingest pipeline's stages (read lines, parse, dedup, Delta append)
    by wrapping the functions it calls; restored on exit. Measurement only.

    The stages overlap: batches are parsed on two worker threads and written on a
    third while the main thread reads and deduplicates, so these are thread-seconds
    (parse is summed over both workers) and add up to more than the ingest's wall time."""
    from flywheel_assets.lib.ingest import parsing, pipeline
    from flywheel_assets.lib.lake import Lake

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    def timed_iter(name, fn):
        def wrapper(*args, **kwargs):
            iterator = fn(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    totals[name] = totals.get(name, 0.0) + time.perf_counter() - started
                yield item
        return wrapper

    originals = [(parsing, "read_line_batches"), (parsing, "parse_event_lines"),
                 (pipeline.KeyIndex, "only_new"), (pipeline.KeyIndex, "remember"), (Lake, "append")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]
    parsing.read_line_batches = timed_iter("read lines (Arrow)", parsing.read_line_batches)
    parsing.parse_event_lines = timed("parse + validate (DuckDB, 2 workers)", parsing.parse_event_lines)
    pipeline.KeyIndex.only_new = timed("dedup against lake", pipeline.KeyIndex.only_new)
    pipeline.KeyIndex.remember = timed("remember keys", pipeline.KeyIndex.remember)
    Lake.append = timed("Delta append (writer thread)", Lake.append)
    try:
        yield totals
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def human_mb(value: float) -> str:
    return f"{value:,.0f} MB"


def per_session(query, sample: list[str], scores: dict[str, float], progress_every: int):
    """The seed's path for each session of the sample: one query, then the fold. Returns the
    seconds, every session's rows, and the sessions whose score differs from the vectorised one."""
    rows_by_session, mismatches = {}, []
    started = time.perf_counter()
    for done, session_id in enumerate(sample, start=1):
        if done % progress_every == 0:
            print(f"  {time.perf_counter() - started:7.1f} s  {done:,}/{len(sample):,} sessions", flush=True)
        rows = rows_by_session[session_id] = query(session_id)
        reference = seed_quality_score(rows)
        if abs(reference - scores[session_id]) > 1e-9:
            mismatches.append({"session_id": session_id, "reference": reference, "vectorised": scores[session_id]})
    return time.perf_counter() - started, rows_by_session, mismatches


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import duckdb

    from flywheel_assets.lib.config import load_config
    from flywheel_assets.lib.feedback.scoring import session_feedback, tier_sql
    from flywheel_assets.lib.ingest.pipeline import ingest_landing
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES

    config = load_config(home=workdir)
    if args.batch_lines:
        config.ingest.batch_lines = args.batch_lines
    lake = Lake(config)

    print(f"workdir {workdir}; generating {args.events:,} events over {args.sessions:,} sessions "
          f"in {args.files} files …", flush=True)
    started = time.perf_counter()
    landing_bytes = generate(config.landing / "events", args.events, args.sessions, args.files)
    generation_s = time.perf_counter() - started
    print(f"generated {landing_bytes / 2**20:,.0f} MB of JSONL in {generation_s:.1f} s", flush=True)

    def log(message: str) -> None:
        print(f"  {time.perf_counter() - ingest_started:7.1f} s  {message}", flush=True)

    stages: dict[str, float] = {}
    load_before = os.getloadavg()
    print(f"ingesting (batch_lines={config.ingest.batch_lines:,}) …", flush=True)
    with stage_timers(stages), ResourceSampler(interval_s=0.2) as ingest_rss:
        ingest_started, ingest_cpu_started = time.perf_counter(), time.process_time()
        report = ingest_landing(config, lake, log=log)
        ingest_s = time.perf_counter() - ingest_started
        ingest_cpu_s = time.process_time() - ingest_cpu_started
    load_after_ingest = os.getloadavg()
    ru_maxrss_after_ingest_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows_in_lake = lake.row_count(SESSION_EVENTS)
    print(f"ingested {rows_in_lake:,} rows in {ingest_s:.1f} s", flush=True)

    print("scoring and tiering …", flush=True)
    con = duckdb.connect()
    with ResourceSampler(interval_s=0.2) as scoring_rss:
        started = time.perf_counter()
        lake.register(con, SESSION_EVENTS)
        lake.register(con, TRAJECTORIES)
        register_s = time.perf_counter() - started

        started = time.perf_counter()
        feedback = session_feedback(con, config.scoring)
        feedback_s = time.perf_counter() - started

        started = time.perf_counter()
        con.register("session_feedback", feedback)
        tier_rows = con.execute(f"""
            SELECT {tier_sql(config.tiers, "quality_score", "false")} AS tier, count(*) AS sessions
            FROM session_feedback GROUP BY tier
        """).fetchall()
        tiering_s = time.perf_counter() - started
    scoring_s = register_s + feedback_s + tiering_s
    tier_counts = {name: 0 for name in config.tiers.names}
    tier_counts.update({tier: int(n) for tier, n in tier_rows})
    print(f"scored {feedback.num_rows:,} sessions in {scoring_s:.1f} s", flush=True)

    scores = dict(zip(feedback.column("session_id").to_pylist(), feedback.column("quality_score").to_pylist()))
    rng = np.random.default_rng(1)
    sample_size = min(max(args.reference_sessions, args.indexed_sessions), feedback.num_rows)
    sample = [feedback.column("session_id")[int(i)].as_py()
              for i in rng.choice(feedback.num_rows, sample_size, replace=False)]
    lake_sample = sample[:args.reference_sessions]
    print(f"reference over the lake: one query per session for {len(lake_sample)} sessions …", flush=True)
    reference_s, lake_rows, mismatches = per_session(lambda sid: con.execute(SESSION_QUERY, [sid]).fetchall(),
                                                     lake_sample, scores, progress_every=25)
    load_after = os.getloadavg()
    ru_maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"indexed store: {rows_in_lake:,} rows into SQLite, then an index on session_id …", flush=True)
    with ResourceSampler(interval_s=0.2) as indexed_rss:
        store = build_indexed_store(con, workdir / "seed_store.sqlite")
    print(f"loaded in {store.load_s:.1f} s, indexed in {store.index_s:.1f} s; "
          f"{(store.table_bytes + store.index_bytes) / 2**20:,.0f} MB", flush=True)
    indexed_sample = sample[:args.indexed_sessions]
    print(f"reference over the indexed store: one query per session for {len(indexed_sample):,} sessions …", flush=True)
    indexed_s, indexed_rows, indexed_mismatches = per_session(store.session_rows, indexed_sample, scores,
                                                              progress_every=max(1, len(indexed_sample) // 4))
    # sorted: the two stores may order events of equal ts differently
    rows_compared = [sid for sid in lake_sample if sid in indexed_rows]
    rows_differ = [sid for sid in rows_compared
                   if sorted(lake_rows[sid], key=repr) != sorted(indexed_rows[sid], key=repr)]
    query_plan = store.query_plan()
    store.connection.close()
    lake_bytes = folder_bytes(Path(lake.uri(SESSION_EVENTS))) if "://" not in lake.root else None
    load_after_indexed = os.getloadavg()

    reference_per_session = reference_s / max(1, len(lake_sample))
    indexed_per_session = indexed_s / max(1, len(indexed_sample))
    vectorised_per_session = scoring_s / max(1, feedback.num_rows)

    def ratio(slow: float, fast: float) -> float:
        return slow / fast if fast else float("inf")

    return {
        "events": args.events, "sessions": args.sessions, "files": args.files,
        "landing_mb": round(landing_bytes / 2**20, 1), "batch_lines": config.ingest.batch_lines,
        "generation_s": generation_s,
        "ingest_s": ingest_s, "events_per_s": args.events / ingest_s,
        # CPU time of all this process's threads: what the machine's other work cannot inflate much
        "ingest_cpu_s": ingest_cpu_s, "ingest_cpu_us_per_event": ingest_cpu_s / args.events * 1e6,
        "ingest_stages_s": stages,
        "rows_new": report.rows_new.get("events", 0), "rows_in_lake": rows_in_lake,
        "duplicates": report.duplicates.get("events", 0), "quarantined": report.lines_quarantined,
        "ingest_peak_rss_mb": ingest_rss.peak_mb, "ru_maxrss_after_ingest_mb": ru_maxrss_after_ingest_mb,
        "register_s": register_s, "session_feedback_s": feedback_s, "tiering_s": tiering_s, "scoring_s": scoring_s,
        "scoring_peak_rss_mb": scoring_rss.peak_mb, "sessions_scored": feedback.num_rows,
        "reference_sessions": len(lake_sample), "reference_s": reference_s,
        "reference_s_per_session": reference_per_session, "vectorised_s_per_session": vectorised_per_session,
        "speedup": ratio(reference_per_session, vectorised_per_session),
        "score_mismatches": len(mismatches), "mismatch_examples": mismatches[:5],
        # The seed's store as it would have been: SQLite with an index on session_id, same rows, same query.
        "indexed": {
            "rows": store.rows, "load_s": store.load_s, "insert_s": store.insert_s, "index_s": store.index_s,
            "table_mb": store.table_bytes / 2**20, "index_mb": store.index_bytes / 2**20,
            "lake_mb": None if lake_bytes is None else lake_bytes / 2**20,
            "build_peak_rss_mb": indexed_rss.peak_mb, "query_plan": query_plan,
            "sessions": len(indexed_sample), "query_s": indexed_s, "s_per_session": indexed_per_session,
            "lake_scan_vs_indexed": ratio(reference_per_session, indexed_per_session),
            "speedup": ratio(indexed_per_session, vectorised_per_session),
            # Every session through the index, projected from the sample: the seed's whole scoring pass.
            "all_sessions_s": indexed_per_session * feedback.num_rows,
            "all_sessions_with_build_s": indexed_per_session * feedback.num_rows + store.load_s + store.index_s,
            "score_mismatches": len(indexed_mismatches), "mismatch_examples": indexed_mismatches[:5],
            "rows_compared_with_lake": len(rows_compared), "rows_differ_from_lake": len(rows_differ), "rows_differ_examples": rows_differ[:5],
        },
        "tier_counts": tier_counts,
        # Other work on the machine slows every number; 1-minute load before ingest and after the reference.
        "load_avg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        "load_avg_1m_after_ingest": round(load_after_ingest[0], 2),
        "load_avg_1m_after_indexed": round(load_after_indexed[0], 2),
        # before the indexed store is built, which is measured on its own (indexed.build_peak_rss_mb)
        "ru_maxrss_mb": ru_maxrss_mb,
    }


def print_table(r: dict) -> None:
    rows = [
        ("generation (not ingest)", f"{r['generation_s']:.1f} s", f"{r['landing_mb']:,.0f} MB JSONL", ""),
        ("ingest", f"{r['ingest_s']:.1f} s", f"load {r['load_avg_1m'][0]:.1f} → {r['load_avg_1m_after_ingest']:.1f}", ""),
        ("ingest CPU (all threads)", f"{r['ingest_cpu_s']:.1f} s", f"{r['ingest_cpu_us_per_event']:.2f} µs/event", ""),
        ("ingest throughput", f"{r['events_per_s']:,.0f} events/s", f"≥ {TARGET_EVENTS_PER_S:,}",
         mark(r["events_per_s"] >= TARGET_EVENTS_PER_S)),
        ("peak RSS during ingest", human_mb(r["ingest_peak_rss_mb"]), f"≤ {human_mb(TARGET_PEAK_RSS_MB)}",
         mark(r["ingest_peak_rss_mb"] <= TARGET_PEAK_RSS_MB)),
        ("ru_maxrss (whole process)", human_mb(r["ru_maxrss_mb"]), f"≤ {human_mb(TARGET_PEAK_RSS_MB)}",
         mark(r["ru_maxrss_mb"] <= TARGET_PEAK_RSS_MB)),
        ("rows in lake / quarantined", f"{r['rows_in_lake']:,} / {r['quarantined']:,}", f"{r['events']:,} / 0",
         mark(r["rows_in_lake"] == r["events"] and r["quarantined"] == 0)),
        *[(f"  ingest: {name}", f"{seconds:.1f} s", "thread-seconds (stages overlap)", "")
          for name, seconds in sorted(r["ingest_stages_s"].items(), key=lambda kv: -kv[1])],
        ("register Delta in DuckDB", f"{r['register_s']:.2f} s", "", ""),
        ("session_feedback (all events)", f"{r['session_feedback_s']:.2f} s", "", ""),
        ("tiering (one query)", f"{r['tiering_s']:.2f} s", "", ""),
        ("scoring + tiering total", f"{r['scoring_s']:.2f} s", f"≤ {TARGET_SCORING_S:.0f} s",
         mark(r["scoring_s"] <= TARGET_SCORING_S)),
        ("peak RSS during scoring", human_mb(r["scoring_peak_rss_mb"]), "", ""),
        ("reference (query per session)", f"{r['reference_s_per_session'] * 1e3:.1f} ms/session",
         f"{r['reference_sessions']} sessions", ""),
        ("vectorised", f"{r['vectorised_s_per_session'] * 1e6:.2f} µs/session",
         f"{r['sessions_scored']:,} sessions", ""),
        ("speed-up per session (against the lake scan)", f"{r['speedup']:,.0f}×", f"≥ {TARGET_SPEEDUP}×",
         mark(r["speedup"] >= TARGET_SPEEDUP)),
        ("score mismatches (sample)", f"{r['score_mismatches']}", "0", mark(r["score_mismatches"] == 0)),
        *indexed_rows(r),
        *[(f"  tier {tier}", f"{n:,}", f"{n / max(1, r['sessions_scored']):.1%}", "")
          for tier, n in r["tier_counts"].items()],
    ]
    print_rows(f"bench_data: {r['events']:,} events / {r['sessions']:,} sessions on {r['machine']['cpu_count']} cores "
               f"(load {r['load_avg_1m'][0]:.1f} → {r['load_avg_1m'][1]:.1f})", rows)


def indexed_rows(r: dict) -> list[tuple]:
    """The seed's query against SQLite indexed on session_id: what the index costs and what it buys."""
    i = r["indexed"]
    uses_index = "session_events_session_id" in i["query_plan"]
    lake_mb = f"lake table {i['lake_mb']:,.1f} MB" if i["lake_mb"] is not None else ""
    return [
        ("indexed store: load rows into SQLite", f"{i['load_s']:.2f} s", f"{i['rows']:,} rows "
         f"({i['insert_s']:.2f} s of it in executemany)", mark(i["rows"] == r["rows_in_lake"])),
        ("indexed store: CREATE INDEX (session_id)", f"{i['index_s']:.2f} s", f"ingest took {r['ingest_s']:.1f} s", ""),
        ("indexed store: size, table + index", f"{i['table_mb']:,.1f} + {i['index_mb']:,.1f} MB", lake_mb, ""),
        ("indexed store: build peak RSS", human_mb(i["build_peak_rss_mb"]), "", ""),
        ("indexed (query per session)", f"{i['s_per_session'] * 1e6:,.0f} µs/session",
         f"{i['sessions']:,} sessions, " + ("through the index" if uses_index else "NOT through the index"),
         mark(uses_index)),
        ("lake scan / indexed, per session", f"{i['lake_scan_vs_indexed']:,.0f}×", "the index's gain", ""),
        ("speed-up per session (against the index)", f"{i['speedup']:,.1f}×", f"≥ {TARGET_SPEEDUP}×",
         mark(i["speedup"] >= TARGET_SPEEDUP)),
        ("all sessions via the index (projected)", f"{i['all_sessions_s']:,.2f} s",
         f"{i['all_sessions_with_build_s']:,.2f} s with load + index; vectorised {r['scoring_s']:.2f} s", ""),
        ("indexed: score mismatches / rows ≠ lake", f"{i['score_mismatches']} / {i['rows_differ_from_lake']}",
         f"0 / 0 ({i['rows_compared_with_lake']} sessions compared)",
         mark(i["score_mismatches"] == 0 and i["rows_differ_from_lake"] == 0)),
    ]


def versions() -> dict:
    import deltalake
    import duckdb

    return machine(duckdb=duckdb.__version__, polars=pl.__version__, deltalake=deltalake.__version__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--sessions", type=int, default=None, help="default: a fifth of --events (2,000,000)")
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--reference-sessions", type=int, default=200, help="sessions queried on the lake")
    parser.add_argument("--indexed-sessions", type=int, default=20_000,
                        help="sessions queried on the SQLite store (its sample starts with the lake's)")
    parser.add_argument("--batch-lines", type=int, default=None, help="override config.ingest.batch_lines")
    parser.add_argument("--workdir", type=Path, default=None, help="empty or new folder (default: a temp dir in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (landing files and lake)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smallest sizes, to check the script ({QUICK}); JSON to {QUICK_RESULTS}")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.sessions is None:  # so that `make bench EVENTS=1000000` keeps five events a session
        args.sessions = max(1, args.events // 5)
    if not 0 < args.sessions <= args.events:
        parser.error("need 0 < --sessions <= --events (every session has at least one event)")
    if not 0 < args.files <= args.sessions:
        parser.error("need 0 < --files <= --sessions")
    if not 0 < args.reference_sessions <= args.indexed_sessions:
        parser.error("need 0 < --reference-sessions <= --indexed-sessions (the lake's sample is checked row by row)")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench_data-", dir="/tmp"))
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["machine"] = versions()
    results["workdir"] = str(workdir) if args.keep else None
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print_table(results)
    path = QUICK_RESULTS if args.quick else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
