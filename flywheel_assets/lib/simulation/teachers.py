"""Cold-start data (seed 75.2): teacher-written synthetic trajectories and public trajectory files.

A teacher answers a task of the configured domain (lib/domains), and its answer is kept
only when the domain's checker accepts it. Offline, the oracle teacher writes the domain's
reference answer (`OracleTeacher`: the built-in world's scripted expert, whose tools run
for real; for BFCL its possible answers — an oracle, named so in `model_version`). Any
OpenAI-compatible endpoint can play the seed's GPT-4 teacher (FLYWHEEL_TEACHER_URL /
_MODEL / _API_KEY): for the built-in world it writes a whole conversation whose tool calls
are run again with the real tools; for any other domain it answers the real request with
the domain's tools in context, as a model would, and the checker grounds its calls.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from random import Random

from flywheel_assets.lib.config import TeacherEndpointConfig
from flywheel_assets.lib.domains import Domain
from flywheel_assets.lib.domains.builtin import BuiltinDomain
from flywheel_assets.lib.openai_compat import EndpointError, post_json, reply_json
from flywheel_assets.lib.simulation.hermes import to_hermes
from flywheel_assets.lib.simulation.tasks import ANSWERS, Task, verify
from flywheel_assets.lib.simulation.tools import TOOLS, run_tool

SYNTHETIC_REWARD = 0.8  # the seed's value: synthetic data is good, not perfect
TOOL_NAMES = frozenset(tool["function"]["name"] for tool in TOOLS)
TEACHER_PROMPT = """You write training data for a tool-using AI agent.
Solve the user's request below exactly as the agent should: call the tools it needs (only the
tools listed, with arguments matching their JSON schemas), one call per step, never guessing
what a tool can look up, then answer stating the tool's result exactly as it was returned.

Tools: {tools}
Task type: {task_type}
User request: {prompt}
Final answer in the style of (placeholders in braces): {style}

Reply with only a JSON object {{"messages": [...]}} holding the whole conversation in OpenAI chat
format: the user message; for each tool call an assistant message {{"role": "assistant",
"content": null, "tool_calls": [{{"id": "call_1", "type": "function", "function": {{"name": "...",
"arguments": "<arguments as a JSON string>"}}}}]}} followed by {{"role": "tool", "tool_call_id":
"call_1", "content": "<the tool's result>"}}; last, an assistant message with the final answer."""


class TeacherError(RuntimeError):
    """The teacher's endpoint could not be reached or refused the request."""


