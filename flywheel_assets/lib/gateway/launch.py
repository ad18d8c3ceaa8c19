"""`flywheel serve` as a child process, for the benchmark and the tests that kill it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def start_serving(home: Path, config_path: Path, port: int, timeout_s: float = 180) -> subprocess.Popen:
    """Start the gateway on 127.0.0.1:port and return once /healthz answers. Its output goes
    to log_path(home, port) — a file, not a pipe, which a busy server would fill and block
    on — so that a gateway that dies says why."""
    import httpx

    env = {**os.environ, "FLYWHEEL_HOME": str(home), "FLYWHEEL_CONFIG": str(config_path)}
    with log_path(home, port).open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "flywheel_assets.cli", "serve", "--port", str(port)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited: {log_tail(home, port)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the gateway did not come up in {timeout_s:.0f} s")


def log_path(home: Path, port: int) -> Path:
    return Path(home) / f"gateway-{port}.log"


def log_tail(home: Path, port: int, chars: int = 2000) -> str:
    path = log_path(home, port)
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
