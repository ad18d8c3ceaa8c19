"""Training-half benchmark: our LoRA step against a plain-torch reference, then generation.

One process builds the embedded setup as the product does (WordPiece tokenizer over the
domain corpus, `build_model` from the default BaseModelConfig, `encode`d cold-start
conversations), saves it, and trains from those identical weights in alternating arms:

  A   ours: `attach_lora` + `train_lora` with the default LoraConfigModel (peft, weighted
      loss, warm-up/cosine schedule, gradient clipping)
  B   plain torch: the same batches, full-parameter AdamW on `F.cross_entropy`, no peft;
      the same loss algorithm as ours: the output layer runs only where a label carries
      loss, so that the ratio A / B prices peft and our loop, not a different loss
  A′  ours without LoRA on `embed_tokens` and `lm_head`
  A₀  (interleaved pass only) ours with peft's own forward (adapter beside the frozen
      layer) instead of `effective_weight_forward`: what that change is worth
  B₀  (interleaved pass only) the former plain reference: `model(...).logits` at every
      position, cross-entropy with ignore_index; A / B₀ is what ours costs against a
      naive hand-written loop

Each arm runs `--repeats` times (A, B, A′, A, B, A′, …) and the best tokens/s counts,
because other jobs share the machine. Their bursts are longer than one arm, so a second
estimate times the arms' steps in turn, step by step, phase by phase (collate, forward
with the loss, backward, clip, optimizer), and compares median steps: a burst then slows every
arm alike. Each run also reports its CPU share (CPU time / wall time / threads); well
below 1 means neighbours had the cores and that run's tokens/s says little.

Then `run_agent` answers the held-out prompts with the trained adapter, unmerged as
offline evaluation loads it, and once merged.

Then the real model, SmolLM2-135M-Instruct (benchmarks/smollm2_training.py): our
`train_lora` against a plain torch + peft loop with the same batches and loss, each run in
its own process for its peak RSS, and batched greedy generation against one prompt at a
time. `--model embedded|smollm2` runs one part; the other keeps its last numbers in
benchmarks/results/bench_training-latest.json (the SmolLM2 part under "smollm2").

    .venv/bin/python benchmarks/bench_training.py [--model all] [--steps 60] [--batch-size 32] [--threads 2]

Targets are reported as ✓/✗ and never fail the run: wall-clock time is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_training-latest.json"
sys.path.insert(0, str(REPO))

import smollm2_training  # noqa: E402  (benchmarks/ is on sys.path)
from common import ResourceSampler, machine, mark, print_rows  # noqa: E402
from embedded_training import (  # noqa: E402
    ARMS, COLD_START_TASKS, build_setup, generation, interleaved_steps, run_arm,
)
from flywheel_assets.lib.config import FlywheelConfig  # noqa: E402
from flywheel_assets.lib.training import model as model_lib  # noqa: E402

TARGET_OVERHEAD = 1.3  # plain-torch tokens/s over ours


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = FlywheelConfig()
    device = model_lib.pick_device()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_training-") as tmp:
        base_dir = Path(tmp) / "base"
        print(f"building the embedded setup ({COLD_START_TASKS} cold-start tasks) …", flush=True)
        setup = build_setup(config, base_dir, args.pretrain_steps)
        print(f"  vocab {setup['vocab_size']:,}, {setup['parameters']:,} parameters, "
              f"{len(setup['examples']):,} examples, {setup['mean_example_tokens']:.1f} tokens each", flush=True)

        # First, so that one-time costs (first-touch of library pages, thread pools) land here,
        # not in the first measured arm.
        print(f"interleaved step timing ({args.phase_steps} steps per arm) …", flush=True)
        with ResourceSampler(threads=torch.get_num_threads()) as usage:
            interleaved = interleaved_steps(base_dir, setup, config, args.phase_steps, args.batch_size)
        interleaved_cpu_share = usage.cpu_share

        order = ["A", "B", "A′"] * args.repeats
        last_a = max(i for i, arm in enumerate(order) if arm == "A")
        runs = []
        for index, arm in enumerate(order):
            result, model, tokenizer = run_arm(arm, base_dir, setup, config, args.steps, args.batch_size)
            runs.append(result)
            print(f"  arm {arm:2}  {result['tokens_per_s']:9,.0f} tokens/s  {result['seconds']:5.2f} s  "
                  f"RSS +{result['rss_increase_mb']:6.1f} MB (peak {result['rss_peak_mb']:,.0f} MB)  "
                  f"loss {result['final_loss']:.3f}  CPU share {result['cpu_share']:.2f}  "
                  f"load {result['load_1m']:.2f}", flush=True)
            if index == last_a:
                lora_model, lora_tokenizer = model, tokenizer
            del model

        print("generating with the last arm-A adapter (unmerged, as offline evaluation loads it) …", flush=True)
        generated = generation(lora_model, lora_tokenizer, args.generation_batch_sizes, args.prompts)
        merged = lora_model.merge_and_unload()
        generated += [dict(row, merged=True) for row in
                      generation(merged, lora_tokenizer, args.generation_batch_sizes[:1], args.prompts)]

    best = {arm: max((r for r in runs if r["arm"] == arm), key=lambda r: r["tokens_per_s"]) for arm in ARMS}
    # The first run of an arm reads the cleanest RSS; later ones may reuse pages: keep the largest.
    rss_increase = {arm: max(r["rss_increase_mb"] for r in runs if r["arm"] == arm) for arm in ARMS}
    load_after = os.getloadavg()
    return {
        "steps": args.steps, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "device": str(device), "torch": torch.__version__,
        "setup": {k: v for k, v in setup.items() if k not in ("examples", "pad_id")} | {
            "examples": len(setup["examples"])},
        "lora": config.lora.model_dump(),
        "runs": runs,
        "target_overhead": TARGET_OVERHEAD,
        "best_tokens_per_s": {arm: best[arm]["tokens_per_s"] for arm in ARMS},
        "best_cpu_share": {arm: best[arm]["cpu_share"] for arm in ARMS},
        "rss_increase_mb": rss_increase,
        "peak_rss_mb": max(r["rss_peak_mb"] for r in runs),
        "trainable_parameters": {arm: best[arm]["trainable_parameters"] for arm in ARMS},
        "same_batches": len({r["tokens"] for r in runs}) == 1,
        "overhead_ratio": best["B"]["tokens_per_s"] / best["A"]["tokens_per_s"],
        "overhead_ratio_without_embedding_lora": best["B"]["tokens_per_s"] / best["A′"]["tokens_per_s"],
        "embedding_lora_cost": best["A′"]["tokens_per_s"] / best["A"]["tokens_per_s"],
        "rss_ratio": rss_increase["A"] / max(rss_increase["B"], 1e-9),
        "interleaved": interleaved,
        "interleaved_cpu_share": interleaved_cpu_share,
        "interleaved_overhead_ratio": interleaved["A"]["median_step_ms"] / interleaved["B"]["median_step_ms"],
        "interleaved_overhead_ratio_without_embedding_lora":
            interleaved["A′"]["median_step_ms"] / interleaved["B"]["median_step_ms"],
        "interleaved_ratio_against_full_logits_plain":
            interleaved["A"]["median_step_ms"] / interleaved["B₀"]["median_step_ms"],
        "interleaved_ratio_peft_forward":
            interleaved["A₀"]["median_step_ms"] / interleaved["B"]["median_step_ms"],
        "generation": generated,
        # Other work on the machine slows every number: 1-, 5-, 15-minute load before and after.
        "load_avg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": versions(),
    }


def overhead_row(label: str, value: float) -> tuple[str, str, str, str]:
    # three decimals: a ✗ next to a value that reads as the target would be a puzzle
    return label, f"{value:.3f}×", f"≤ {TARGET_OVERHEAD}×", mark(value <= TARGET_OVERHEAD)


def print_table(r: dict) -> None:
    tps, rss, trainable = r["best_tokens_per_s"], r["rss_increase_mb"], r["trainable_parameters"]
    rows = [
        *[(f"train {arm}: {ARMS[arm]}", f"{tps[arm]:,.0f} tokens/s",
           f"{trainable[arm]:,} trainable, best of {r['repeats']} (CPU share {r['best_cpu_share'][arm]:.2f})", "")
          for arm in ARMS],
        overhead_row("overhead ratio B / A (best runs)", r["overhead_ratio"]),
        overhead_row("overhead ratio B / A′ (best runs)", r["overhead_ratio_without_embedding_lora"]),
        ("embedding LoRA cost A′ / A", f"{r['embedding_lora_cost']:.2f}×", "", ""),
        *[(f"RSS increase {arm}", f"{rss[arm]:,.1f} MB", "load + train, largest run", "") for arm in ARMS],
        ("RSS ratio A / B", f"{r['rss_ratio']:.2f}×", "", ""),
        ("peak RSS (absolute)", f"{r['peak_rss_mb']:,.0f} MB", f"ru_maxrss {r['ru_maxrss_mb']:,.0f} MB", ""),
        ("CPU share of the arms", " / ".join(f"{x['cpu_share']:.2f}" for x in r["runs"]),
         "in run order; < 0.9: neighbours took cores", ""),
        ("same batches in every arm", "yes" if r["same_batches"] else "NO", "equal token counts",
         mark(r["same_batches"])),
    ]
    rows.append(("interleaved pass CPU share", f"{r['interleaved_cpu_share']:.2f}", "", ""))
    rows.append(overhead_row("interleaved median step A / B", r["interleaved_overhead_ratio"]))
    rows.append(overhead_row("interleaved median step A′ / B",
                             r["interleaved_overhead_ratio_without_embedding_lora"]))
    rows.append(("interleaved median step A / B₀", f"{r['interleaved_ratio_against_full_logits_plain']:.3f}×",
                 "B₀: plain loop with logits at every position (the former reference)", ""))
    rows.append(("interleaved median step A₀ / B", f"{r['interleaved_ratio_peft_forward']:.3f}×",
                 "A₀: ours with peft's forward, adapter beside the layer (before effective_weight)", ""))
    for arm, timing in r["interleaved"].items():
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in timing["phases_ms"].items())
        rows.append((f"  median step {arm}", f"{timing['median_step_ms']:.1f} ms",
                     f"{timing['tokens_per_s']:,.0f} tokens/s; ms: {parts}", ""))
    for g in r["generation"]:
        label = f"generate, batch {g['batch_size']}" + (" (merged)" if g.get("merged") else "")
        rows.append((label, f"{g['new_tokens_per_s']:,.0f} new tokens/s",
                     f"{g['wall_s']:.1f} s wall, {g['new_tokens']:,} tokens, {g['tool_calls']} calls, "
                     f"{g['finished']}/{g['prompts']} finished, CPU share {g['cpu_share']:.2f}", ""))
    load = r["load_avg"]
    print_rows(f"bench_training: {r['steps']} steps × batch {r['batch_size']}, {r['threads']} threads, {r['device']}, "
               f"torch {r['torch']} (load {load['before'][0]:.2f} → {load['after'][0]:.2f})", rows)


def print_smollm2_table(r: dict) -> None:
    t = r["training"]
    print_rows(f"bench_training, SmolLM2-135M-Instruct: {t['arms']['A']['timed_steps']} timed steps per arm × batch "
               f"{r['lora']['batch_size']} ({t['timed_tokens_per_step']:,.0f} tokens a step), {r['threads']} threads "
               f"(load {r['load_avg']['before'][0]:.2f} → {r['load_avg']['after'][0]:.2f})",
               smollm2_training.table_rows(r, mark))


def versions() -> dict:
    import peft
    import transformers

    return machine(transformers=transformers.__version__, peft=peft.__version__,
                   cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--phase-steps", type=int, default=60, help="interleaved steps timed per arm")
    parser.add_argument("--prompts", type=int, default=600, help="held-out prompts to generate for")
    parser.add_argument("--generation-batch-sizes", type=int, nargs="+", default=[300, 64])
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="pretrain the base first (0: random weights, as build_model returns them)")
    parser.add_argument("--model", choices=["embedded", "smollm2", "all"], default="all",
                        help="which model to measure; the other part's last numbers stay in the results file")
    real = parser.add_argument_group("SmolLM2-135M-Instruct")
    real.add_argument("--smollm2-steps", type=int, default=10, help="timed steps per arm")
    real.add_argument("--smollm2-warmup", type=int, default=2, help="untimed steps before them")
    real.add_argument("--smollm2-batch-size", type=int, default=4)
    real.add_argument("--smollm2-prompts", type=int, default=16, help="held-out prompts to generate for")
    real.add_argument("--smollm2-generation-batch", type=int, default=16)
    real.add_argument("--smollm2-new-tokens", type=int, default=48, help="max_new_tokens of every generate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The part not measured this time keeps its last numbers: the file always holds both.
    result = json.loads(RESULTS.read_text()) if args.model != "all" and RESULTS.exists() else {}
    if args.model in ("embedded", "all"):
        embedded = run(args)
        print_table(embedded)
        result = embedded | ({"smollm2": result["smollm2"]} if "smollm2" in result else {})
    if args.model in ("smollm2", "all"):
        real = smollm2_training.run(args) | {"machine": versions()}
        print_smollm2_table(real)
        result["smollm2"] = real
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
