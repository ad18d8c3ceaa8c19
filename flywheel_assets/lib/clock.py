"""The one clock. Real time, unless FLYWHEEL_HOME/clock.json says otherwise.

The embedded demo and the tests run days of a flywheel in minutes: they write the
simulated "now" there, and every sensor, trigger rule and registry change reads it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from flywheel_assets.lib.config import FlywheelConfig


def now(config: FlywheelConfig) -> datetime:
    path = config.home / "clock.json"
    if path.exists():
        return datetime.fromisoformat(json.loads(path.read_text())["now"]).astimezone(timezone.utc)
    return datetime.now(timezone.utc)


def set_now(config: FlywheelConfig, moment: datetime) -> None:
    config.home.mkdir(parents=True, exist_ok=True)
    temporary = config.home / ".clock.json.tmp"
    temporary.write_text(json.dumps({"now": moment.astimezone(timezone.utc).isoformat()}))
    temporary.replace(config.home / "clock.json")


def iso(value):
    """A datetime as ISO 8601 to the second with Z for UTC (also json.dumps's default= for reports)."""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds").replace("+00:00", "Z")
    if value is None:
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
