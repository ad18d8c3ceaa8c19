"""A domain: the tools a model may call, the tasks it is asked, and how an answer is judged.

Training, evaluation and feedback see a domain only through `Domain`, so the built-in
task world (`domains.builtin`), BFCL (`domains.bfcl`) and a user's own tasks are
interchangeable; `load_domain` picks the configured one (config `domain`, docs/domains.md).

A model's answer to a task is an agent run: it may call tools and, where the domain
executes them (`execute`), read their results and go on; where it does not (BFCL), the
calls of its first turn are the answer.

A tool call is `{"name": str, "arguments": dict | str}` (a JSON string, as OpenAI sends
it, or an already parsed object), the same shape the chat format renders.

Tasks are split into train and held-out by task id, never by sample: every sample of a
held-out task stays out of training, and so does every task asking a held-out task's
question under another id. The split hashes `seed:task_id`, so a task's side
never changes when tasks are added or reordered (a task once held out cannot leak into a
later cycle's training set); the price is that the held-out share is the fraction only
in expectation.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

DEFAULT_HELDOUT_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


class Task(Protocol):
    """What every domain's task has: a stable id and the conversation the model is given."""

    id: str
    messages: list[dict]


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str  # why it failed, or "ok"; meant for a person reading an evaluation report


@dataclass(frozen=True)
class Grade:
    """One evaluated answer: the domain's verdict, and the two diagnostics the gate reports."""

    success: bool
    tool_names_right: bool  # the reference's tool names were called (in order where order matters)
    arguments_right: bool  # ... with the reference's arguments
    reason: str = "ok"


CORRECT, NEAR_MISS, WRONG = "correct", "near_miss", "wrong"


def prompt_key(messages: Sequence[dict] | str) -> str:
    """A conversation's request as one comparable string: its user turns, lowercased, spacing
    collapsed. Held-out leaks and teacher look-ups compare requests by it."""
    if isinstance(messages, str):
        text = messages
    else:
        text = "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "user")
    return " ".join(text.lower().split())


def call_parts(call: dict) -> tuple[str, object]:
    """(name, arguments) of a tool call in OpenAI's nesting or flat; arguments parsed when JSON."""
    function = call.get("function", call) if isinstance(call, dict) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return str(function.get("name") or ""), arguments


