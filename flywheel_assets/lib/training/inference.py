"""The agent loop for the embedded model: generate, run the tool it calls, continue.

All prompts advance together: each round is one batched `generate` over the rows
still running, stopping at </tool_call> (run the tool, append its result) or <|end|>.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flywheel_assets.lib.training.chat_format import CALL_CLOSE, END, clean_answer, parse_call, tool_text
from flywheel_assets.lib.training.chat_template import prompt_ids


@dataclass
class AgentRun:
    prompt: str
    calls: list[tuple[str | None, dict | None, str]] = field(default_factory=list)  # name, arguments, result
    final_answer: str = ""
    finished: bool = False

    def messages(self) -> list[dict]:
        """OpenAI chat messages, as the logging client writes them."""
        messages: list[dict] = [{"role": "user", "content": self.prompt}]
        for index, (name, arguments, result) in enumerate(self.calls):
            messages.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{index}", "type": "function",
                "function": {"name": name or "", "arguments": json.dumps(arguments) if arguments is not None else "{"}}]})
            messages.append({"role": "tool", "tool_call_id": f"call_{index}", "content": result})
        messages.append({"role": "assistant", "content": self.final_answer})
        return messages


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def run_agent(model, tokenizer, prompts: list[str], run_tool: Callable[[str, dict | str], str], *,
              max_calls: int = 3, max_new_tokens: int = 40, temperature: float = 0.0, batch_size: int = 256,
              seed: int = 0, stats: GenerationStats | None = None) -> list[AgentRun]:
    runs = [AgentRun(prompt) for prompt in prompts]
    for start in range(0, len(runs), batch_size):
        _run_batch(model, tokenizer, runs[start:start + batch_size], run_tool, max_calls, max_new_tokens,
                   temperature, seed + start, stats)
    return runs


def _run_batch(model, tokenizer, runs, run_tool, max_calls, max_new_tokens, temperature, seed, stats):
    device = next(model.parameters()).device
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    contexts = [prompt_ids(tokenizer, [{"role": "user", "content": run.prompt}]) for run in runs]
    stop_ids = [tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids(CALL_CLOSE)]
    active = list(range(len(runs)))
    torch.manual_seed(seed)
    for _ in range(max_calls + 1):
        if not active:
            break
        width = max(len(contexts[i]) for i in active)
        ids = torch.full((len(active), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(active):
            ids[row, width - len(contexts[i]):] = torch.tensor(contexts[i])
            mask[row, width - len(contexts[i]):] = 1
        started = time.perf_counter()
        output = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
            eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
        )[:, width:].tolist()
        if stats is not None:
            stats.seconds += time.perf_counter() - started
        still = []
        for row, i in enumerate(active):
            generated = _until_stop(output[row], stop_ids, tokenizer.pad_token_id)
            if stats is not None:
                stats.new_tokens += len(generated)
            run = runs[i]
            text = tokenizer.decode(generated, skip_special_tokens=False)
            if generated and generated[-1] == stop_ids[1] and len(run.calls) < max_calls:
                name, arguments = parse_call(text)
                result = run_tool(name or "", arguments if arguments is not None else text)
                run.calls.append((name, arguments, result))
                contexts[i] = contexts[i] + generated + encode(tool_text(result))
                still.append(i)
            else:
                run.final_answer = clean_answer(text)
                run.finished = bool(generated) and generated[-1] == stop_ids[0]
        active = still


def _until_stop(tokens: list[int], stop_ids: list[int], pad_id: int) -> list[int]:
    kept = []
    for token in tokens:
        if token == pad_id:
            break
        kept.append(token)
        if token in stop_ids:
            break
    return kept
