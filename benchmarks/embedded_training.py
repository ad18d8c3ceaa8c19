"""The embedded model's arms for bench_training.py: the setup as the product builds it, our
LoRA step (A, A′, A₀) against plain-torch references (B, B₀), the interleaved step timing,
and batched generation. See bench_training.py's docstring for what each arm is."""

from __future__ import annotations

import ctypes
import gc
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ResourceSampler, batches  # noqa: E402  (benchmarks/ is on sys.path)
from flywheel_assets.lib.config import FlywheelConfig  # noqa: E402
from flywheel_assets.lib.domains.builtin import BuiltinDomain  # noqa: E402
from flywheel_assets.lib.simulation.tasks import (  # noqa: E402
    COLD_START_PHRASINGS, eval_tasks, expert_messages, generate_tasks,
)
from flywheel_assets.lib.simulation.tools import run_tool  # noqa: E402
from flywheel_assets.lib.training import model as model_lib  # noqa: E402
from flywheel_assets.lib.training.chat_format import IGNORE  # noqa: E402
from flywheel_assets.lib.training.effective_weight import effective_weight_forward  # noqa: E402
from flywheel_assets.lib.training.examples import collate, encode_all, weighted_nll  # noqa: E402
from flywheel_assets.lib.training.inference import GenerationStats, run_agent  # noqa: E402
from flywheel_assets.lib.training.pipeline import domain_corpus  # noqa: E402
from flywheel_assets.lib.training.tokenizer import train_tokenizer  # noqa: E402
from flywheel_assets.lib.training.trainer import attach_lora, forward_logprobs, pretrain, train_lora  # noqa: E402

COLD_START_TASKS = 1500
COLD_START_SEED = 11
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
ARMS = {"A": "ours: peft LoRA, default targets", "B": "plain torch: full AdamW, cross_entropy at loss positions",
        "A′": "ours without embed_tokens/lm_head LoRA"}
INTERLEAVED_ARMS = ARMS | {"B₀": "plain torch, logits at every position",
                           "A₀": "ours with peft's forward (adapter beside the layer)"}


def release_memory() -> None:
    """Hand freed heap back to the OS before an arm, so that an arm's RSS increase is not
    hidden by pages an earlier arm left mapped (glibc only; elsewhere a no-op)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_setup(config: FlywheelConfig, out_dir: Path, pretrain_steps: int) -> dict:
    """Tokenizer, model and examples exactly as `pipeline.train_base` makes them; saved to out_dir."""
    teacher_rng = random.Random(COLD_START_SEED)  # simulation.teachers.ScriptedTeacher
    tasks = generate_tasks(COLD_START_TASKS, seed=COLD_START_SEED, phrasings=range(COLD_START_PHRASINGS))
    messages = [expert_messages(task, teacher_rng) for task in tasks]
    started = time.perf_counter()
    tokenizer = train_tokenizer(domain_corpus(messages, BuiltinDomain()), whole_numbers=BuiltinDomain.whole_numbers)
    tokenizer_s = time.perf_counter() - started
    settings = config.base_model
    examples = [e for e in encode_all(tokenizer, [(m, 1.0, None) for m in messages], settings.max_length)[0] if e]
    model = model_lib.build_model(len(tokenizer), settings, tokenizer.pad_token_id, tokenizer.eos_token_id)
    pretrain_s = 0.0
    if pretrain_steps:
        result = pretrain(model.to(model_lib.pick_device()), examples, steps=pretrain_steps,
                          batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                          pad_id=tokenizer.pad_token_id, seed=settings.seed)
        pretrain_s = result.seconds
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    lengths = [len(e.input_ids) for e in examples]
    return {"examples": examples, "pad_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer),
            "parameters": model_lib.count_parameters(model), "tokenizer_s": tokenizer_s,
            "pretrain_steps": pretrain_steps, "pretrain_s": pretrain_s,
            "mean_example_tokens": sum(lengths) / len(lengths)}


def plain_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy with the output layer applied at the positions whose next
    label carries loss, written out on the bare HF model: ours without peft or tier weights."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    carries = targets != IGNORE
    return F.cross_entropy(model.lm_head(hidden[:, :-1][carries]), targets[carries])


def full_logits_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The former plain reference (B₀): logits at every position, then ignore_index."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def our_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`trainer._loop`'s SFT loss."""
    return weighted_nll(*forward_logprobs(model, batch), batch["weights"])


LOSSES = {"A": our_loss, "A′": our_loss, "A₀": our_loss, "B": plain_loss, "B₀": full_logits_loss}


def lora_settings(config: FlywheelConfig, arm: str, steps: int, batch_size: int):
    settings = config.lora.model_copy(update={"steps": steps, "batch_size": batch_size})
    if arm == "A′":
        settings.target_modules = [m for m in settings.target_modules if m not in EMBEDDING_MODULES]
    return settings


