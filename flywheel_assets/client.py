"""The logging client agents import to write into the landing zone.

    from flywheel_assets.client import FlywheelLogger

    with FlywheelLogger(source="support-bot") as log:
        tid = log.log_trajectory(conversations, session_id="s1", user_id="u1",
                                 task_type="calculator", model_version="base-v0")
        log.log_event("s1", "output_accepted", user_id="u1", trajectory_id=tid)

Lines are buffered in memory and written one file per flush. Each file is written
under a dot-name ending in .tmp, fsynced, then renamed into place, so the ingester
(which skips such names) never reads half a file. Only the standard library is used,
so an agent can vendor this module without the rest of the package.
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCORED_EVENT_TYPES = frozenset(
    {"output_accepted", "retry_requested", "output_edited", "session_continued", "error_reported"}
)
FORMATS = {"hermes": "conversations", "openai": "messages"}
_SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_KINDS = ("events", "trajectories")


def validate_event_type(event_type: str) -> bool:
    """True for the five scored types. Any other non-empty name is allowed: the
    ingester keeps it and scoring ignores it, so new signals can be logged early."""
    if not isinstance(event_type, str) or not event_type.strip():
        raise ValueError(f"event_type must be a non-empty string, got {event_type!r}")
    return event_type in SCORED_EVENT_TYPES


def utc_iso(value: datetime | str | None = None) -> str:
    """ISO-8601 in UTC with a Z suffix; naive datetimes are taken as UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp must be ISO-8601, got {value!r}") from None
    moment = value or datetime.now(timezone.utc)
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


class FlywheelLogger:
    """Buffered, thread-safe writer of session events and trajectories."""

    validate_event_type = staticmethod(validate_event_type)

    def __init__(self, home: str | os.PathLike | None = None, buffer_size: int = 1000, source: str = "agent"):
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if not _SOURCE.match(source):
            raise ValueError(f"source must be letters, digits, '-' or '_' (it names files), got {source!r}")
        self.home = Path(home or os.environ.get("FLYWHEEL_HOME") or "data/home")
        self.buffer_size = buffer_size
        self.source = source
        self.landing = {kind: self.home / "landing" / kind for kind in _KINDS}
        self._buffers: dict[str, list[str]] = {kind: [] for kind in _KINDS}
        self._lock = threading.RLock()
        self._closed = False
        self.files_written: list[Path] = []

    def log_event(self, session_id: str, event_type: str, *, user_id: str, trajectory_id: str | None = None,
                  tenant_id: str = "default", data: dict | None = None, ts: datetime | str | None = None,
                  event_id: str | None = None) -> str:
        """Buffer one session event; returns its event_id (a uuid4 hex unless given)."""
        _require_text(session_id=session_id, user_id=user_id, tenant_id=tenant_id)
        validate_event_type(event_type)
        if data is not None and not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        data = dict(data or {})
        if event_type == "output_edited":
            ratio = data.get("edit_ratio")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
                raise ValueError(f"output_edited needs data['edit_ratio'] as a number in [0, 1], got {ratio!r}")
        event_id = event_id or uuid.uuid4().hex
        line: dict[str, Any] = {"event_id": event_id, "session_id": session_id}
        if trajectory_id is not None:
            line["trajectory_id"] = trajectory_id
        line.update(user_id=user_id, tenant_id=tenant_id, event_type=event_type, ts=utc_iso(ts), data=data)
        self._append("events", line)
        return event_id

    def log_trajectory(self, conversation: Sequence[dict], *, session_id: str | None, user_id: str | None,
                       task_type: str, model_version: str, trajectory_id: str | None = None,
                       tenant_id: str = "default", is_synthetic: bool = False,
                       created_at: datetime | str | None = None, tools: list[dict] | None = None,
                       fmt: str | None = None, origin: str = "usage", reward: float | None = None) -> str:
        """Buffer one agent run; returns its trajectory_id (a uuid4 hex unless given).

        `conversation` is hermes/ShareGPT turns ({"from", "value"}) or OpenAI chat
        messages ({"role", "content", ...}); fmt ("hermes" or "openai") is inferred
        from the first turn when not given.
        """
        _require_text(task_type=task_type, model_version=model_version, tenant_id=tenant_id)
        turns = list(conversation)
        fmt = fmt or _infer_format(turns)
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be 'hermes' or 'openai', got {fmt!r}")
        role_key = "from" if fmt == "hermes" else "role"
        if not turns or not all(isinstance(t, dict) and role_key in t for t in turns):
            raise ValueError(f"a {fmt} conversation is a non-empty list of dicts with {role_key!r}")
        if reward is not None and not -1.0 <= reward <= 1.0:
            raise ValueError(f"reward must be within [-1, 1], got {reward}")
        trajectory_id = trajectory_id or uuid.uuid4().hex
        line: dict[str, Any] = {
            "trajectory_id": trajectory_id, "session_id": session_id, "user_id": user_id,
            "tenant_id": tenant_id, "task_type": task_type, "model_version": model_version,
            "is_synthetic": bool(is_synthetic), "origin": origin, "created_at": utc_iso(created_at),
            FORMATS[fmt]: turns,
        }
        if tools is not None:
            line["tools"] = tools
        if reward is not None:
            line["reward"] = float(reward)
        self._append("trajectories", line)
        return trajectory_id

    def flush(self) -> list[Path]:
        """Write every non-empty buffer to its own landing file; returns the files written."""
        with self._lock:
            return [path for kind in _KINDS if (path := self._flush_kind(kind)) is not None]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self.flush()
                self._closed = True

    def __enter__(self) -> "FlywheelLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def pending(self) -> dict[str, int]:
        """Lines buffered and not yet written, per kind."""
        with self._lock:
            return {kind: len(lines) for kind, lines in self._buffers.items()}

    def _append(self, kind: str, line: dict) -> None:
        # Serialise now so a non-JSON value fails at the caller, not at a later flush.
        text = json.dumps(line, ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self._closed:
                raise RuntimeError("FlywheelLogger is closed")
            self._buffers[kind].append(text)
            if len(self._buffers[kind]) >= self.buffer_size:
                self._flush_kind(kind)

    def _flush_kind(self, kind: str) -> Path | None:
        lines = self._buffers[kind]
        if not lines:
            return None
        folder = self.landing[kind]
        folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{self.source}-{stamp}-{uuid.uuid4().hex[:8]}.jsonl"
        temporary, final = folder / f".{name}.tmp", folder / name
        try:
            with open(temporary, "wb") as handle:
                handle.write(("\n".join(lines) + "\n").encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise  # the buffer is kept, so a later flush can still write these lines
        _fsync_dir(folder)
        self._buffers[kind] = []
        self.files_written.append(final)
        return final


def _infer_format(turns: list) -> str:
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    return "openai" if "role" in first else "hermes"


def _require_text(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
