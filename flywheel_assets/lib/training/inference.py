"""The agent loop for any model: generate, run the tools it calls, continue.

All conversations advance together: each round is one batched `generate` over the rows
still running. How a turn ends and how its calls are read depends on the model's format
(`Dialect`): the embedded model stops at </tool_call> (one call, run at once) or <|end|>;
a chat-template model (ChatML, …) writes its whole turn up to its end-of-turn token, with
any number of Hermes `<tool_call>` blocks in it. Where the domain runs tools, their
results are appended and the run goes on; where it does not (`execute` returns None),
the calls of the first turn are the answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from flywheel_assets.lib.training.chat_format import (
    CALL_BLOCK, CALL_CLOSE, END, USER, clean_answer, parse_call, tool_text,
)
from flywheel_assets.lib.training.chat_template import parse_tool_calls, prompt_ids

# execute(row, tool name, arguments (a dict, or the raw text when unparseable)) → result, or None: not run
Execute = Callable[[int, str, "dict | str"], "str | None"]


@dataclass
class AgentRun:
    prompt: str  # the last user message, as logged in `user_prompt`
    calls: list[tuple[str | None, dict | None, str | None]] = field(default_factory=list)  # name, arguments, result
    final_answer: str = ""
    finished: bool = False
    request: list[dict] | None = None  # the messages the model was given (None: just the prompt)
    turn_of_call: list[int] = field(default_factory=list)  # which assistant turn made each call

    def tool_calls(self) -> list[dict]:
        """Every call as an OpenAI tool call (arguments a JSON string), in order."""
        return [_openai_call(index, name, arguments) for index, (name, arguments, _) in enumerate(self.calls)]

    def messages(self) -> list[dict]:
        """OpenAI chat messages, as the logging client writes them."""
        messages: list[dict] = list(self.request) if self.request else [{"role": "user", "content": self.prompt}]
        turns = self.turn_of_call or list(range(len(self.calls)))
        answered_by_calls = bool(self.calls) and self.calls[-1][2] is None
        for turn in sorted(set(turns)):
            indices = [i for i, t in enumerate(turns) if t == turn]
            # where the calls are the answer, the text written beside them belongs to that turn
            content = (self.final_answer or None) if answered_by_calls and turn == turns[-1] else None
            messages.append({"role": "assistant", "content": content, "tool_calls": [
                _openai_call(i, self.calls[i][0], self.calls[i][1]) for i in indices]})
            messages += [{"role": "tool", "tool_call_id": f"call_{i}", "content": self.calls[i][2]}
                         for i in indices if self.calls[i][2] is not None]
        if not answered_by_calls:
            messages.append({"role": "assistant", "content": self.final_answer})
        return messages


def _openai_call(index: int, name: str | None, arguments) -> dict:
    text = json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, dict) else "{"
    return {"id": f"call_{index}", "type": "function", "function": {"name": name or "", "arguments": text}}


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Dialect:
    stop_ids: tuple[int, ...]
    embedded: bool  # one call per turn, stopped at </tool_call>; else whole turns with Hermes blocks

    @classmethod
    def of(cls, tokenizer) -> Dialect:
        if USER in tokenizer.get_vocab():
            return cls((tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids(CALL_CLOSE)), True)
        stops = {tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):  # templates whose turn end is not the eos
            if (token_id := tokenizer.get_vocab().get(token)) is not None:
                stops.add(token_id)
        return cls(tuple(sorted(i for i in stops if i is not None)), False)

    def read(self, tokenizer, generated: list[int]) -> tuple[list[tuple[str | None, dict | str | None]], str, bool]:
        """(calls as (name, arguments), the text outside them, whether the turn ended properly)."""
        text = tokenizer.decode(generated, skip_special_tokens=False)
        ended = bool(generated) and generated[-1] in self.stop_ids
        if self.embedded:
            if ended and generated[-1] == self.stop_ids[1]:
                name, arguments = parse_call(text)
                return [(name, arguments if arguments is not None else text)], clean_answer(text), False
            return [], clean_answer(text), ended
        for token_id in self.stop_ids:
            text = text.replace(tokenizer.convert_ids_to_tokens(token_id), "")
        calls = []
        for call in parse_tool_calls(text):
            arguments = call["function"]["arguments"]
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = None
            calls.append((call["function"]["name"], parsed if isinstance(parsed, dict) else arguments))
        if "<tool_call>" in text and not calls:
            calls.append((None, text))  # it tried to call and wrote something unreadable: a failed call
        return calls, CALL_BLOCK.sub("", text).strip(), ended


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    tools: list[dict] | None = None


@torch.no_grad()
def run_requests(model, tokenizer, requests: Sequence[Request], execute: Execute, *, max_calls: int = 3,
                 max_new_tokens: int = 40, temperature: float = 0.0, batch_size: int = 256, seed: int = 0,
                 stats: GenerationStats | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[AgentRun]:
    """Every request's agent run; `progress(done, total)` after each batch."""
    runs = [AgentRun(_last_user(r.messages), request=list(r.messages)) for r in requests]
    order = list(range(len(runs)))
    if temperature == 0:  # greedy: a batch of like lengths pads less (BFCL prompts run 200 to 1,000 tokens)
        order.sort(key=lambda i: len(json.dumps(requests[i].messages)) + len(json.dumps(requests[i].tools or [])))
    for start in range(0, len(runs), batch_size):
        rows = order[start:start + batch_size]
        _run_batch(model, tokenizer, [runs[i] for i in rows], [requests[i] for i in rows],
                   lambda row, name, arguments, rows=rows: execute(rows[row], name, arguments),
                   max_calls, max_new_tokens, temperature, seed + start, stats)
        if progress is not None:
            progress(min(start + batch_size, len(runs)), len(runs))
    return runs


