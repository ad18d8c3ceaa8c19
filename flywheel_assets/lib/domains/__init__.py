"""A domain: the tools a model may call, the tasks it is asked, and how an answer is judged.

Training, evaluation and feedback see a domain only through `Domain`, so the built-in
task world, BFCL (`domains.bfcl`) and a user's own tasks are interchangeable.

A tool call is `{"name": str, "arguments": dict | str}` (a JSON string, as OpenAI sends
it, or an already parsed object), the same shape the chat format renders.

Tasks are split into train and held-out by task id, never by sample: every sample of a
held-out task stays out of training. The split hashes `seed:task_id`, so a task's side
never changes when tasks are added or reordered (a task once held out cannot leak into a
later cycle's training set); the price is that the held-out share is the fraction only
in expectation.
"""

from __future__ import annotations

import hashlib
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

    def train_tasks(self) -> list[Task]:
        return split_by_id(self.tasks(), seed=self.seed, fraction=self.heldout_fraction)[0]

    def heldout_tasks(self) -> list[Task]:
        return split_by_id(self.tasks(), seed=self.seed, fraction=self.heldout_fraction)[1]
