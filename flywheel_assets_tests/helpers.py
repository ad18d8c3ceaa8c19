"""Test helpers shared across stages."""

from __future__ import annotations

import json
from pathlib import Path


def write_lines(path: Path, lines: list) -> Path:
    """Lines are dicts (dumped as JSON), str or bytes (written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            handle.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path