class Rejected(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def landing_line(task, messages: list[dict], model_version: str, domain: Domain | None = None) -> dict:
    """A synthetic trajectory as a landing-zone line: hermes like the golden file for the built-in
    world, OpenAI messages with the task's tools for any other domain."""
    line = {"trajectory_id": f"{model_version}-{_task_id(task)}", "origin": "synthetic", "is_synthetic": True,
            "reward": SYNTHETIC_REWARD, "model_version": model_version, "tenant_id": "default",
            "created_at": _now(), "completed": True}
    if domain is None or isinstance(domain, BuiltinDomain):
        return {**line, "task_type": task.task_type, "conversations": to_hermes(messages)}
    return {**line, "task_type": domain.task_type(task), "messages": messages, "tools": domain.tools_for(task)}


def _task_id(task) -> str:
    return getattr(task, "task_id", None) or task.id


class OracleTeacher:
    """The offline teacher: the domain's reference answer, right by construction."""

    def __init__(self, seed: int, domain: Domain | None = None):
        self.rng = Random(seed)
        self.domain = domain or BuiltinDomain()
        builtin = isinstance(self.domain, BuiltinDomain)
        self.model_version = "teacher-scripted" if builtin else f"teacher-oracle-{self.domain.name}"
        self.rejects: Counter[str] = Counter()

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    def trajectory(self, task) -> dict | None:
        messages = self.domain.reference_messages(task, self.rng)
        calls = [c for m in messages if m.get("role") == "assistant" for c in m.get("tool_calls") or []]
        if not self.domain.grade(task, calls, messages[-1].get("content")).success:
            self.rejects["reference_fails_check"] += 1  # BFCL has 4 such tasks: their truth contradicts their doc
            return None
        return landing_line(task, messages, self.model_version, self.domain)


ScriptedTeacher = OracleTeacher  # the built-in world's name for it


def grounded(task: Task, messages) -> list[dict]:
    """The teacher's conversation with real tool results, or Rejected when it does not solve the task."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise Rejected("malformed", "messages must be a non-empty list of objects")
    final = messages[-1]
    if final.get("role") != "assistant" or final.get("tool_calls") or not isinstance(final.get("content"), str) \
            or not final["content"].strip():
        raise Rejected("no_final_answer", "the last message must be the assistant's answer")
    rebuilt: list[dict] = [{"role": "user", "content": task.prompt}]
    results = []
    for message in messages[:-1]:
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            continue  # the teacher's own tool messages are replaced below; other text is not needed
        calls = []
        for number, call in enumerate(message["tool_calls"]):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or function.get("name") not in TOOL_NAMES:
                raise Rejected("unknown_tool", f"call to a tool that does not exist: {function}")
            arguments = function.get("arguments")
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
            call_id = str(call.get("id") or f"call_{len(results) + number}")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": function["name"], "arguments": arguments}})
        content = message.get("content") if isinstance(message.get("content"), str) else None
        rebuilt.append({"role": "assistant", "content": content, "tool_calls": calls})
        for call in calls:
            results.append(run_tool(call["function"]["name"], call["function"]["arguments"]))
            rebuilt.append({"role": "tool", "tool_call_id": call["id"], "content": results[-1]})
    if results != [run_tool(name, arguments) for name, arguments in task.calls]:
        raise Rejected("wrong_calls", "the tool calls do not produce the task's results")
    if not verify(task, final["content"]):
        raise Rejected("wrong_answer", f"final answer fails the verifier: {final['content'][:200]!r}")
    return rebuilt + [{"role": "assistant", "content": final["content"]}]


class OpenAITeacher:
    """A teacher behind any OpenAI-compatible /chat/completions endpoint (standard library only)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 60,
                 *, backoff_s: float = 1.0, temperature: float = 0.7, domain: Domain | None = None,
                 max_turns: int = 4):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher url must start with http:// or https://, got {url!r}")
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
        self.backoff_s, self.temperature = backoff_s, temperature
        self.model_version = f"teacher-{model}"
        self.rejects: Counter[str] = Counter()
        self.domain, self.max_turns = domain or BuiltinDomain(), max_turns

    @classmethod
    def from_config(cls, endpoint: TeacherEndpointConfig, domain: Domain | None = None) -> OpenAITeacher | None:
        """The configured endpoint (config.teacher: FLYWHEEL_TEACHER_URL / _MODEL / _API_KEY); None without a URL."""
        if not endpoint.url:
            return None
        return cls(endpoint.url, endpoint.model, endpoint.api_key or None, domain=domain)

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    def trajectory(self, task) -> dict | None:
        """A verified landing line, or None (counted in `rejects` by reason) when the teacher got it wrong."""
        if not isinstance(self.domain, BuiltinDomain):
            return self._answer(task)
        operation = json.loads(task.calls[0][1]).get("operation") if task.task_type == "text_ops" else None
        prompt = TEACHER_PROMPT.format(tools=json.dumps(TOOLS), task_type=task.task_type, prompt=task.prompt,
                                       style=ANSWERS[operation or task.task_type][0])
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "response_format": {"type": "json_object"}, "temperature": self.temperature}
        raw = self._post(body)
        try:
            messages = _reply_messages(raw)
            return landing_line(task, grounded(task, messages), self.model_version)
        except Rejected as rejection:
            self.rejects[rejection.code] += 1
            return None

    def _answer(self, task) -> dict | None:
        """The real request with the domain's tools, answered turn by turn as a model would (tools
        run by the domain where it runs them), then judged by the domain's checker."""
        messages, tools = self.domain.teacher_request(task)
        calls: list[dict] = []
        for _ in range(self.max_turns):
            body = {"model": self.model, "messages": messages, "temperature": self.temperature}
            if tools:
                body["tools"] = tools
            try:
                message = json.loads(self._post(body))["choices"][0]["message"]
                turn = [_function_call(c) for c in message.get("tool_calls") or []]
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                self.rejects["malformed"] += 1
                return None
            messages = [*messages, {"role": "assistant", "content": message.get("content"),
                                    **({"tool_calls": turn} if turn else {})}]
            calls += turn
            results = [self.domain.execute(task, c["function"]["name"], c["function"]["arguments"]) for c in turn]
            if not turn or any(result is None for result in results):
                break  # a final answer, or calls the domain does not run: they are the answer
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": r} for c, r in zip(turn, results)]
        final = messages[-1].get("content") if messages[-1].get("role") == "assistant" else None
        grade = self.domain.grade(task, calls, final)
        if not grade.success:
            self.rejects["fails_check"] += 1
            return None
        return landing_line(task, messages, self.model_version, self.domain)

    def _post(self, body: dict) -> bytes:
        try:
            return post_json(self.endpoint, body, api_key=self.api_key, timeout_s=self.timeout_s,
                             backoff_s=self.backoff_s)
        except EndpointError as error:
            raise TeacherError(f"teacher at {self.endpoint}: {error.reason}") from error


