"""One ingest at a time over a landing zone and its lake, whoever starts it.

The key index that keeps an ingest from adding a row twice is loaded at the start of a
run: two runs side by side would each find the same rows new and both append them. So
every ingest (the Dagster asset, `flywheel ingest`, `flywheel annotate --ingest`) holds
an exclusive `flock` on landing/.ingest.lock for the whole run, and decides which files
are pending only once it holds it.

Why flock: the kernel drops the lock when its holder dies, kill -9 included, so there
is no stale lock to break and no lease to renew by hand. On a landing zone shared by
several machines over NFSv4, Linux maps flock to the protocol's byte-range locks,
which the server holds under a lease: a crashed client's lock expires with its lease.
(A filesystem without working locks, such as some FUSE mounts of object stores, is not
covered: keep the landing zone on a local disk or NFS.)

The lock is re-entrant within a thread, so the CLI can hold it while it stages copies
and still call ingest_landing, which takes it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flywheel_assets.lib.lake import utcnow

LOCK_NAME = ".ingest.lock"

_held: dict[str, int] = {}  # lock path -> the thread holding it in this process
_held_guard = threading.Lock()


class IngestBusy(RuntimeError):
    """Another ingest held the lock for longer than we were willing to wait."""


def lock_path(landing: Path, name: str = LOCK_NAME) -> Path:
    return Path(landing) / name


def holder(landing: Path, name: str = LOCK_NAME) -> dict | None:
    """Who holds (or last held) the lock, as it wrote itself into the lock file."""
    try:
        text = lock_path(landing, name).read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('owner')}), "
            f"holding it since {info.get('since')}")


REFRESH_PREFIX = ".refresh-"
# the tables lib/feedback/refresh_scores.py and lib/curation/refresh_curated.py refresh, one run each at a time
REFRESHED_TABLES = ("session_feedback", "judge_scores", "trajectory_scores", "curated_trajectories")


def refresh_lock_name(table: str) -> str:
    return f"{REFRESH_PREFIX}{table}.lock"


@contextmanager
def every_lock(landing: Path, timeout_s: float, owner: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """The ingest lock and every refresh lock, in one order: nothing lands or is re-scored while
    they are held (lib/privacy/forget.py, lib/storage/maintenance.py)."""
    with ingest_lock(landing, timeout_s, owner=owner, log=log):
        with contextlib.ExitStack() as held:
            for table in REFRESHED_TABLES:
                held.enter_context(ingest_lock(landing, timeout_s, owner=owner, log=log, name=refresh_lock_name(table)))
            yield


# Runs that write what they derived from the lake outside the ingest and refresh locks (curation,
# datasets, training, the teacher's corrections, the LLM judge, the rollout and rollbacks, the
# CLI's annotate, export, promote and rollback) hold
# WRITERS shared (none takes the ingest lock while it does; curation then takes its own refresh lock,
# in the order forget takes both, so neither waits on the other in a cycle); `flywheel forget`
# holds it exclusive, so none of them can read a user's rows
# before a forget and write them back after it. A writer passes the GATE first (held a moment,
# never while it works), and forget holds the gate while it waits: new writers queue behind a
# waiting forget instead of starving it.
WRITERS_LOCK = ".writers.lock"
WRITERS_GATE = ".writers-gate.lock"


@contextmanager
def writing(landing: Path, timeout_s: float, owner: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Held by a run that writes what it derived from the lake: waits while a forget runs."""
    with contextlib.ExitStack() as held:
        with ingest_lock(landing, timeout_s, owner=owner, log=log, name=WRITERS_GATE):
            held.enter_context(ingest_lock(landing, timeout_s, owner=owner, log=log, name=WRITERS_LOCK, shared=True))
        yield


@contextmanager
def no_writers(landing: Path, timeout_s: float, owner: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Held by a forget: new writers wait at the gate, running ones are waited for (timeout_s)."""
    with ingest_lock(landing, timeout_s, owner=owner, log=log, name=WRITERS_GATE):
        with ingest_lock(landing, timeout_s, owner=owner, log=log, name=WRITERS_LOCK):
            yield


@contextmanager
def ingest_lock(landing: Path, timeout_s: float, owner: str = "ingest",
                log: Callable[[str], None] | None = None, poll_s: float = 0.2, name: str = LOCK_NAME,
                shared: bool = False) -> Iterator[None]:
    """Hold the landing zone's ingest lock; wait up to timeout_s for it, then raise IngestBusy.
    Another `name` is another lock beside it (lib/feedback/refresh.py: one refresh of a table at a time);
    `shared` holds it beside other shared holders (WRITERS_LOCK)."""
    path = lock_path(landing, name)
    key = str(path.resolve())
    me = threading.get_ident()
    with _held_guard:
        reentered = _held.get(key) == me
    if reentered:  # the outer holder releases it
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except PermissionError:  # another user's lock file: flock works on a read-only descriptor too
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _acquire(fd, landing, name, timeout_s, log, poll_s, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        _write_holder(fd, owner)
        if not shared:  # a shared lock beside another shared holder is no conflict: nothing to re-enter
            with _held_guard:
                _held[key] = me
        try:
            yield
        finally:
            if not shared:
                with _held_guard:
                    _held.pop(key, None)
    finally:
        os.close(fd)  # releases the flock


def _write_holder(fd: int, owner: str) -> None:
    """Who holds the lock, for the message another ingest prints; best effort (a full disk or a
    read-only descriptor must not fail the ingest, nor leave the lock marked as held)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "owner": owner, "since": utcnow().isoformat()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass


def _acquire(fd: int, landing: Path, name: str, timeout_s: float, log: Callable[[str], None] | None,
             poll_s: float, mode: int) -> None:
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        who = describe(holder(landing, name))
        if time.monotonic() >= deadline:
            what = {LOCK_NAME: f"another ingest is running over {landing}",
                    WRITERS_GATE: "a `flywheel forget` is running or waiting for the runs that write",
                    WRITERS_LOCK: "runs that write what they derived from the lake are still running"}.get(
                name, f"another run holds {lock_path(landing, name)}")
            raise IngestBusy(f"{what} ({who}); waited {timeout_s:g} s. "
                             "Nothing was read: run again when it has finished "
                             f"({'privacy' if name in (WRITERS_LOCK, WRITERS_GATE) else 'ingest'}.lock_timeout_s "
                             "sets how long to wait)")
        if log is not None and not said:
            log(f"waiting for the lock {lock_path(landing, name)}: held by {who}")
            said = True
        time.sleep(poll_s)
