"""Test helpers shared across stages."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def completion(content) -> dict:
    """An OpenAI chat.completion whose single choice says `content` (JSON-encoded unless a string or None)."""
    text = content if isinstance(content, str) or content is None else json.dumps(content)
    return {"id": "cmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class StandIn:
    """A local OpenAI-compatible server: answers POSTs from a queue of scripted
    (status, body, delay_s) replies, else `default`, and records every request."""

    def __init__(self, default: tuple[int, dict | bytes]):
        self.requests: list[dict] = []
        self.replies: deque[tuple[int, dict | bytes, float]] = deque()
        self.default = default
        self.url = ""

    def reply(self, body: dict | bytes, status: int = 200, delay_s: float = 0.0) -> None:
        self.replies.append((status, body, delay_s))


@contextmanager
def openai_stand_in(default: tuple[int, dict | bytes] = (500, b"no reply scripted")):
    stand_in = StandIn(default)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            stand_in.requests.append({
                "path": self.path, "authorization": self.headers.get("Authorization"),
                "content_type": self.headers.get("Content-Type"), "body": json.loads(body),
            })
            status, payload, delay_s = stand_in.replies.popleft() if stand_in.replies else (*stand_in.default, 0.0)
            time.sleep(delay_s)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    stand_in.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/"
    try:
        yield stand_in
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def landing_sensor_ticks(home: Path):
    """tick(cursor) → landing_sensor's result on an ephemeral instance over this FLYWHEEL_HOME."""
    import dagster as dg

    from flywheel_assets.defs.ingest.sensors import landing_sensor
    from flywheel_assets.defs.resources import FlywheelResource

    resources = {"flywheel": FlywheelResource(home=str(home))}
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
            return landing_sensor.evaluate_tick(context)

    tick.instance = instance
    return tick


def train_tiny_base(home: Path) -> Path:
    """A real (weak) embedded base in home/models/base: a few seconds of pretraining on 200
    cold-start conversations."""
    import random

    from flywheel_assets.lib.config import FlywheelConfig
    from flywheel_assets.lib.simulation.tasks import COLD_START_PHRASINGS, expert_messages, generate_tasks
    from flywheel_assets.lib.training.pipeline import set_threads, train_base

    set_threads()
    config = FlywheelConfig(home=home)
    config.base_model = config.base_model.model_copy(
        update={"hidden_size": 48, "layers": 2, "intermediate_size": 96, "pretrain_steps": 40})
    rng = random.Random(0)
    messages = [expert_messages(t, rng) for t in generate_tasks(200, seed=3, phrasings=range(COLD_START_PHRASINGS))]
    train_base(config, messages, config.models / "base")
    return config.models / "base"
