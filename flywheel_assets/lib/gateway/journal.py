"""The gateway's write-ahead journal: nothing answered is lost, nothing lands twice in the lake.

Before a response leaves the gateway, every record it implies (the conversation's new
state, the events it raised) is appended to the current segment and fsynced. Appends
from concurrent requests share one fsync (group commit: a writer thread takes whatever
is queued, writes it, syncs once, wakes every waiter). A failed write (a full disk)
fails those requests with 503: the client never got an answer that is not on disk.

Every `flush_interval_s` the gateway lands what is due (`land`):
  1. the current segment is sealed; appends go on into a new one;
  2. the due conversations and the events are written as landing files (the logging
     client's atomic write: temporary name, fsync, rename, directory fsync);
  3. a checkpoint holding every conversation still open is written atomically;
  4. the sealed segments and older checkpoints are deleted.
A kill -9 anywhere leaves at most the records of step 2 both landed and still in the
journal: the restart (`recover`) lands them again, under the same trajectory and event
ids, and the ingester skips ids the lake already holds. At-least-once landing and an
idempotent ingest give exactly once in the lake. A torn last line (killed mid-write)
was never acknowledged, so it is skipped.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from flywheel_assets.client import FlywheelLogger, _fsync_dir


class JournalError(OSError):
    """The journal could not make a record durable: the request must fail."""


class Journal:
    def __init__(self, folder: Path, home: Path, source: str = "gateway"):
        self.folder, self.home, self.source = Path(folder), Path(home), source
        self.folder.mkdir(parents=True, exist_ok=True)
        # one gateway per journal: a second one would take the first one's live segment for sealed
        self._lock_file = open(self.folder / "lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise JournalError(f"another gateway is serving this FLYWHEEL_HOME (its journal {self.folder} is locked)") \
                from None
        self._queue: list[tuple[list[str], threading.Event, list]] = []
        self._cond = threading.Condition()
        self._file_lock = threading.Lock()  # the writer, and a seal, hold it
        self._sequence = max((_number(p) for p in self._files()), default=0)
        self._segment = self._open_segment()
        self._closed = False
        self.fsyncs = 0
        self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._writer.start()

    def append(self, records: Iterable[dict]) -> None:
        """Durable when it returns; raises JournalError otherwise."""
        try:  # here, so that a record that cannot be written fails its own call only
            data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records).encode()
        except (ValueError, TypeError) as error:
            raise JournalError(f"a record cannot be written: {error}") from error
        if not data:
            return
        lines = [data]
        done, outcome = threading.Event(), []
        with self._cond:
            if self._closed:
                raise JournalError("the journal is closed")
            self._queue.append((lines, done, outcome))
            self._cond.notify()
        done.wait()
        if outcome:
            raise JournalError(f"journal write failed: {outcome[0]}") from outcome[0]

    def land(self, collect: Callable[[], tuple[list[dict], list[dict], list[dict]]]) -> list[Path]:
        """Steps 1–4 above; returns the landing files written. `collect()` is called once the
        segment is sealed and returns (conversations to land, events, conversations still
        open): everything in the sealed segments was in memory before the seal."""
        sealed = self._seal()
        conversations, events, still_open = collect()
        files = self._write_landing(conversations, events)
        self._checkpoint(still_open)
        for path in sealed:
            path.unlink(missing_ok=True)
        _fsync_dir(self.folder)
        return files

    def recover(self) -> tuple[list[dict], list[dict]]:
        """(the latest record of every conversation, every event) in the journal, oldest first."""
        conversations: dict[str, dict] = {}
        events: dict[str, dict] = {}
        for path in sorted(self._files(), key=_number):
            if path == self._segment_path:
                continue
            for record in _read(path):
                if record.get("kind") == "conversation":
                    # a checkpoint can be older than the segment before it: the highest revision wins
                    known = conversations.get(record["trajectory_id"])
                    if known is None or record.get("revision", 0) >= known.get("revision", 0):
                        conversations[record["trajectory_id"]] = record
                elif record.get("kind") == "event":
                    events[record["event_id"]] = record
        return list(conversations.values()), list(events.values())

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._writer.join(timeout=10)
        with self._file_lock:
            self._segment.close()
        self._lock_file.close()  # and with it the lock

    # -- internals

    def _files(self) -> list[Path]:
        return [p for p in self.folder.iterdir() if p.suffix == ".jsonl" and p.name[0] in "cs"]

    def _open_segment(self):
        self._sequence += 1
        path = self.folder / f"s{self._sequence:012d}.jsonl"
        handle = open(path, "ab")
        _fsync_dir(self.folder)
        self._segment_path = path
        return handle

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            failure: list = []
            try:
                with self._file_lock:
                    self._segment.write(b"".join(data for lines, _, _ in batch for data in lines))
                    self._segment.flush()
                    os.fsync(self._segment.fileno())
                    self.fsyncs += 1
            except BaseException as error:  # noqa: BLE001 — the writer must outlive any failure
                failure = [error if isinstance(error, OSError) else OSError(str(error))]
                self._recover_segment()
            finally:
                for _, done, outcome in batch:
                    outcome.extend(failure)
                    done.set()

    def _recover_segment(self) -> None:
        """After a failed write the segment may end in a partial line: continue in a fresh one
        (recovery skips the torn line; those requests were answered with an error)."""
        with self._file_lock:
            try:
                self._segment.close()
            except OSError:
                pass
            try:
                self._segment = self._open_segment()
            except OSError:
                pass  # the next write fails again and says so

    def _seal(self) -> list[Path]:
        with self._file_lock:
            sealed = [p for p in self._files() if p != self._segment_path]
            old, old_path = self._segment, self._segment_path
            self._segment = self._open_segment()  # first the new one: a failure leaves the old one in use
            old.close()
            sealed.append(old_path)
        return sealed

    def _write_landing(self, conversations: list[dict], events: list[dict]) -> list[Path]:
        logger = FlywheelLogger(self.home, buffer_size=10**9, source=self.source)
        for c in conversations:
            logger.log_trajectory(c["messages"], session_id=c["session_id"], user_id=c["user"],
                                  task_type=c.get("task_type") or "chat", model_version=c["model_version"],
                                  trajectory_id=c["trajectory_id"], tenant_id=c["tenant"],
                                  created_at=c["created_at"], tools=c.get("tools"), fmt="openai")
        for e in events:
            logger.log_event(e["session_id"], e["event_type"], user_id=e["user_id"], trajectory_id=e["trajectory_id"],
                             tenant_id=e["tenant_id"], data=e.get("data"), ts=e["ts"], event_id=e["event_id"])
        return logger.flush()

    def _checkpoint(self, still_open: list[dict]) -> None:
        with self._file_lock:
            self._sequence += 1
            path = self.folder / f"c{self._sequence:012d}.jsonl"
        temporary = self.folder / f".{path.name}.tmp"
        with open(temporary, "wb") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in still_open).encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_dir(self.folder)
        for older in self._files():
            if older.name.startswith("c") and _number(older) < _number(path):
                older.unlink(missing_ok=True)


def _number(path: Path) -> int:
    return int(path.stem[1:])


def _read(path: Path) -> list[dict]:
    records = []
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                records.append(json.loads(raw))
            except ValueError:
                continue  # a torn last line: its request was never answered
    return records