def _reply_messages(raw: bytes):
    try:
        return reply_json(raw)["messages"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise Rejected("malformed", f"reply is not a JSON object with messages ({error!r})") from error


def _function_call(call: dict) -> dict:
    function = call["function"]
    arguments = function.get("arguments")
    return {"id": str(call.get("id") or "call_0"), "type": "function",
            "function": {"name": str(function["name"]),
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def make_teacher(kind: str, seed: int, domain: Domain | None = None,
                 endpoint: TeacherEndpointConfig | None = None):
    """The configured teacher: "scripted" (offline: the domain's oracle) or "openai"
    (the `endpoint`: config.teacher, from FLYWHEEL_TEACHER_URL / _MODEL / _API_KEY)."""
    if kind in ("scripted", "oracle"):
        return OracleTeacher(seed, domain)
    if kind != "openai":
        raise ValueError(f"unknown teacher {kind!r}: use 'scripted' (alias 'oracle') or 'openai'")
    if endpoint is None or (teacher := OpenAITeacher.from_config(endpoint, domain)) is None:
        raise ValueError("the teacher is 'openai' but no endpoint is set (teacher.url, FLYWHEEL_TEACHER_URL)")
    return teacher


def cold_start_lines(n_synthetic: int, seed: int, teacher=None, domain: Domain | None = None) -> list[dict]:
    """Synthetic trajectories for n of the domain's cold-start tasks (the built-in world: its
    cold-start phrasings); rejected ones are left out."""
    domain = domain or getattr(teacher, "domain", None) or BuiltinDomain()
    teacher = teacher or OracleTeacher(seed, domain)
    return [line for task in domain.cold_start_tasks(n_synthetic, seed)
            if (line := teacher.trajectory(task)) is not None]


def _records(path: Path) -> Iterator[bytes]:
    """A JSON array file's elements, or a JSON-lines file's non-empty lines, as one line each."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            records = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError):
            records = None  # a JSON-lines file whose first line is an array
        if isinstance(records, list):
            yield from (json.dumps(record, ensure_ascii=False).encode() for record in records)
            return
    with path.open("rb") as handle:
        yield from (line.rstrip(b"\r\n") for line in handle if line.strip())


def _labelled(line: bytes) -> bytes:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return line  # copied as it is: the ingester quarantines it
    if not isinstance(record, dict):
        return line
    record.setdefault("origin", "imported")
    record.setdefault("is_synthetic", False)
    return json.dumps(record, ensure_ascii=False).encode()


def import_public_file(path: Path, landing: Path) -> Path:
    """Copy a public hermes/ShareGPT or OpenAI trajectory file (JSON lines or a JSON array) into the landing zone."""
    path = Path(path)
    name = re.sub(r"\.(jsonl|ndjson|json)$", "", path.name)
    target = Path(landing) / "trajectories" / f"imported-{name}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    with temporary.open("wb") as out:
        for line in _records(path):
            out.write(_labelled(line) + b"\n")
    temporary.replace(target)
    return target
