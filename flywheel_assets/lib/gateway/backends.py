"""What answers a chat call: the registry's versions in this process, or an upstream server.

*Embedded*: each version is loaded with transformers (base + its PEFT adapter, merged for
speed), at most `max_loaded_models` at once (the least recently used leaves). Requests
are micro-batched: a worker thread takes the first waiting request, waits up to
`batch_window_ms` for more of the same version and sampling settings (up to
`max_batch_size`), and answers them with one batched `generate` (`generate_turns`, the
chat-template path training and evaluation use). On 2 cores one batched call of n
prompts costs far less than n calls (bench_training: 3.6× at 16).

*Upstream*: the call goes to any OpenAI-compatible server, the version named by
`upstream.model_name` (`{version}` by default: an inference server started with LoRA
support serves each registry version's adapter under its own name).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flywheel_assets.lib.config import GatewayConfig, UpstreamConfig
from flywheel_assets.lib.training.chat_format import CALL_BLOCK


@dataclass
class Completion:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI tool_calls, arguments as JSON strings
    finish_reason: str = "stop"  # stop | length | tool_calls
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BackendError(RuntimeError):
    """The backend could not answer (an upstream failure): 502."""


@dataclass
class _Job:
    version: dict
    messages: list[dict]
    tools: list[dict] | None
    max_tokens: int
    temperature: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def group(self) -> tuple:
        return self.version["version"], self.max_tokens, self.temperature


class ModelCache:
    """(model, tokenizer) per version, loaded on first use, at most `bound` at once."""

    def __init__(self, home: Path, bound: int, load: Callable | None = None):
        self.home, self.bound = Path(home), bound
        self._load = load or _load_version
        self._models: OrderedDict[str, tuple] = OrderedDict()
        self.loads = 0

    def get(self, version: dict) -> tuple:
        name = version["version"]
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        while len(self._models) >= self.bound:
            self._models.popitem(last=False)
        self._models[name] = self._load(self.home, version)
        self.loads += 1
        return self._models[name]


def _load_version(home: Path, version: dict) -> tuple:
    from flywheel_assets.lib.training.pipeline import load_for_inference

    from flywheel_assets.lib.storage.artifacts import local

    adapter = local(home, version["adapter_path"]) if version.get("adapter_path") else None
    return load_for_inference(local(home, version["base_path"]), adapter, merged=True)


class EmbeddedBackend:
    name = "embedded"

    def __init__(self, home: Path, settings: GatewayConfig, load: Callable | None = None):
        self.settings = settings
        self.cache = ModelCache(home, settings.max_loaded_models, load)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._seeds = itertools.count()
        self.batches: list[int] = []  # sizes of the batches run (the benchmark and tests read them)
        self._worker = threading.Thread(target=self._serve, name="embedded-batcher", daemon=True)
        self._worker.start()

    async def complete(self, version: dict, messages: list[dict], tools: list[dict] | None, *,
                       max_tokens: int, temperature: float, tool_choice=None) -> Completion:
        # tool_choice: the model decides ("auto"); "none" arrives here as tools=None
        loop = asyncio.get_running_loop()
        job = _Job(version, messages, tools, max_tokens, temperature, loop.create_future(), loop)
        self._jobs.put(job)
        return await job.future

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=30)

    def _serve(self) -> None:
        held: list[_Job] = []  # taken from the queue for another group: they go first next time
        while True:
            first = held.pop(0) if held else self._jobs.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.settings.batch_window_ms / 1000
            for job in list(held):
                if job.group == first.group and len(batch) < self.settings.max_batch_size:
                    batch.append(job)
                    held.remove(job)
            while len(batch) < self.settings.max_batch_size:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                (batch if job.group == first.group else held).append(job)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        from flywheel_assets.lib.training.inference import Request, generate_turns

        live = [job for job in batch if not job.future.cancelled()]  # timed out while waiting
        if not live:
            return
        self.batches.append(len(live))
        first = live[0]
        try:
            model, tokenizer = self.cache.get(first.version)
            turns = generate_turns(model, tokenizer, [Request(j.messages, j.tools) for j in live],
                                   max_new_tokens=first.max_tokens, temperature=first.temperature,
                                   seed=next(self._seeds))
            outcomes = [(completion_of(turn), None) for turn in turns]
        except Exception as error:  # noqa: BLE001 — every waiter must hear of it, and the worker lives on
            outcomes = [(None, error)] * len(live)
        for job, (result, error) in zip(live, outcomes):
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # its event loop is closed: nobody waits any more
                pass


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def completion_of(turn) -> Completion:
    """A generated turn as an OpenAI answer: readable calls become tool_calls; a call the
    model wrote but nobody can parse stays in the text, as a model's mistake."""
    calls = [(name, arguments) for name, arguments in turn.calls if name and isinstance(arguments, dict)]
    if len(calls) < len(turn.calls):
        return Completion(turn.text or None, [], "stop" if turn.ended else "length", turn.prompt_tokens, turn.new_tokens)
    tool_calls = [{"id": f"call_{index}", "type": "function",
                   "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
                  for index, (name, arguments) in enumerate(calls)]
    if tool_calls:  # the content is what the model wrote beside its calls, never the calls' markup
        beside = CALL_BLOCK.sub("", turn.text or "").strip()
        return Completion(beside or None, tool_calls, "tool_calls", turn.prompt_tokens, turn.new_tokens)
    return Completion(turn.text, [], "stop" if turn.ended else "length", turn.prompt_tokens, turn.new_tokens)


class UpstreamBackend:
    name = "upstream"

    def __init__(self, settings: UpstreamConfig):
        import httpx

        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._client = httpx.AsyncClient(base_url=settings.base_url.rstrip("/"), headers=headers,
                                         timeout=settings.timeout_s)

    async def complete(self, version: dict, messages: list[dict], tools: list[dict] | None, *,
                       max_tokens: int, temperature: float, tool_choice=None) -> Completion:
        import httpx

        body = {"model": self.settings.model_name.format(version=version["version"]), "messages": messages,
                "max_tokens": max_tokens, "temperature": temperature, "stream": False}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        try:
            response = await self._client.post("/chat/completions", json=body)
        except httpx.HTTPError as error:
            raise BackendError(f"upstream unreachable: {type(error).__name__}: {error}") from error
        if response.status_code != 200:
            raise BackendError(f"upstream answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            reply = response.json()
            choice = reply["choices"][0]
            message = choice["message"]
            usage = reply.get("usage") or {}
            return Completion(message.get("content"), _tool_calls(message.get("tool_calls")),
                              choice.get("finish_reason") or "stop", int(usage.get("prompt_tokens") or 0),
                              int(usage.get("completion_tokens") or 0))
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise BackendError(f"upstream reply is not a chat completion: {response.text[:300]}") from error

    def close(self) -> None:
        try:
            asyncio.get_running_loop().create_task(self._client.aclose())
        except RuntimeError:
            asyncio.run(self._client.aclose())


def _tool_calls(calls) -> list[dict]:
    """An upstream's tool calls in OpenAI's exact shape: an id, type function, arguments a JSON string."""
    normal = []
    for index, call in enumerate(calls or []):
        function = call["function"]
        arguments = function.get("arguments")
        normal.append({"id": call.get("id") or f"call_{index}", "type": "function",
                       "function": {"name": function["name"], "arguments": arguments if isinstance(arguments, str)
                                    else json.dumps(arguments if arguments is not None else {})}})
    return normal


def make_backend(home: Path, settings: GatewayConfig):
    return UpstreamBackend(settings.upstream) if settings.upstream.base_url else EmbeddedBackend(home, settings)
