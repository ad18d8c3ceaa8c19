"""Data-half benchmark: landing JSONL → bronze Delta → session scores and tiers.

One run generates N synthetic events over S sessions, ingests them with the real
`ingest_landing`, scores every session with `session_feedback` and tiers the scores
with `tier_sql`, then measures the seed's query-per-session reference on a sample of
the same sessions (same Delta table, same run) and checks that both give the same
scores. Prints a results table and writes benchmarks/results/bench_data-latest.json.

    .venv/bin/python benchmarks/bench_data.py [--events 10000000] [--sessions 2000000]
        [--files 10] [--reference-sessions 200] [--workdir DIR] [--keep]

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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_data-latest.json"

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


def seed_quality_score(rows: list[tuple[str, float | None, str | None]]) -> float:
    """The seed's ImplicitFeedback.quality_score over a session's (event_type, edit_ratio,
    trajectory_id) rows, folded in the order given (the last edit wins, as in the seed)."""
    accepted = continued = error = False
    retries = 0
    edit_ratio = 0.0
    for event_type, ratio, _trajectory in rows:
        if event_type == "output_accepted":
            accepted = True
        elif event_type == "retry_requested":
            retries += 1
        elif event_type == "output_edited":
            edit_ratio = ratio or 0.0
        elif event_type == "session_continued":
            continued = True
        elif event_type == "error_reported":
            error = True
    score = 0.5
    score += 0.3 if accepted else -0.3
    if retries == 0:
        score += 0.1
    elif retries >= 3:
        score -= 0.2
    score -= edit_ratio * 0.3
    if continued:
        score += 0.1
    if error:
        score -= 0.4
    return max(-1.0, min(1.0, score))


def human_mb(value: float) -> str:
    return f"{value:,.0f} MB"


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

    print(f"reference: one query per session for {args.reference_sessions} sessions …", flush=True)
    scores = dict(zip(feedback.column("session_id").to_pylist(), feedback.column("quality_score").to_pylist()))
    rng = np.random.default_rng(1)
    sample = [feedback.column("session_id")[int(i)].as_py()
              for i in rng.choice(feedback.num_rows, min(args.reference_sessions, feedback.num_rows), replace=False)]
    mismatches = []
    started = time.perf_counter()
    for done, session_id in enumerate(sample, start=1):
        if done % 25 == 0:
            print(f"  {time.perf_counter() - started:7.1f} s  {done}/{len(sample)} sessions", flush=True)
        rows = con.execute("SELECT event_type, edit_ratio, trajectory_id FROM session_events "
                           "WHERE session_id = ? ORDER BY ts", [session_id]).fetchall()
        reference = seed_quality_score(rows)
        if abs(reference - scores[session_id]) > 1e-9:
            mismatches.append({"session_id": session_id, "reference": reference, "vectorised": scores[session_id]})
    reference_s = time.perf_counter() - started
    load_after = os.getloadavg()
    reference_per_session = reference_s / max(1, len(sample))
    vectorised_per_session = scoring_s / max(1, feedback.num_rows)
    speedup = reference_per_session / vectorised_per_session if vectorised_per_session else float("inf")

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
        "reference_sessions": len(sample), "reference_s": reference_s,
        "reference_s_per_session": reference_per_session, "vectorised_s_per_session": vectorised_per_session,
        "speedup": speedup, "score_mismatches": len(mismatches), "mismatch_examples": mismatches[:5],
        "tier_counts": tier_counts,
        # Other work on the machine slows every number; 1-minute load before ingest and after the reference.
        "load_avg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        "load_avg_1m_after_ingest": round(load_after_ingest[0], 2),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
        ("speed-up per session", f"{r['speedup']:,.0f}×", f"≥ {TARGET_SPEEDUP}×", mark(r["speedup"] >= TARGET_SPEEDUP)),
        ("score mismatches (sample)", f"{r['score_mismatches']}", "0", mark(r["score_mismatches"] == 0)),
        *[(f"  tier {tier}", f"{n:,}", f"{n / max(1, r['sessions_scored']):.1%}", "")
          for tier, n in r["tier_counts"].items()],
    ]
    print_rows(f"bench_data: {r['events']:,} events / {r['sessions']:,} sessions on {r['machine']['cpu_count']} cores "
               f"(load {r['load_avg_1m'][0]:.1f} → {r['load_avg_1m'][1]:.1f})", rows)


def versions() -> dict:
    import deltalake
    import duckdb

    return machine(duckdb=duckdb.__version__, polars=pl.__version__, deltalake=deltalake.__version__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--sessions", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--reference-sessions", type=int, default=200)
    parser.add_argument("--batch-lines", type=int, default=None, help="override config.ingest.batch_lines")
    parser.add_argument("--workdir", type=Path, default=None, help="empty or new folder (default: a temp dir in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (landing files and lake)")
    args = parser.parse_args(argv)
    if not 0 < args.sessions <= args.events:
        parser.error("need 0 < --sessions <= --events (every session has at least one event)")
    if not 0 < args.files <= args.sessions:
        parser.error("need 0 < --files <= --sessions")
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
