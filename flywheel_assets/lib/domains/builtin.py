"""The embedded default's task world as a domain: five task types over real Python tools.

Its split is not by hash: the held-out set is the fixed evaluation tasks (`tasks.eval_tasks`,
all 8 phrasings), and every training-side generator (`tasks.generate_tasks`) draws fresh
tasks while excluding those prompts, so training can use as many tasks as it wants and
never meets a held-out one. Its tools run (`execute`), so an answer is a whole agent run,
judged by the verifier on the final answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from flywheel_assets.lib.domains import CheckResult, Domain, Grade, call_parts
from flywheel_assets.lib.simulation import tasks as world
from flywheel_assets.lib.simulation.tools import TOOLS, run_tool


class BuiltinDomain(Domain):
    name = "builtin"

    def __init__(self, heldout_size: int = world.EVAL_SIZE):
        self.heldout_size = heldout_size

    def tasks(self) -> list[world.Task]:
        return self.heldout_tasks()

    def train_tasks(self) -> list[world.Task]:
        """An endless supply (user_tasks, cold_start_tasks): no fixed list to return."""
        raise NotImplementedError("the built-in domain draws training tasks fresh: use user_tasks or cold_start_tasks")

    def heldout_tasks(self, limit: int | None = None) -> list[world.Task]:
        return world.eval_tasks(min(limit, self.heldout_size) if limit is not None else self.heldout_size)

    def heldout_keys(self) -> frozenset[str]:
        return world.eval_prompt_keys()  # the same normalisation as prompt_key

    def messages_for(self, task: world.Task) -> list[dict]:
        return [{"role": "user", "content": task.prompt}]

    def task_type(self, task: world.Task) -> str:
        return task.task_type

    def tools_for(self, task: world.Task) -> list[dict]:
        return TOOLS

    def execute(self, task: world.Task, name: str, arguments) -> str:
        return run_tool(name or "", arguments)

    whole_numbers = world.MAX_NUMBER

    def vocabulary(self, seed: int, n: int = 2000) -> list[list[dict]]:
        rng = random.Random(seed)  # the order the embedded base was always built in: the same tokenizer
        return [world.expert_messages(task, rng) for task in world.generate_tasks(n, seed=seed)]

    def user_tasks(self, n: int, seed: int) -> list[world.Task]:
        seed += seed == world.EVAL_SEED  # that seed alone would draw the evaluation prompts themselves
        pool = world.generate_tasks(n, seed=seed)
        random.Random(seed).shuffle(pool)  # generate_tasks cycles task types; a session should not
        return pool

    def cold_start_tasks(self, n: int, seed: int) -> list[world.Task]:
        return world.generate_tasks(n, seed, phrasings=range(world.COLD_START_PHRASINGS))

    def task_for(self, messages: Sequence[dict], task_id: str) -> world.Task | None:
        prompt = next((m.get("content") for m in messages if m.get("role") == "user"), None)
        return world.task_from_prompt(prompt, task_id=task_id) if isinstance(prompt, str) else None

    def check(self, task: world.Task, tool_calls: Sequence[dict]) -> CheckResult:
        """The calls alone (the final answer is judged by `grade`): the task's calls, in order."""
        expected = [(name, _normalise(json.loads(arguments))) for name, arguments in task.calls]
        actual = [(name, _normalise(arguments) if isinstance(arguments, dict) else None)
                  for name, arguments in map(call_parts, tool_calls)]
        return CheckResult(expected == actual, "ok" if expected == actual else "wrong tool calls")

    def grade(self, task: world.Task, tool_calls: Sequence[dict], final_answer: str | None) -> Grade:
        """Success: the verifier accepts the final answer. Tool names: exactly the right tools in
        order. Arguments: names and arguments all right (values normalised as the verifier does)."""
        names_right = [name for name, _ in task.calls] == [call_parts(c)[0] for c in tool_calls]
        success = world.verify(task, final_answer)
        return Grade(success, names_right, names_right and self.check(task, tool_calls).ok,
                     "ok" if success else "final answer fails the verifier")

    def user_verdict(self, task: world.Task, tool_calls: Sequence[dict], final_answer: str | None,
                     near_miss_similarity: float = 0.6) -> tuple[str, float]:
        from flywheel_assets.lib.simulation.users import judge_answer
        return judge_answer(task, final_answer, near_miss_similarity)

    def reference_answer(self, task: world.Task) -> list[dict]:
        return [{"name": name, "arguments": json.loads(arguments)} for name, arguments in task.calls]

    def reference_messages(self, task: world.Task, rng: random.Random) -> list[dict]:
        return world.expert_messages(task, rng)


def _normalise(arguments: dict) -> dict:
    return {str(k).lower(): " ".join(world.units(str(v))) for k, v in arguments.items()}
