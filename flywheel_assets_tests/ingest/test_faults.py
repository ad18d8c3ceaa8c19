"""Nothing lost, nothing twice: failed writes, kill -9, concurrent ingests, poison files.

`make test` runs a few rounds of each; `make test-faults` runs FLYWHEEL_FAULT_ROUNDS=100
randomized rounds of the same faults (the seed of each is in its assertion message).
"""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from flywheel_assets_tests.ingest.faults import (
    build_corpus, check_exact, check_no_lie, ingest_process, lock_held_elsewhere,
)
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.ingest import pipeline
from flywheel_assets.lib.ingest.pipeline import IngestError, ingest_landing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import SESSION_EVENTS

ROUNDS = int(os.environ.get("FLYWHEEL_FAULT_ROUNDS", "0"))
LONG = ROUNDS > 0


def quiet(_: str) -> None:
    pass


def fresh(tmp_path, name: str, seed: int, **corpus_options):
    home = tmp_path / name
    home.mkdir()
    config = load_config(home)
    corpus = build_corpus(config.landing, random.Random(seed), **corpus_options)
    return home, config, Lake(config), corpus


def test_the_poison_corpus_lands_each_line_once(home, config, lake):
    corpus = build_corpus(config.landing, random.Random(1))
    report = ingest_landing(config, lake, log=quiet)
    check_exact(lake, corpus)
    assert report.quarantined["unreadable_file"] == 15 and report.quarantined["too_deep"] == 9
    problems = {f["file"]: f.get("problem", "") for f in report.files}
    assert "symbolic link" in problems["events/events-link.jsonl"]
    assert "FIFO" in problems["trajectories/trajectories-fifo.jsonl"]
    assert "truncated" in problems["annotations/annotations-truncated.jsonl.gz"]
    assert "not a gzip file" in problems["events/events-not-gzip.jsonl.gz"]
    assert ingest_landing(config, lake, log=quiet).files == []
    check_exact(lake, corpus)


class _FailingAppend:
    """Lake.append that fails once, at its `at`-th call: before the write, or after it committed."""

    def __init__(self, at: int, after: bool):
        self.at, self.after, self.calls = at, after, 0
        self.original = Lake.append

    def __get__(self, lake, owner=None):  # a method of the Lake it is read from
        return lambda table, rows: self.call(lake, table, rows)

    def call(self, lake, table, rows):
        self.calls += 1
        if self.calls - 1 == self.at:
            if self.after:
                self.original(lake, table, rows)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self.original(lake, table, rows)


def _appends_in_a_clean_run(tmp_path, monkeypatch) -> int:
    counter = _FailingAppend(at=-1, after=False)
    monkeypatch.setattr(Lake, "append", counter)
    _, config, lake, _ = fresh(tmp_path, "count", seed=7, files_per_kind=2, lines_per_file=50)
    ingest_landing(config, lake, log=quiet)
    monkeypatch.setattr(Lake, "append", counter.original)
    return counter.calls


def test_a_write_failure_at_any_commit_point_fails_the_run_and_a_retry_completes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "COMMIT_ROWS", 40)  # files commit in several parts: failures between them too
    commits = _appends_in_a_clean_run(tmp_path, monkeypatch)
    rng = random.Random(11)
    points = [(at, after) for at in range(commits) for after in (False, True)]
    for at, after in points if LONG else rng.sample(points, 6):
        failing = _FailingAppend(at, after)
        monkeypatch.setattr(Lake, "append", failing)
        _, config, lake, corpus = fresh(tmp_path, f"fail-{at}-{after}", seed=7, files_per_kind=2, lines_per_file=50)
        with pytest.raises(IngestError, match="No space left on device"):
            ingest_landing(config, lake, log=quiet)
        check_no_lie(lake, corpus)
        monkeypatch.setattr(Lake, "append", failing.original)
        ingest_landing(config, lake, log=quiet)
        check_exact(lake, corpus)