def run_agent(model, tokenizer, prompts: list[str], run_tool: Callable[[str, dict | str], str], **kwargs) -> list[AgentRun]:
    """run_requests for plain user prompts and one tool runner shared by all (the built-in domain)."""
    runs = run_requests(model, tokenizer, [Request([{"role": "user", "content": p}]) for p in prompts],
                        lambda row, name, arguments: run_tool(name or "", arguments), **kwargs)
    for run in runs:
        run.request = None  # logged as the prompt alone, as before
    return runs


def _last_user(messages: Sequence[dict]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


def _run_batch(model, tokenizer, runs, requests, execute, max_calls, max_new_tokens, temperature, seed, stats):
    dialect = Dialect.of(tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    conversations = [list(r.messages) for r in requests]
    contexts = [prompt_ids(tokenizer, conversation, r.tools) for conversation, r in zip(conversations, requests)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else dialect.stop_ids[0]
    active = list(range(len(runs)))
    torch.manual_seed(seed)
    for turn in range(max_calls + 1):
        if not active:
            break
        outputs = _generate(model, dialect, [contexts[i] for i in active], pad_id, max_new_tokens, temperature, stats)
        still = []
        for row, i in enumerate(active):
            generated = outputs[row]
            if stats is not None:
                stats.new_tokens += len(generated)
            run = runs[i]
            calls, text, ended = dialect.read(tokenizer, generated)
            if not calls or len(run.calls) >= max_calls:
                run.final_answer, run.finished = text, ended
                continue
            results = [execute(i, name or "", arguments) for name, arguments in calls]
            for (name, arguments), result in zip(calls, results):
                run.calls.append((name, arguments if isinstance(arguments, dict) else None, result))
                run.turn_of_call.append(turn)
            if any(result is None for result in results):  # the domain runs no tools: the calls are the answer
                run.final_answer, run.finished = text, ended
                continue
            if dialect.embedded:
                contexts[i] = contexts[i] + generated + encode(tool_text(results[0]))
            else:
                conversations[i] = run.messages()[:-1]  # less the (still empty) final answer
                contexts[i] = prompt_ids(tokenizer, conversations[i], requests[i].tools)
            still.append(i)
        active = still


@dataclass
class Turn:
    """One assistant turn a model wrote: its calls as (name, arguments), the text outside them."""

    calls: list[tuple[str | None, dict | str | None]]
    text: str
    ended: bool  # it wrote its end-of-turn (or a call's end) rather than running out of tokens
    prompt_tokens: int
    new_tokens: int


@torch.no_grad()
def generate_turns(model, tokenizer, requests: Sequence[Request], *, max_new_tokens: int = 40,
                   temperature: float = 0.0, seed: int = 0) -> list[Turn]:
    """The next assistant turn of each request, in one batched `generate`: a serving
    step, where the client runs the tools (the agent loop above runs them itself)."""
    dialect = Dialect.of(tokenizer)
    contexts = [prompt_ids(tokenizer, list(r.messages), r.tools) for r in requests]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else dialect.stop_ids[0]
    torch.manual_seed(seed)
    turns = []
    for context, generated in zip(contexts, _generate(model, dialect, contexts, pad_id, max_new_tokens, temperature)):
        calls, text, ended = dialect.read(tokenizer, generated)
        turns.append(Turn(calls, text, ended or bool(calls), len(context), len(generated)))
    return turns


def _generate(model, dialect: Dialect, contexts: list[list[int]], pad_id: int, max_new_tokens: int,
              temperature: float, stats: GenerationStats | None = None) -> list[list[int]]:
    """Each context's continuation through its stop token: left-padded rows, one generate."""
    width = max(len(context) for context in contexts)
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, context in enumerate(contexts):
        ids[row, width - len(context):] = torch.tensor(context)
        mask[row, width - len(context):] = 1
    device = next(model.parameters()).device
    started = time.perf_counter()
    output = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
        eos_token_id=list(dialect.stop_ids), pad_token_id=pad_id,
    )[:, width:].tolist()
    if stats is not None:
        stats.seconds += time.perf_counter() - started
    return [_until_stop(row, dialect.stop_ids, pad_id) for row in output]


def _until_stop(tokens: list[int], stop_ids: Sequence[int], pad_id: int) -> list[int]:
    kept = []
    for token in tokens:
        if token in stop_ids:
            kept.append(token)
            break
        if token == pad_id:
            break
        kept.append(token)
    return kept
