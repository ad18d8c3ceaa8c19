"""Demo mode's simulated users through the gateway's door (`simulation.via_gateway`).

Each attempt is what a real agent does: OpenAI chat calls over HTTP, the tools the model
calls run here and their results sent back, until the model answers; the gateway routes
the user, serves, and logs the conversation as one trajectory. The user's reactions are
`/v1/feedback` calls (accepted, edited, error, continued); a retry is the same
conversation sent again, which the gateway records as `retry_requested` itself. The
calls carry the simulated moment (`x-flywheel-time`; the gateway honours it with
`gateway.trust_client_time`), so the A/B test reads the same days as in-process.

Keys: one per simulated tenant, made once and kept in
FLYWHEEL_HOME/gateway/simulation-keys.json (mode 600) beside the gateway's key store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from flywheel_assets.lib.training.inference import AgentRun

# the simulated user's events → /v1/feedback types; retry_requested is the re-sent conversation
FEEDBACK_TYPES = {"output_accepted": "accepted", "output_edited": "edited", "error_reported": "error",
                  "session_continued": "continued"}


@dataclass
class Job:
    messages: list[dict]
    tools: list[dict] | None
    user: str
    tenant: str
    session_id: str
    task_type: str
    at: datetime
    execute: Callable[[str, dict | str], str | None]


@dataclass
class Answer:
    run: AgentRun
    trajectory_id: str
    version: str


class GatewayDoor:
    def __init__(self, client, keys: dict[str, str], workers: int = 32):
        """client: an httpx.Client whose base URL is the gateway's (Starlette's TestClient is one)."""
        self.client, self.keys, self.workers = client, keys, workers

    @classmethod
    def connect(cls, base_url: str, home: Path, tenants: list[str]) -> GatewayDoor:
        import httpx

        return cls(httpx.Client(base_url=base_url.rstrip("/"), timeout=600), simulation_keys(home, tenants))

    def run(self, jobs: list[Job], *, max_calls: int = 3, max_new_tokens: int = 40,
            temperature: float = 0.0) -> list[Answer]:
        """Every job's agent loop, concurrently: the gateway batches what arrives together."""
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(jobs)))) as pool:
            return list(pool.map(lambda job: self._loop(job, max_calls, max_new_tokens, temperature), jobs))

    def close(self) -> None:
        self.client.close()

    def feedback(self, tenant: str, trajectory_id: str, event_type: str, data: dict, at: datetime) -> None:
        kind = FEEDBACK_TYPES[event_type]
        body = {"trajectory_id": trajectory_id, "type": kind}
        if kind == "edited":
            body["edited_text"] = str(data.get("edited_answer") or "")
        self._post("/v1/feedback", tenant, body, at)

    def _loop(self, job: Job, max_calls: int, max_new_tokens: int, temperature: float) -> Answer:
        run = AgentRun(_last_user(job.messages), request=list(job.messages))
        conversation = list(job.messages)
        headers: dict = {}
        for turn in range(max_calls + 1):
            reply, headers = self._post("/v1/chat/completions", job.tenant, {
                "messages": conversation, "tools": job.tools, "user": job.user, "max_tokens": max_new_tokens,
                "temperature": temperature}, job.at, {"x-flywheel-session": job.session_id,
                                                      "x-flywheel-task-type": job.task_type})
            choice = reply["choices"][0]
            message = choice["message"]
            calls = message.get("tool_calls") or []
            if not calls or len(run.calls) >= max_calls:
                run.final_answer, run.finished = message.get("content") or "", choice["finish_reason"] == "stop"
                break
            parsed = [(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in calls]
            results = [job.execute(name, arguments) for name, arguments in parsed]
            for (name, arguments), result in zip(parsed, results):
                run.calls.append((name, arguments if isinstance(arguments, dict) else None, result))
                run.turn_of_call.append(turn)
            if any(result is None for result in results):  # the domain runs no tools: the calls are the answer
                run.final_answer, run.finished = message.get("content") or "", True
                break
            conversation += [message, *({"role": "tool", "tool_call_id": c["id"], "content": r}
                                        for c, r in zip(calls, results))]
        return Answer(run, headers["x-flywheel-trajectory-id"], headers["x-flywheel-model-version"])

    def _post(self, path: str, tenant: str, body: dict, at: datetime, extra: dict | None = None):
        headers = {"Authorization": f"Bearer {self.keys[tenant]}", "x-flywheel-time": at.isoformat(), **(extra or {})}
        response = self.client.post(path, json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"gateway {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json(), response.headers


def simulation_keys(home: Path, tenants: list[str]) -> dict[str, str]:
    """The simulated tenants' API keys, made once (the gateway stores only their hashes)."""
    from flywheel_assets.lib.gateway.keys import KeyStore, write_private

    path = Path(home) / "gateway" / "simulation-keys.json"
    keys = json.loads(path.read_text()) if path.exists() else {}
    store = KeyStore(Path(home) / "gateway" / "keys.json")
    missing = [t for t in tenants if t not in keys or store.tenant_of(keys[t]) != t]
    if missing:
        for tenant in missing:
            keys[tenant], _ = store.create(tenant)
        write_private(path, json.dumps(keys, indent=1))
    return keys


def _last_user(messages: list[dict]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


def _arguments(text):
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text
