"""The gateway under load: the real `openai` SDK (AsyncOpenAI) as 50 concurrent agents on loopback.

Each agent runs tool-calling loops against `flywheel serve` (the embedded model, briefly
pretrained, its tools the built-in world's, executed for real): a new conversation, then
up to 3 tool rounds until the model answers. Phases, all in one run:

  batched   `flywheel serve` as configured (micro-batching, max_batch_size 32), DURATION s
  single    the same server with max_batch_size 1: one request at a time, DURATION s
  kill -9   batched again, killed with SIGKILL halfway and restarted; then everything is
            ingested and the lake is checked against what the agents were answered:
            conversations lost, duplicated, and those in the lake that were never answered
  upstream  the gateway in upstream mode in front of a stand-in OpenAI server (a fixed
            reply), one request at a time, interleaved with calls to the stand-in directly:
            the gateway's added p50 latency

    .venv/bin/python benchmarks/bench_gateway.py [--agents 50] [--duration 60]

Targets (✓/✗, never failing the run): batched ≥ 3× the single throughput; upstream overhead
at p50 ≤ 5 ms; 0 lost, 0 duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_gateway-latest.json"
WORK = Path(tempfile.gettempdir()) / "flywheel-bench" / "gateway"
sys.path.insert(0, str(REPO))

from common import machine, mark, print_rows  # noqa: E402  (benchmarks/ is on sys.path)

from flywheel_assets.lib.gateway.launch import start_serving  # noqa: E402


def prepare_home(home: Path) -> None:
    """A FLYWHEEL_HOME with an embedded base (pretrained briefly, reused across runs) as champion."""
    from flywheel_assets.lib.config import FlywheelConfig
    from flywheel_assets.lib.experiments.registry import ModelRegistry
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.simulation.tasks import COLD_START_PHRASINGS, expert_messages, generate_tasks
    from flywheel_assets.lib.training.pipeline import set_threads, train_base

    base = WORK / "base"
    if not (base / "config.json").exists():
        set_threads()
        config = FlywheelConfig(home=WORK)
        config.base_model = config.base_model.model_copy(update={"pretrain_steps": 150})
        rng = random.Random(0)
        messages = [expert_messages(t, rng) for t in generate_tasks(600, seed=3, phrasings=range(COLD_START_PHRASINGS))]
        train_base(config, messages, base)
    home.mkdir(parents=True)
    (home / "models").mkdir()
    (home / "models" / "base").symlink_to(base, target_is_directory=True)
    ModelRegistry(Lake(FlywheelConfig(home=home))).register(
        "base-v0", base="embedded", base_path="models/base", reason="benchmark", actor="bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, settings: dict, port: int) -> subprocess.Popen:
    config_path = home / f"gateway-{port}.json"
    config_path.write_text(json.dumps({"gateway": {"rate_limit_per_minute": 10**7, **settings}}))
    return start_serving(home, config_path, port)


class Load:
    """What the agents saw: latencies of answered calls, errors, conversations."""

    def __init__(self):
        self.latencies: list[float] = []
        self.errors = 0
        self.answered: set[str] = set()  # trajectory ids whose final answer reached the agent
        self.conversations = 0

    def summary(self, seconds: float) -> dict:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else float("nan")

        return {"seconds": round(seconds, 1), "requests": len(ordered), "requests_per_s": len(ordered) / seconds,
                "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "errors": self.errors,
                "conversations_completed": self.conversations}


async def agents(url: str, key: str, count: int, seconds: float, load: Load, on_half=None) -> float:
    import httpx
    from openai import APIConnectionError, APIStatusError, AsyncOpenAI

    from flywheel_assets.lib.simulation.tasks import generate_tasks
    from flywheel_assets.lib.simulation.tools import TOOLS, run_tool

    prompts = [t.prompt for t in generate_tasks(2000, seed=9)]
    client = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=60,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=count + 10)))
    started = time.monotonic()
    deadline = started + seconds

    async def agent(n: int) -> None:
        rng = random.Random(n)
        while time.monotonic() < deadline:
            messages = [{"role": "user", "content": rng.choice(prompts)}]
            for _ in range(4):
                began = time.perf_counter()
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="flywheel", messages=messages, tools=TOOLS, user=f"agent-{n}", max_tokens=40)
                except (APIConnectionError, APIStatusError):
                    load.errors += 1
                    await asyncio.sleep(0.1)
                    break
                load.latencies.append(time.perf_counter() - began)
                reply = raw.parse().choices[0].message
                if not reply.tool_calls:
                    load.answered.add(raw.headers["x-flywheel-trajectory-id"])
                    load.conversations += 1
                    break
                messages.append(reply.model_dump(exclude_none=True))
                for call in reply.tool_calls:
                    messages.append({"role": "tool", "tool_call_id": call.id,
                                     "content": run_tool(call.function.name, call.function.arguments)})

    tasks = [asyncio.create_task(agent(n)) for n in range(count)]
    if on_half is not None:
        await asyncio.sleep(seconds / 2)
        await asyncio.to_thread(on_half)
    await asyncio.gather(*tasks)
    await client.close()
    return time.monotonic() - started


def phase(home: Path, key: str, settings: dict, count: int, seconds: float, kill: bool = False) -> tuple[dict, Load]:
    port = free_port()
    holder = {"server": start_server(home, settings, port)}
    load = Load()
    restart = {}

    def kill_and_restart() -> None:
        holder["server"].send_signal(signal.SIGKILL)
        holder["server"].wait()
        began = time.monotonic()
        holder["server"] = start_server(home, settings, port)
        restart["down_s"] = time.monotonic() - began

    seconds_run = asyncio.run(agents(f"http://127.0.0.1:{port}/v1", key, count, seconds, load,
                                     kill_and_restart if kill else None))
    holder["server"].send_signal(signal.SIGTERM)  # graceful: what is due lands
    holder["server"].wait(timeout=120)
    return load.summary(seconds_run) | restart, load


class StandIn(BaseHTTPRequestHandler):
    """The upstream: a fixed chat completion, at once."""

    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as inference servers set it: without it the reply's second segment (the body,
    # after the headers) waits for the client's delayed ACK, 40 ms on Linux loopback
    disable_nagle_algorithm = True
    body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "42"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def upstream_overhead(home: Path, key: str, requests: int) -> dict:
    from openai import OpenAI

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    upstream = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    port = free_port()
    server = start_server(home, {"upstream": {"base_url": upstream}, "flush_interval_s": 1.0}, port)
    direct, gateway = OpenAI(base_url=upstream, api_key="x", max_retries=0), \
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    times = {"direct": [], "gateway": []}
    messages = [{"role": "user", "content": "What is 6 times 7?"}]
    try:
        for n in range(requests + 20):  # interleaved, the first 20 of each are warm-up
            for name, client in (("direct", direct), ("gateway", gateway)) if n % 2 else \
                    (("gateway", gateway), ("direct", direct)):
                began = time.perf_counter()
                client.chat.completions.create(model="m", messages=messages, user=f"u{n}")
                if n >= 20:
                    times[name].append(time.perf_counter() - began)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        httpd.shutdown()
    p50 = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {"requests_each": requests, "direct_p50_ms": p50["direct"], "gateway_p50_ms": p50["gateway"],
            "overhead_p50_ms": p50["gateway"] - p50["direct"]}


def lake_check(home: Path, answered: set[str]) -> dict:
    from flywheel_assets.lib.config import FlywheelConfig
    from flywheel_assets.lib.ingest.pipeline import ingest_landing
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.tables import TRAJECTORIES

    config = FlywheelConfig(home=home)
    lake = Lake(config)
    ingest_landing(config, lake, log=lambda _: None)
    stored = lake.read(TRAJECTORIES, columns=["trajectory_id"]).column("trajectory_id").to_pylist()
    landed_lines = sum(len(p.read_text().splitlines()) for p in (home / "landing" / "trajectories").rglob("*.jsonl"))
    return {"answered_conversations": len(answered), "trajectories_in_lake": len(stored),
            "lost": len(answered - set(stored)), "duplicated": len(stored) - len(set(stored)),
            "in_lake_never_answered": len(set(stored) - answered), "landed_lines": landed_lines}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per phase")
    parser.add_argument("--upstream-requests", type=int, default=300)
    args = parser.parse_args(argv)
    import shutil

    from flywheel_assets.lib.gateway.keys import KeyStore

    home = WORK / "home"
    shutil.rmtree(home, ignore_errors=True)
    prepare_home(home)
    key, _ = KeyStore(home / "gateway" / "keys.json").create("bench")
    result = {"agents": args.agents, "duration_s": args.duration, "machine": machine()}
    print(f"batched: {args.agents} agents for {args.duration:.0f} s …", flush=True)
    result["batched"], _ = phase(home, key, {"max_batch_size": 32, "batch_window_ms": 10}, args.agents, args.duration)
    print(f"single: one request at a time for {args.duration:.0f} s …", flush=True)
    result["single"], _ = phase(home, key, {"max_batch_size": 1, "batch_window_ms": 0}, args.agents, args.duration)
    shutil.rmtree(home / "landing", ignore_errors=True)
    shutil.rmtree(home / "gateway" / "journal", ignore_errors=True)
    shutil.rmtree(home / "lake" / "bronze", ignore_errors=True)
    print(f"kill -9: batched for {args.duration:.0f} s, killed and restarted halfway …", flush=True)
    result["kill"], load = phase(home, key, {"max_batch_size": 32, "batch_window_ms": 10, "conversation_idle_s": 5},
                                 args.agents, args.duration, kill=True)
    result["lake"] = lake_check(home, load.answered)
    print("upstream overhead …", flush=True)
    result["upstream"] = upstream_overhead(home, key, args.upstream_requests)
    result["batched_over_single"] = result["batched"]["requests_per_s"] / result["single"]["requests_per_s"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    b, s, k, lake, up = (result[x] for x in ("batched", "single", "kill", "lake", "upstream"))
    rows = [(f"{name}: requests/s", f"{r['requests_per_s']:.1f}",
             f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; {r['errors']} errors; "
             f"{r['conversations_completed']} conversations", "") for name, r in (("batched", b), ("single", s), ("kill -9", k))]
    rows += [("batched / single throughput", f"{result['batched_over_single']:.2f}×", "≥ 3×",
              mark(result["batched_over_single"] >= 3)),
             ("kill -9: down while restarting", f"{k.get('down_s', 0):.1f} s", "", ""),
             ("answered conversations lost / duplicated", f"{lake['lost']} / {lake['duplicated']}", "0 / 0",
              mark(lake["lost"] == 0 and lake["duplicated"] == 0)),
             ("in the lake, not finished by its agent (cut by the kill)", str(lake["in_lake_never_answered"]), "", ""),
             ("upstream overhead at p50", f"{up['overhead_p50_ms']:.2f} ms",
              f"≤ 5 ms (direct {up['direct_p50_ms']:.2f} ms, through the gateway {up['gateway_p50_ms']:.2f} ms)",
              mark(up["overhead_p50_ms"] <= 5))]
    print_rows(f"bench_gateway: {args.agents} agents (AsyncOpenAI), {args.duration:.0f} s a phase", rows)
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
