"""What a line may hold at the door: nesting depth and timestamps in a range every reader can represent.

A trajectory nested ~1,000 deep made Python's json raise RecursionError, and a
timestamp in year 1 or 9999 with an offset made datetime raise OverflowError — and
either, raised inside a batch, stopped the whole ingest. A timestamp DuckDB accepts
but Python cannot hold (year 10000) was stored and broke every later to_pylist().
So both are checked before anything else reads the line, and fail only that line.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Timestamps outside [TS_MIN, TS_MAX) are rejected: wide enough for any real log, narrow
# enough for Python, Arrow, DuckDB and Spark alike.
TS_MIN = datetime(1970, 1, 1, tzinfo=timezone.utc)
TS_MAX = datetime(2200, 1, 1, tzinfo=timezone.utc)
TS_RANGE = f"[{TS_MIN:%Y-%m-%d}, {TS_MAX:%Y-%m-%d})"

PROBLEM_REASONS = {
    "oversized": "line longer than the configured max_line_bytes",
    "not_utf8": "line is not valid UTF-8",
    "too_deep": "JSON nested deeper than the configured max_json_depth",
}

# possessive: a string that never closes, followed by many \" , must not take quadratic time
# (an unterminated string runs to the end of the line, as a parser would read it)
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\Z)')
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of objects and arrays (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max())


def mark_too_deep(lines: pa.Table, max_depth: int) -> pa.Table:
    """lines (landing.LINE_SCHEMA) with problem "too_deep" where the JSON nests deeper than max_depth.
    Only a line with more than max_depth opening brackets can, so only those are scanned."""
    raw = lines.column("raw")
    opening = pc.add(pc.count_substring(raw, "["), pc.count_substring(raw, "{"))
    candidates = np.flatnonzero(pc.fill_null(pc.greater(opening, max_depth), False).to_numpy(zero_copy_only=False))
    if len(candidates) == 0:
        return lines
    problems = lines.column("problem").to_pylist()
    texts = raw.take(pa.array(candidates)).to_pylist()
    changed = False
    for row, text in zip(candidates, texts):
        if problems[row] is None and json_depth(text) > max_depth:
            problems[row] = "too_deep"
            changed = True
    if not changed:
        return lines
    return lines.set_column(lines.schema.get_field_index("problem"), "problem", pa.array(problems, pa.string()))


def check_timestamp(when: datetime, name: str) -> str | None:
    """Why `when` (aware) cannot be stored, or None."""
    if not TS_MIN <= when < TS_MAX:
        return f"{name} {when.isoformat()} is outside {TS_RANGE}"
    return None
