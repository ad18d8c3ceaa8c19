"""Synthetic session events for the data benchmark, written fast (numpy + polars, several processes)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl

EVENT_TYPES = ("output_accepted", "retry_requested", "output_edited", "session_continued", "error_reported")
# Two kinds of session, so that the tier mix looks like usage rather than noise:
# a good session is mostly accepted and continued, a bad one retried, edited, reported.
GOOD_SESSION_SHARE = 0.65
GOOD_MIX = (0.42, 0.10, 0.10, 0.35, 0.03)
BAD_MIX = (0.12, 0.38, 0.22, 0.10, 0.18)
TENANTS = ("acme", "globex", "initech", "default")
SESSION_MINUTES = 30
FILE_WINDOW_HOURS = 24
START_US = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
SCRAMBLE = np.uint64(0x9E3779B97F4A7C15)  # odd, so idx * SCRAMBLE is a bijection on uint64


@dataclass(frozen=True)
class FileSpec:
    path: str
    index: int
    first_event: int
    n_events: int
    first_session: int
    n_sessions: int
    n_users: int
    seed: int


def file_specs(landing: Path, events: int, sessions: int, files: int, seed: int) -> list[FileSpec]:
    """Split events and sessions into files; a session's events all sit in one file."""
    event_edges = np.linspace(0, events, files + 1).astype(np.int64)
    session_edges = np.linspace(0, sessions, files + 1).astype(np.int64)
    n_users = max(1, sessions // 4)
    return [
        FileSpec(str(landing / f"events-{k:05d}.jsonl"), k, int(event_edges[k]), int(event_edges[k + 1] - event_edges[k]),
                 int(session_edges[k]), int(session_edges[k + 1] - session_edges[k]), n_users, seed)
        for k in range(files)
    ]


def _scrambled(ids: np.ndarray) -> pl.Series:
    # Session ids carry no order, as uuids would not: Parquet min/max statistics
    # cannot prune a per-session query, which is what the seed would face.
    return pl.Series((ids.astype(np.uint64) * SCRAMBLE) >> np.uint64(16)).cast(pl.Utf8)


def write_event_file(spec: FileSpec) -> int:
    """One landing file, built column-wise (numpy draws, polars string concat)."""
    rng = np.random.default_rng([spec.seed, spec.index])
    extra = spec.n_events - spec.n_sessions
    session = np.concatenate([
        np.arange(spec.first_session, spec.first_session + spec.n_sessions),
        rng.integers(spec.first_session, spec.first_session + spec.n_sessions, extra),
    ])
    local = session - spec.first_session
    session_good = rng.random(spec.n_sessions) < GOOD_SESSION_SHARE
    session_start = START_US + spec.index * FILE_WINDOW_HOURS * 3_600_000_000 + rng.integers(
        0, FILE_WINDOW_HOURS * 3_600_000_000, spec.n_sessions)
    ts = session_start[local] + rng.integers(0, SESSION_MINUTES * 60_000_000, spec.n_events)

    draw = rng.random(spec.n_events)
    good = session_good[local]
    event_type = np.where(good, np.searchsorted(np.cumsum(GOOD_MIX), draw, side="right"),
                          np.searchsorted(np.cumsum(BAD_MIX), draw, side="right"))
    event_type = np.minimum(event_type, len(EVENT_TYPES) - 1)
    edit_ratio = np.round(rng.beta(np.where(good, 1.5, 3.0), np.where(good, 6.0, 3.0)), 3)
    trajectory = rng.integers(0, 3, spec.n_events)

    order = np.argsort(ts, kind="stable")  # a log is written in time order
    session, ts, event_type, edit_ratio, trajectory = (a[order] for a in (session, ts, event_type, edit_ratio, trajectory))
    session_id = _scrambled(session)
    user = (session.astype(np.uint64) * SCRAMBLE) % np.uint64(spec.n_users)

    frame = pl.DataFrame({
        "event_id": pl.Series(np.arange(spec.first_event, spec.first_event + spec.n_events)).cast(pl.Utf8),
        "session_id": session_id,
        "trajectory": pl.Series(trajectory).cast(pl.Utf8),
        "user_id": pl.Series(user).cast(pl.Utf8),
        "tenant_id": pl.Series(np.array(TENANTS)[(user % np.uint64(len(TENANTS))).astype(np.int64)]),
        "event_type": pl.Series(np.array(EVENT_TYPES)[event_type]),
        "ts": pl.Series(ts).cast(pl.Datetime("us")).dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
        "edit_ratio": pl.Series(edit_ratio).cast(pl.Utf8),
    })
    edited = pl.col("event_type") == "output_edited"
    line = pl.concat_str([
        pl.lit('{"event_id":"ev-'), pl.col("event_id"),
        pl.lit('","session_id":"s-'), pl.col("session_id"),
        pl.lit('","trajectory_id":"t-'), pl.col("session_id"), pl.lit("-"), pl.col("trajectory"),
        pl.lit('","user_id":"u-'), pl.col("user_id"),
        pl.lit('","tenant_id":"'), pl.col("tenant_id"),
        pl.lit('","event_type":"'), pl.col("event_type"),
        pl.lit('","ts":"'), pl.col("ts"),
        pl.lit('","data":'),
        pl.when(edited).then(pl.concat_str([pl.lit('{"edit_ratio":'), pl.col("edit_ratio"), pl.lit("}")]))
          .otherwise(pl.lit("{}")),
        pl.lit("}"),
    ]).alias("line")
    frame.select(line).write_csv(spec.path, include_header=False, quote_style="never")
    return spec.n_events


def generate(landing: Path, events: int, sessions: int, files: int, seed: int = 0) -> int:
    landing.mkdir(parents=True, exist_ok=True)
    specs = file_specs(landing, events, sessions, files, seed)
    # Spawned workers: generation memory never counts in this process's peak RSS.
    with ProcessPoolExecutor(max_workers=min(files, os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        written = sum(pool.map(write_event_file, specs))
    for spec in specs:  # the ledger ingests oldest first: make that the file order
        stamp = time.time_ns() - (len(specs) - spec.index) * 1_000_000
        os.utime(spec.path, ns=(stamp, stamp))
    return sum(os.path.getsize(s.path) for s in specs) if written == events else -1