def is_heldout(task_id: str, *, seed: int, fraction: float) -> bool:
    """Whether a task id falls on the held-out side; a pure function of (seed, id)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be within [0, 1], got {fraction}")
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_by_id(tasks: Iterable[Task], *, seed: int, fraction: float) -> tuple[list[Task], list[Task]]:
    """(train, held_out), each in the input order."""
    train: list[Task] = []
    heldout: list[Task] = []
    for task in tasks:
        (heldout if is_heldout(task.id, seed=seed, fraction=fraction) else train).append(task)
    return train, heldout


class Domain(ABC):
    """Tools + tasks + checker + the oracle teacher's answer.

    Subclasses provide `tasks()` and the four per-task methods; the split comes for free
    and is governed by `seed` and `heldout_fraction`.
    """

    name: str
    seed: int = DEFAULT_SPLIT_SEED
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION

    @abstractmethod
    def tasks(self) -> Sequence[Task]:
        """Every task of the domain, in a stable order."""

    @abstractmethod
    def tools_for(self, task: Task) -> list[dict]:
        """The OpenAI tool schemas (`{"type": "function", "function": {...}}`) offered for the task."""

    @abstractmethod
    def check(self, task: Task, tool_calls: Sequence[dict]) -> CheckResult:
        """Judge the model's tool calls for the task."""

    @abstractmethod
    def reference_answer(self, task: Task) -> list[dict]:
        """A correct list of tool calls; what an oracle teacher would answer."""

    # ---- the split -----------------------------------------------------------------
    def train_tasks(self) -> list[Task]:
        """The training side, less any task asking a held-out task's question (BFCL repeats 118
        questions under other ids and functions: the question, not the id, must not leak)."""
        train = split_by_id(self.tasks(), seed=self.seed, fraction=self.heldout_fraction)[0]
        heldout = self.heldout_keys()
        return [task for task in train if prompt_key(self.messages_for(task)) not in heldout]

    def heldout_tasks(self, limit: int | None = None) -> list[Task]:
        """The held-out tasks, the first `limit` of them when given (a stable subset)."""
        heldout = split_by_id(self.tasks(), seed=self.seed, fraction=self.heldout_fraction)[1]
        return heldout if limit is None else heldout[:limit]

    def heldout_keys(self) -> frozenset[str]:
        """prompt_key of every held-out task: no training row may ask one of them."""
        return frozenset(prompt_key(self.messages_for(task)) for task in self.heldout_tasks())

    # ---- asking ----------------------------------------------------------------------
    def messages_for(self, task: Task) -> list[dict]:
        """The conversation the model is given (system and user turns)."""
        return list(task.messages)

    def task_type(self, task: Task) -> str:
        """The scope a task is reported under (evaluation by type, balanced corrections)."""
        return getattr(task, "category", None) or self.name

    def execute(self, task: Task, name: str, arguments) -> str | None:
        """A tool's result, or None where the domain does not run tools: then the calls of the
        model's first turn are its whole answer."""
        return None

    # The embedded model's tokenizer sees every integer 0..whole_numbers as a word of its own
    # (-1: none), so a number the model copies from a prompt is one token.
    whole_numbers: int = -1

    def vocabulary(self, seed: int, n: int = 2000) -> list[list[dict]]:
        """Conversations in the domain's own wording for the embedded model's tokenizer: the
        reference answers to n training-side tasks (never an evaluation prompt)."""
        rng = random.Random(seed)
        return [self.reference_messages(task, rng) for task in self.user_tasks(n, seed)]

    def user_tasks(self, n: int, seed: int) -> list[Task]:
        """n requests simulated users ask (training side only), drawn with replacement."""
        pool = self.train_tasks()
        rng = random.Random(seed)
        return [rng.choice(pool) for _ in range(n)] if pool else []

    def cold_start_tasks(self, n: int, seed: int) -> list[Task]:
        """The tasks a teacher solves before any usage: n distinct training tasks."""
        pool = list(self.train_tasks())
        random.Random(seed).shuffle(pool)
        return pool[:n]

    def task_for(self, messages: Sequence[dict], task_id: str) -> Task | None:
        """The domain's task a logged request asks (a teacher works from it), or None."""
        return self._by_key().get(prompt_key(messages))

    def _by_key(self) -> dict[str, Task]:
        if getattr(self, "_key_index", None) is None:
            self._key_index = {prompt_key(self.messages_for(t)): t for t in self.train_tasks()}
        return self._key_index

    # ---- judging ---------------------------------------------------------------------
    def grade(self, task: Task, tool_calls: Sequence[dict], final_answer: str | None) -> Grade:
        """The domain's verdict on an answer, with tool-name and argument diagnostics against
        the reference answer (names compared as a multiset: parallel calls have no order)."""
        verdict = self.check(task, tool_calls)
        reference = sorted(call_parts(c)[0] for c in self.reference_answer(task))
        names_right = sorted(call_parts(c)[0] for c in tool_calls) == reference
        return Grade(verdict.ok, names_right or verdict.ok, verdict.ok, verdict.reason)

    def user_verdict(self, task: Task, tool_calls: Sequence[dict], final_answer: str | None,
                     near_miss_similarity: float = 0.6) -> tuple[str, float]:
        """How a simulated user who knows the answer sees it: (CORRECT | NEAR_MISS | WRONG,
        similarity to the right answer). No near misses by default: a user cannot edit tool calls."""
        ok = self.check(task, tool_calls).ok
        return (CORRECT, 1.0) if ok else (WRONG, 0.0)

    # ---- teaching --------------------------------------------------------------------
    def reference_messages(self, task: Task, rng: random.Random) -> list[dict]:
        """A correct conversation for the task (the oracle teacher's): the request, then the
        reference calls (results where the domain runs tools, and a final answer after them)."""
        calls = [{"id": f"call_{rng.getrandbits(32):08x}", "type": "function",
                  "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
                 for name, arguments in map(call_parts, self.reference_answer(task))]
        return [*self.messages_for(task), {"role": "assistant", "content": None, "tool_calls": calls}]

    def teacher_request(self, task: Task) -> tuple[list[dict], list[dict]]:
        """What an LLM teacher is sent: the real request and the tools, as the model sees them."""
        return self.messages_for(task), self.tools_for(task)


def load_domain(settings) -> Domain:
    """The configured domain (config.domain): `builtin`, `bfcl`, or `package.module:factory` — a
    callable taking the settings' `options` dict and returning a Domain."""
    name = settings.name
    if name == "builtin":
        from flywheel_assets.lib.domains.builtin import BuiltinDomain
        return BuiltinDomain(heldout_size=settings.heldout_tasks)
    if name == "bfcl":
        from flywheel_assets.lib.domains.bfcl import BFCLDomain
        return BFCLDomain.from_dir(settings.data_dir, settings.categories, seed=settings.split_seed,
                                   heldout_fraction=settings.heldout_fraction)
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"domain.name must be 'builtin', 'bfcl' or 'package.module:factory', got {name!r}")
    domain = getattr(importlib.import_module(module), attribute)(dict(settings.options))
    if not isinstance(domain, Domain):
        raise TypeError(f"{name} returned {type(domain).__name__}, not a flywheel_assets.lib.domains.Domain")
    return domain
