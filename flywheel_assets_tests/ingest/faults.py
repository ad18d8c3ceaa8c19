"""The fault-injection harness: a landing zone with poison in every folder, the lines it holds,
and the check that after any fault and a retry, every line is in a table or in quarantine, once.

Used by test_faults.py (a few rounds in `make test`) and by `make test-faults` (100 randomized
rounds: FLYWHEEL_FAULT_ROUNDS).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import threading
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from flywheel_assets.lib.ingest.lock import ingest_lock
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import ANNOTATIONS, INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES

TABLES = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}


@dataclass
class Corpus:
    """What was dropped: per ready file, its non-blank lines; and the files that are poison as a whole."""
    lines: dict[str, int] = field(default_factory=dict)  # relative path -> lines
    poison: set[str] = field(default_factory=set)  # relative paths quarantined as one row each


def event(key: str, i: int, **extra) -> dict:
    return {"event_id": f"{key}-{i}", "session_id": f"s{i % 7}", "user_id": f"u{i % 5}",
            "event_type": "output_accepted", "ts": "2026-11-26T10:00:00Z", "trajectory_id": f"t{i}", **extra}


def trajectory(key: str, i: int, **extra) -> dict:
    return {"trajectory_id": f"{key}-{i}", "session_id": f"s{i % 7}", "user_id": f"u{i % 5}",
            "created_at": "2026-11-25T08:00:00Z",
            "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
            **extra}


def annotation(key: str, i: int) -> dict:
    return {"trajectory_id": f"{key}-t{i}", "score": 1.0 if i % 2 else -1.0, "annotator": "qa"}


DEEP = "[" * 2000 + "]" * 2000


def bad_lines(kind: str, key: str) -> list[str]:
    """One of each line that must land in quarantine, whatever parses it."""
    make = {"events": event, "trajectories": trajectory, "annotations": lambda k, i, **e: {**annotation(k, i), **e}}[kind]
    stamp = {"events": "ts", "trajectories": "created_at", "annotations": "annotated_at"}[kind]
    return [
        "{not json",
        "[1, 2, 3]",
        json.dumps(make(key, 10_001))[:-1] + (', "data": {"deep": ' + DEEP + "}}" if kind == "events"
                                               else ', "nested": ' + DEEP + "}"),
        json.dumps(make(key, 10_002, **{stamp: "0001-01-01T00:00:00+05:00"})),
        json.dumps(make(key, 10_003, **{stamp: "9999-12-31T23:00:00-05:00"})),
    ]


def build_corpus(landing: Path, rng: random.Random, files_per_kind: int = 3, lines_per_file: int = 200,
                 outside: Path | None = None) -> Corpus:
    """Good files (plain, gzip, BOM, upper-case suffix) with bad lines mixed in, and poison files:
    a truncated gzip, a .gz that is not gzip, corrupt gzip data, a symlink out of the zone, a FIFO."""
    corpus = Corpus()
    makers = {"events": event, "trajectories": trajectory, "annotations": annotation}
    for kind, make in makers.items():
        folder = landing / kind
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(files_per_kind):
            key = f"{kind[:2]}{n}-{rng.randrange(10**9)}"
            lines = [json.dumps(make(key, i)) for i in range(lines_per_file)]
            for bad in bad_lines(kind, key):
                lines.insert(rng.randrange(len(lines) + 1), bad)
            name, data = f"{key}.jsonl", ("\n".join(lines) + "\n").encode()
            style = n % 3
            if style == 1:
                name, data = f"{key}.jsonl.gz", gzip.compress(data, mtime=0)
            elif style == 2:
                name, data = f"{key}.JSONL", b"\xef\xbb\xbf" + data
            (folder / name).write_bytes(data)
            corpus.lines[f"{kind}/{name}"] = len(lines)
        poison = {
            "truncated.jsonl.gz": gzip.compress(b'{"a": 1}\n' * 5000, mtime=0)[:15],
            "not-gzip.jsonl.gz": b'{"plain": "text"}\n',
            "corrupt.jsonl.gz": gzip.compress(b'{"a": 1}\n', mtime=0)[:10] + b"\x00garbage" * 20,
        }
        for name, data in poison.items():
            (folder / f"{kind}-{name}").write_bytes(data)
            corpus.poison.add(f"{kind}/{kind}-{name}")
        target = outside or Path("/etc/hostname")
        os.symlink(target, folder / f"{kind}-link.jsonl")
        corpus.poison.add(f"{kind}/{kind}-link.jsonl")
        os.mkfifo(folder / f"{kind}-fifo.jsonl")
        corpus.poison.add(f"{kind}/{kind}-fifo.jsonl")
    return corpus


def check_exact(lake: Lake, corpus: Corpus) -> None:
    """Every line of every file once, in its table or in quarantine; the ledger names each file
    once and agrees with the tables; every table reads back whole."""
    tables = {name: lake.read(table) for name, table in TABLES.items()}
    quarantine = lake.read(QUARANTINE)
    ledger = lake.read(INGESTED_FILES)
    for table in (*tables.values(), quarantine, ledger):
        table.to_pylist()  # every value representable (no timestamp out of Python's range)
    for name, table in (*tables.items(), ("quarantine", quarantine)):
        keys = table.column((TABLES.get(name) or QUARANTINE).key[0]).to_pylist()
        repeated = [k for k, n in Counter(keys).items() if n > 1]
        assert not repeated, f"{name}: {len(repeated)} keys stored twice, e.g. {repeated[:3]}"
    rows = Counter()
    for table in tables.values():
        rows.update(table.column("source_file").to_pylist())
    line_rows = Counter(r["source_file"] for r in quarantine.to_pylist() if r["source_line"] > 0)
    file_rows = Counter(r["source_file"] for r in quarantine.to_pylist() if r["source_line"] == 0)
    for path, lines in corpus.lines.items():
        assert rows[path] + line_rows[path] == lines, (path, rows[path], line_rows[path], lines)
        assert file_rows[path] == 0, path
    for path in corpus.poison:
        assert file_rows[path] == 1, (path, file_rows[path])
        assert rows[path] + line_rows[path] == 0, path
    recorded = Counter(ledger.column("source_file").to_pylist())
    assert recorded == Counter(set(corpus.lines) | corpus.poison), recorded
    for row in ledger.to_pylist():
        path = row["source_file"]
        assert row["rows_new"] + row["rows_duplicate"] + row["rows_quarantined"] == row["lines"] + (path in corpus.poison), row
        assert row["rows_new"] == rows[path] and row["rows_duplicate"] == 0, row
        assert row["rows_quarantined"] == line_rows[path] + file_rows[path], row


def check_no_lie(lake: Lake, corpus: Corpus) -> None:
    """After a failure, before any retry: every file the ledger names is wholly committed."""
    ledger = lake.read(INGESTED_FILES).to_pylist()
    rows = Counter()
    for table in TABLES.values():
        rows.update(lake.read(table, columns=["source_file"]).column("source_file").to_pylist())
    rows.update(lake.read(QUARANTINE, columns=["source_file"]).column("source_file").to_pylist())
    for row in ledger:
        path = row["source_file"]
        expected = corpus.lines.get(path, 0) + (path in corpus.poison)
        assert rows[path] == expected, f"the ledger names {path} but {rows[path]} of its {expected} lines are stored"


INGEST_SCRIPT = """
import sys
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.ingest.lock import ingest_lock
from flywheel_assets.lib.lake import Lake
config = load_config(sys.argv[1])
report = ingest_landing(config, Lake(config), log=lambda line: print(line, file=sys.stderr))
print("finished", len(report.files), file=sys.stderr)
"""


def ingest_process(home: Path, env: dict | None = None, preexec=None) -> subprocess.Popen:
    """An ingest in a process of its own, as the daemon, `dg launch` or the CLI would run one."""
    environment = {**os.environ, "FLYWHEEL_HOME": str(home), "PYTHONFAULTHANDLER": "1", **(env or {})}
    environment.pop("FLYWHEEL_CONFIG", None)
    return subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT, str(home)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)


@contextmanager
def lock_held_elsewhere(landing: Path, owner: str):
    """The landing zone's ingest lock held by another thread (so by another open file) meanwhile."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with ingest_lock(landing, 5, owner=owner):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        yield
    finally:
        release.set()
        holder.join()
