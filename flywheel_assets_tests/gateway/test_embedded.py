"""The gateway serving a real model (the embedded tiny one, briefly pretrained): answers
through the chat-template path, micro-batches concurrent calls, and loses nothing to a
kill -9 (a real `flywheel serve` process, killed mid-traffic and restarted)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.gateway.app import create_app
from flywheel_assets.lib.gateway.keys import KeyStore
from flywheel_assets.lib.gateway.launch import log_tail, start_serving
from flywheel_assets.lib.gateway.service import Gateway
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.simulation.tasks import generate_tasks
from flywheel_assets.lib.simulation.tools import TOOLS
from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES
from flywheel_assets_tests.gateway.support import register_versions
from flywheel_assets_tests.helpers import train_tiny_base


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return train_tiny_base(tmp_path_factory.mktemp("gateway-model"))


@pytest.fixture
def served_home(home, tiny_base, monkeypatch) -> Path:
    (home / "models").mkdir()
    (home / "models" / "base").symlink_to(tiny_base, target_is_directory=True)
    return home


def _prompts(n: int) -> list[str]:
    return [t.prompt for t in generate_tasks(n, seed=5)]


def test_concurrent_calls_are_answered_in_batches_by_the_real_model(served_home, monkeypatch):
    path = served_home / "flywheel.json"
    path.write_text(json.dumps({"gateway": {"batch_window_ms": 200, "flush_interval_s": 3600, "max_tokens": 24}}))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))
    config = load_config(served_home)
    register_versions(config)
    gateway = Gateway(config)
    key, _ = gateway.keys.create("acme")
    app = create_app(gateway)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            return await asyncio.gather(*[
                client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": prompt}], "tools": TOOLS, "user": "same-user",
                    "max_tokens": 24}) for prompt in _prompts(8)])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert max(gateway.backend.batches) > 1 and sum(gateway.backend.batches) == 8  # micro-batched
    assert gateway.backend.cache.loads == 1  # one user, one version, loaded once
    for response in responses:
        choice = response.json()["choices"][0]
        message = choice["message"]
        assert message["role"] == "assistant" and "content" in message
        assert (choice["finish_reason"] == "tool_calls") == bool(message.get("tool_calls"))
        for call in message.get("tool_calls") or []:
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
        assert response.json()["usage"]["completion_tokens"] <= 24
    gateway.close()
    landed = [json.loads(line) for p in (served_home / "landing" / "trajectories").glob("*.jsonl")
              for line in p.read_text().splitlines()]
    finished = {r.headers["x-flywheel-trajectory-id"] for r in responses
                if r.json()["choices"][0]["finish_reason"] != "tool_calls"}
    assert finished <= {t["trajectory_id"] for t in landed}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_kill_9_loses_no_answered_conversation_and_a_restart_duplicates_none(served_home):
    config_path = served_home / "flywheel.json"
    config_path.write_text(json.dumps({"gateway": {"flush_interval_s": 0.3, "conversation_idle_s": 1.0,
                                                   "max_tokens": 16, "batch_window_ms": 0}}))
    config = load_config(served_home, str(config_path))
    register_versions(config)
    key, _ = KeyStore(served_home / "gateway" / "keys.json").create("acme")
    port = _free_port()
    answered: list[str] = []
    stop = threading.Event()

    def agents() -> None:  # one agent after another, each a fresh conversation, until stopped
        for n, prompt in enumerate(_prompts(10_000)):
            if stop.is_set():
                return
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                                      headers={"Authorization": f"Bearer {key}"},
                                      json={"messages": [{"role": "user", "content": prompt}], "user": f"u{n % 7}"})
            except httpx.HTTPError:
                time.sleep(0.05)  # the gateway is down: that call was never answered
                continue
            if response.status_code == 200:
                answered.append(response.headers["x-flywheel-trajectory-id"])

    server = start_serving(served_home, config_path, port, timeout_s=120)
    client = threading.Thread(target=agents)
    client.start()
    try:
        while len(answered) < 12:
            time.sleep(0.01)
        time.sleep(random.Random(1).uniform(0.0, 0.2))  # somewhere mid-request
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        before_kill = len(answered)
        server = start_serving(served_home, config_path, port, timeout_s=120)  # recovers the journal, lands what was due
        while len(answered) < before_kill + 8:
            time.sleep(0.01)
    finally:
        stop.set()
        client.join(timeout=30)
    time.sleep(2.5)  # past conversation_idle_s: conversations left on a tool call land too
    server.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -15 is a clean stop
    assert server.wait(timeout=60) in (0, -signal.SIGTERM), log_tail(served_home, port)

    lake = Lake(config)
    ingest_landing(config, lake, log=lambda _: None)
    stored = lake.read(TRAJECTORIES, columns=["trajectory_id"]).column("trajectory_id").to_pylist()
    assert len(stored) == len(set(stored))
    missing = set(answered) - set(stored)
    assert not missing, f"{len(missing)} answered conversations lost"
    # at most the one call in flight at the kill was journalled but never answered
    assert len(set(stored) - set(answered)) <= 1


def test_the_readme_agent_runs_with_the_openai_sdk_and_lands_with_its_feedback(served_home, capsys):
    """README's gateway example, verbatim but for the address and the key file, with the real
    `openai` SDK against a real uvicorn server: the conversation and its thumbs up reach the lake."""
    import re

    import uvicorn

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Gateway (`flywheel serve`)"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    # the tiny model may still be calling tools when the loop's 3 rounds end: then the conversation
    # lands at shutdown as it is, idle past conversation_idle_s
    config_path = served_home / "flywheel.json"
    config_path.write_text(json.dumps({"gateway": {"conversation_idle_s": 0.01}}))
    config = load_config(served_home, str(config_path))
    register_versions(config)
    key_file = served_home / "gateway" / "dev.key"
    key, _ = KeyStore(served_home / "gateway" / "keys.json").create("dev")
    key_file.write_text(key + "\n")
    port = _free_port()
    gateway = Gateway(config)
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        code = snippet.replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{port}/v1") \
                      .replace('"data/home/gateway/dev.key"', repr(str(key_file)))
        exec(compile(code, "README.md", "exec"), {})
    finally:
        server.should_exit = True
        thread.join(timeout=30)  # shutdown: the lifespan closes the gateway and lands what is due
    printed = capsys.readouterr().out
    assert "served by base-v0" in printed or "served by cycle-0001-lora" in printed
    lake = Lake(config)
    ingest_landing(config, lake, log=lambda _: None)
    trajectories = lake.read(TRAJECTORIES).to_pylist()
    events = lake.read(SESSION_EVENTS).to_pylist()
    assert [e["event_type"] for e in events] == ["thumbs_up"]
    assert [t["trajectory_id"] for t in trajectories] == [events[0]["trajectory_id"]]
    assert trajectories[0]["tenant_id"] == "dev" and trajectories[0]["user_id"] == "alice"
    assert printed.split("served by ")[1].strip() == trajectories[0]["model_version"]
