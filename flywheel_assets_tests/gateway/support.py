"""What the gateway tests share: a registry with a champion and a canary, a scripted model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.gateway.backends import Completion
from flywheel_assets.lib.lake import Lake

CHAMPION, CANARY = "base-v0", "cycle-0001-lora"


def register_versions(config, base_path: str = "models/base", canary_share: float = 0.5) -> ModelRegistry:
    registry = ModelRegistry(Lake(config))
    registry.register(CHAMPION, base=CHAMPION, base_path=base_path, reason="test", actor="test")
    registry.register(CANARY, base=CHAMPION, base_path=base_path, parent=CHAMPION, reason="test", actor="test")
    registry.transition(CANARY, "canary", reason="test", actor="test", traffic_share=canary_share)
    return registry


class Scripted:
    """The model's side, scripted: each reply is a Completion, or a callable of the request."""

    name = "scripted"

    def __init__(self):
        self.replies: list = []
        self.requests: list[dict] = []
        self.delay_s = 0.0

    async def complete(self, version, messages, tools, *, max_tokens, temperature, tool_choice=None):
        self.requests.append({"version": version["version"], "messages": messages, "tools": tools,
                              "max_tokens": max_tokens, "temperature": temperature})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        reply = self.replies.pop(0) if self.replies else Completion(f"answer {len(self.requests)}", [], "stop", 5, 2)
        return reply(messages) if callable(reply) else reply

    def close(self):
        pass


def tool_call(name: str, arguments: dict, index: int = 0) -> dict:
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def landed_lines(home: Path, kind: str) -> list[dict]:
    folder = home / "landing" / kind
    return [json.loads(line) for path in sorted(folder.glob("gateway-*.jsonl")) for line in path.read_text().splitlines()] \
        if folder.exists() else []
