"""Human labels: {"trajectory_id", "score" or "label", "annotator", "note", "annotated_at"} per line."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from flywheel_assets.lib.ingest.trajectories import BadLine, parse_timestamp


def parse_annotation(obj, ingested_at: datetime) -> dict:
    """{"trajectory_id", "score" in [-1, 1] (or "label": good/bad), "annotator", "note", "annotated_at"}."""
    if not isinstance(obj, dict):
        raise BadLine("not_an_object", f"line is JSON {type(obj).__name__}, not an object")
    trajectory_id = obj.get("trajectory_id")
    if not isinstance(trajectory_id, str) or not trajectory_id:
        raise BadLine("missing_key" if trajectory_id is None else "wrong_type", "trajectory_id must be a non-empty string")
    score = obj.get("score", {"good": 1.0, "bad": -1.0}.get(obj.get("label")))
    if score is None:
        raise BadLine("missing_key", "score (in [-1, 1]) or label (good/bad) is required")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise BadLine("wrong_type", f"score must be a number, got {type(score).__name__}")
    if not -1.0 <= score <= 1.0:
        raise BadLine("invalid_value", f"score must be within [-1, 1], got {score}")
    annotated_at = obj.get("annotated_at")
    if annotated_at is not None and not isinstance(annotated_at, str):
        raise BadLine("wrong_type", f"annotated_at must be a string, got {type(annotated_at).__name__}")
    when = parse_timestamp(annotated_at, ingested_at, "annotated_at")
    annotator = str(obj.get("annotator") or "unknown")
    note = obj.get("note") if isinstance(obj.get("note"), str) else None
    # The id is the label's content, never the time it was read: the same label dropped again (a
    # copied or touched file) is a duplicate, not a newer label. annotated_at counts as written,
    # absent included; it is what orders two labels of one trajectory.
    content = json.dumps([trajectory_id, annotator, float(score), note, annotated_at], ensure_ascii=False)
    return {
        "annotation_id": hashlib.md5(content.encode()).hexdigest(),
        "trajectory_id": trajectory_id, "score": float(score), "annotator": annotator,
        "note": note, "annotated_at": when,
    }