def run_arm(arm: str, base_dir: Path, setup: dict, config: FlywheelConfig, steps: int, batch_size: int):
    """Load the saved weights, train `steps` steps; tokens/s over the training loop, RSS over load + train."""
    release_memory()
    device = model_lib.pick_device()
    with ResourceSampler(threads=torch.get_num_threads()) as rss:
        model, tokenizer = model_lib.load_pretrained(base_dir, device)
        if arm == "B":
            tokens, seconds, final_loss, trainable = plain_torch_loop(model, setup, config, steps, batch_size)
        else:
            settings = lora_settings(config, arm, steps, batch_size)
            torch.manual_seed(settings.seed)  # the same adapter initialisation in every run of an arm
            model = attach_lora(model, settings)
            result = train_lora(model, setup["examples"], [], settings, pad_id=setup["pad_id"])
            tokens, seconds, final_loss = result.tokens, result.seconds, result.losses[-1]
            trainable = model_lib.count_parameters(model, trainable_only=True)
    run = {"arm": arm, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
           "final_loss": final_loss, "trainable_parameters": trainable, "rss_start_mb": rss.start / 2**20,
           "rss_peak_mb": rss.peak / 2**20, "rss_increase_mb": rss.increase_mb, "cpu_share": rss.cpu_share,
           "load_1m": os.getloadavg()[0]}
    return run, model, tokenizer


def plain_torch_loop(model, setup: dict, config: FlywheelConfig, steps: int, batch_size: int):
    """The reference: what a minimal hand-written fine-tuning loop costs on the same batches."""
    device = next(model.parameters()).device
    seed = config.lora.seed
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lora.learning_rate, weight_decay=0.0)
    model.train()
    tokens, loss = 0, None
    started = time.perf_counter()
    for examples in batches(setup["examples"], steps, batch_size, seed):
        batch = collate(examples, setup["pad_id"], device)
        loss = plain_loss(model, batch)
        tokens += int(batch["attention_mask"].sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss = loss.item()
    seconds = time.perf_counter() - started
    model.eval()
    return tokens, seconds, loss, model_lib.count_parameters(model, trainable_only=True)


def interleaved_steps(base_dir: Path, setup: dict, config: FlywheelConfig, steps: int,
                      batch_size: int, warmup: int = 3) -> dict[str, dict]:
    """Every arm's step, timed phase by phase, the arms taking turns step by step so that a
    neighbour's burst of work slows all of them alike; medians over steps. For A and A′
    this is `trainer._loop`'s step written out with its pieces (forward_logprobs +
    weighted_nll, clip_grad_norm_, AdamW over the trainable parameters, LambdaLR); the
    forward phase includes the loss."""
    device = model_lib.pick_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    arms = {}
    forwards = ExitStack()  # A and A′ train through the effective weight, as train_lora does
    for arm in INTERLEAVED_ARMS:
        model, _ = model_lib.load_pretrained(base_dir, device)
        if arm.startswith("A"):
            torch.manual_seed(config.lora.seed)
            model = attach_lora(model, lora_settings(config, arm, steps, batch_size))
            if arm != "A₀":
                forwards.enter_context(effective_weight_forward(model))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lora.learning_rate, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model.train()
        arms[arm] = (model, params, optimizer, scheduler)
    times: dict[str, dict[str, list[float]]] = {arm: defaultdict(list) for arm in INTERLEAVED_ARMS}
    tokens = []
    for step, examples in enumerate(batches(setup["examples"], steps + warmup, batch_size, config.lora.seed)):
        for arm, (model, params, optimizer, scheduler) in arms.items():
            marks = [time.perf_counter()]

            def lap(name: str) -> None:
                sync()
                marks.append(time.perf_counter())
                if step >= warmup:
                    times[arm][name].append(marks[-1] - marks[-2])

            batch = collate(examples, setup["pad_id"], device)
            lap("collate")
            loss = LOSSES[arm](model, batch)
            lap("forward")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lap("backward")
            if arm.startswith("A"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            lap("clip")
            optimizer.step()
            if arm.startswith("A"):
                scheduler.step()
            loss.item()
            lap("optimizer")
        if step >= warmup:
            tokens.append(int(batch["attention_mask"].sum()))
    forwards.close()
    del arms
    result = {}
    for arm, phases in times.items():
        step_s = [sum(parts) for parts in zip(*phases.values())]
        result[arm] = {"median_step_ms": statistics.median(step_s) * 1e3,
                       "tokens_per_s": statistics.mean(tokens) / statistics.median(step_s),
                       "phases_ms": {name: statistics.median(values) * 1e3 for name, values in phases.items()}}
    return result


def generation(model, tokenizer, batch_sizes: list[int], n_prompts: int) -> list[dict]:
    rows = []
    prompts = [task.prompt for task in eval_tasks(n_prompts)]
    for batch_size in batch_sizes:
        stats = GenerationStats()
        started = time.perf_counter()
        with ResourceSampler(threads=torch.get_num_threads()) as usage:
            runs = run_agent(model, tokenizer, prompts, run_tool, batch_size=batch_size, stats=stats)
        wall = time.perf_counter() - started
        rows.append({"batch_size": batch_size, "prompts": len(prompts), "new_tokens": stats.new_tokens,
                     "generate_s": stats.seconds, "wall_s": wall, "new_tokens_per_s": stats.tokens_per_second,
                     "finished": sum(r.finished for r in runs), "tool_calls": sum(len(r.calls) for r in runs),
                     "cpu_share": usage.cpu_share, "load_1m": os.getloadavg()[0]})
    return rows