def _limit_file_size():
    # every file the ingest writes is capped: a large Delta data file fails with EFBIG, like a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_real_write_error_from_the_os_loses_nothing(tmp_path):
    home, config, lake, corpus = fresh(tmp_path, "fsize", seed=3, files_per_kind=3, lines_per_file=20_000)
    process = ingest_process(home, preexec=_limit_file_size)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and b"IngestError" in stderr and b"File too large" in stderr, stderr[-2000:]
    check_no_lie(lake, corpus)
    ingest_landing(config, lake, log=quiet)
    check_exact(lake, corpus)


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_loses_nothing_and_a_retry_after_freeing_space_completes(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("a tmpfs cannot be mounted here (needs root); test_a_real_write_error_from_the_os covers it")
    try:
        monkeypatch.setenv("FLYWHEEL_LAKE_URI", str(disk / "lake"))
        _, config, lake, corpus = fresh(tmp_path, "full", seed=5, files_per_kind=3, lines_per_file=30_000)
        with pytest.raises(IngestError, match="No space left on device|os error 28"):
            ingest_landing(config, lake, log=quiet)
        check_no_lie(lake, corpus)
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        ingest_landing(config, lake, log=quiet)
        check_exact(lake, corpus)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_kill_9_at_random_moments_then_a_retry_gives_each_line_once(tmp_path):
    """Each round: one to three ingests at once, one of them killed at a random moment; the
    others finish; then a retry, and every line must be there once."""
    rng = random.Random(int(os.environ.get("FLYWHEEL_FAULT_SEED", "2026")))
    for round_ in range(ROUNDS or 3):
        seed = rng.randrange(10**6)
        home, config, lake, corpus = fresh(tmp_path, f"kill-{round_}", seed=seed, files_per_kind=3,
                                           lines_per_file=rng.choice([200, 5_000, 20_000]))
        processes = [ingest_process(home) for _ in range(rng.choice([1, 1, 2, 3]))]
        victim = rng.randrange(len(processes))
        time.sleep(rng.uniform(0.3, 3.0))
        processes[victim].send_signal(signal.SIGKILL)
        outputs = [p.communicate(timeout=300) for p in processes]
        survivors = [p.returncode for i, p in enumerate(processes) if i != victim]
        try:
            assert survivors == [0] * len(survivors), [o[1][-3000:].decode() for o in outputs]
            ingest_landing(config, lake, log=quiet)
            check_exact(lake, corpus)
        except AssertionError as error:
            raise AssertionError(f"round {round_} (seed {seed}, {len(processes)} ingests): {error}") from None


def test_concurrent_ingests_never_duplicate(tmp_path):
    rng = random.Random(99)
    for round_ in range(max(ROUNDS // 4, 1)):
        seed = rng.randrange(10**6)
        home, config, lake, corpus = fresh(tmp_path, f"concurrent-{round_}", seed=seed, lines_per_file=3_000)
        processes = [ingest_process(home) for _ in range(3)]
        in_process = threading.Thread(target=ingest_landing, args=(config, Lake(config)), kwargs={"log": quiet})
        in_process.start()
        outputs = [p.communicate(timeout=300) for p in processes]
        in_process.join()
        assert [p.returncode for p in processes] == [0, 0, 0], [o[1][-6000:].decode() for o in outputs]
        check_exact(lake, corpus)


def test_a_second_ingest_waits_then_gives_up_with_a_clear_message(home, config, lake):
    from flywheel_assets.lib.ingest.lock import IngestBusy

    config.ingest.lock_timeout_s = 0.5
    build_corpus(config.landing, random.Random(4), files_per_kind=1, lines_per_file=5)
    with lock_held_elsewhere(config.landing, "test holder"):
        with pytest.raises(IngestBusy, match="another ingest is running .*test holder.*Nothing was read"):
            ingest_landing(config, lake, log=quiet)
        assert lake.row_count(SESSION_EVENTS) == 0
    assert ingest_landing(config, lake, log=quiet).rows_new["events"] == 5


def test_the_cli_run_twice_at_once_on_one_file_adds_it_once(tmp_path):
    home = tmp_path / "home"
    source = tmp_path / "drop" / "events.jsonl"
    source.parent.mkdir()
    corpus_home = tmp_path / "corpus"
    build_corpus(load_config(corpus_home).landing, random.Random(8), files_per_kind=1, lines_per_file=20_000)
    shutil.copyfile(next((load_config(corpus_home).landing / "events").glob("*.jsonl")), source)
    env = {**os.environ, "FLYWHEEL_HOME": str(home)}
    env.pop("FLYWHEEL_CONFIG", None)
    command = [sys.executable, "-m", "flywheel_assets.cli", "ingest", str(source), "--kind", "events", "--json"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [o[1][-6000:].decode() for o in outputs]
    lake = Lake(load_config(home))
    lines = sum(1 for line in source.read_bytes().splitlines() if line.strip())
    events = lake.read(SESSION_EVENTS, columns=["event_id"]).column("event_id").to_pylist()
    assert len(events) == len(set(events)) and len(events) + lake.row_count(pipeline.QUARANTINE) == lines
    assert len(lake.read(pipeline.INGESTED_FILES).to_pylist()) == 1
    assert not [p for p in (load_config(home).landing / "events" / "cli").iterdir() if p.name.startswith(".")]
