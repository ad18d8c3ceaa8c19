"""Offline evaluation on the held-out task set: metrics with intervals, and the gate.

The tasks, the model's request and the verdict come from the configured domain
(lib/domains): success is the domain's check (the built-in verifier on the final answer;
BFCL's AST rules on the calls), tool-name and argument accuracy compare the calls with
the domain's reference answer.
Candidate and champion answer the same tasks, so their difference gets a paired
interval (the standard error of the per-task difference), tighter than two
independent ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

from scipy import stats


@dataclass(frozen=True)
class TaskOutcome:
    task_id: str
    task_type: str
    success: bool
    tool_names_right: bool
    arguments_right: bool


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(outcomes: list[TaskOutcome], confidence: float = 0.95) -> dict:
    """Overall and per task type: n, success (with Wilson interval), tool-name and argument accuracy."""
    def block(rows: list[TaskOutcome]) -> dict:
        n = len(rows)
        wins = sum(r.success for r in rows)
        low, high = wilson(wins, n, confidence)
        return {"n": n, "success": wins / n if n else 0.0, "success_low": low, "success_high": high,
                "tool_name_accuracy": sum(r.tool_names_right for r in rows) / n if n else 0.0,
                "argument_accuracy": sum(r.arguments_right for r in rows) / n if n else 0.0}

    by_type = {t: block([r for r in outcomes if r.task_type == t]) for t in sorted({r.task_type for r in outcomes})}
    return {"overall": block(outcomes), "by_task_type": by_type}


def paired_difference(candidate: list[TaskOutcome], champion: list[TaskOutcome], confidence: float = 0.95) -> dict:
    """Candidate − champion success on the same tasks, with a normal interval of the paired difference."""
    champion_by_id = {o.task_id: o.success for o in champion}
    differences = [int(o.success) - int(champion_by_id[o.task_id]) for o in candidate if o.task_id in champion_by_id]
    n = len(differences)
    if n == 0:
        return {"n": 0, "difference": 0.0, "low": 0.0, "high": 0.0, "standard_error": 0.0}
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / max(n - 1, 1)
    se = math.sqrt(variance / n)
    z = stats.norm.ppf(0.5 + confidence / 2)
    return {"n": n, "difference": mean, "low": mean - z * se, "high": mean + z * se, "standard_error": se}


def gate(difference: dict, margin: float) -> tuple[bool, str]:
    """Pass unless the candidate is worse than the champion by more than `margin` (point estimate).

    The point estimate, not the interval, decides: on 600 tasks the interval is about
    ±4 points, and a gate that passed whenever the interval reached −margin would let
    clearly worse candidates through. The A/B test settles small differences online.
    """
    delta = difference["difference"]
    if delta < -margin:
        return False, f"candidate is {-delta:.1%} worse than the champion (margin {margin:.1%})"
    return True, f"candidate − champion = {delta:+.1%} [{difference['low']:+.1%}, {difference['high']:+.1%}]"


def run_tasks(model, tokenizer, domain, tasks, *, batch_size: int = 300, max_new_tokens: int = 40,
              temperature: float = 0.0, seed: int = 0, stats=None, progress=None) -> list:
    """The model's agent runs on the domain's tasks (tools executed where the domain runs them)."""
    from flywheel_assets.lib.training.inference import Request, run_requests

    requests = [Request(domain.messages_for(task), domain.tools_for(task)) for task in tasks]
    return run_requests(model, tokenizer, requests,
                        lambda row, name, arguments: domain.execute(tasks[row], name, arguments),
                        batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        stats=stats, progress=progress)


def evaluate_model(model, tokenizer, domain, tasks, *, batch_size: int = 300, max_new_tokens: int = 40,
                   progress=None) -> list[TaskOutcome]:
    runs = run_tasks(model, tokenizer, domain, tasks, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     progress=progress)
    outcomes = []
    for task, run in zip(tasks, runs):
        grade = domain.grade(task, run.tool_calls(), run.final_answer)
        outcomes.append(TaskOutcome(str(task_id(task)), domain.task_type(task), grade.success,
                                    grade.tool_names_right, grade.arguments_right))
    return outcomes


def task_id(task) -> str:
    return getattr(task, "task_id", None) or task.id


def evaluate_version(config, version: dict, domain, tasks, log=print) -> list[TaskOutcome]:
    """A registry version's outcomes on the tasks, kept beside its weights: a version's files never
    change and decoding is greedy, so a champion evaluated once as a candidate is not evaluated
    again (on a real model on 2 cores one pass over 400 BFCL tasks takes tens of minutes)."""
    from flywheel_assets.lib.training.pipeline import load_for_inference

    from flywheel_assets.lib.storage.artifacts import local

    folder = local(config.home, version["adapter_path"] or version["base_path"])
    settings = [domain.name, [task_id(t) for t in tasks], config.evaluation.max_new_tokens]
    digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    cache = folder / f"heldout-outcomes-{digest}.json"
    if cache.is_file():
        log(f"{version['version']}: outcomes on these {len(tasks)} tasks already measured ({cache.name})")
        return [TaskOutcome(**row) for row in json.loads(cache.read_text())]
    adapter = folder if version["adapter_path"] else None
    # merged: the same function as base + adapter (test_training holds them equal), without the
    # adapter's extra matmuls in every layer at every generated token
    base = folder if adapter is None else local(config.home, version["base_path"])  # a base version: fetched above
    model, tokenizer = load_for_inference(base, adapter, merged=adapter is not None)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:  # a real model's pass takes minutes: say how far it is
        if done < total:
            log(f"{version['version']}: {done}/{total} tasks generated ({time.perf_counter() - started:.0f} s)")

    outcomes = evaluate_model(model, tokenizer, domain, tasks, batch_size=config.evaluation.batch_size,
                              max_new_tokens=config.evaluation.max_new_tokens, progress=progress)
    if folder.is_dir():
        staging = cache.with_name(f".{cache.name}.tmp")
        staging.write_text(json.dumps([asdict(o) for o in outcomes]))
        staging.replace(cache)
    return outcomes


def evaluate_versions(config, candidate: dict, champion: dict, log=print, domain=None) -> dict:
    """Both registry versions on the domain's held-out tasks; rows for OFFLINE_EVALUATIONS and a verdict."""
    from flywheel_assets.lib.domains import load_domain

    domain = domain or load_domain(config.domain)
    tasks = domain.heldout_tasks(config.evaluation.tasks)
    outcomes = {}
    for role, version in (("candidate", candidate), ("champion", champion)):
        outcomes[role] = evaluate_version(config, version, domain, tasks, log)
        log(f"{role} {version['version']}: {sum(o.success for o in outcomes[role])}/{len(tasks)} tasks solved")
    summaries = {role: summarise(rows) for role, rows in outcomes.items()}
    difference = paired_difference(outcomes["candidate"], outcomes["champion"])
    passed, reason = gate(difference, config.evaluation.gate_margin)
    rows = []
    for role, version in (("candidate", candidate), ("champion", champion)):
        scopes = {"overall": summaries[role]["overall"], **summaries[role]["by_task_type"]}
        for scope, block in scopes.items():
            overall_candidate = role == "candidate" and scope == "overall"
            rows.append({"version": version["version"], "role": role, "scope": scope, **block,
                         "difference": difference["difference"] if overall_candidate else None,
                         "difference_low": difference["low"] if overall_candidate else None,
                         "difference_high": difference["high"] if overall_candidate else None,
                         "gate_passed": passed if overall_candidate else None,
                         "gate_reason": reason if overall_candidate else None})
    return {"rows": rows, "candidate": summaries["candidate"], "champion": summaries["champion"],
            "difference": difference, "gate_passed": passed, "gate_reason": reason,
            "markdown": markdown_table(summaries, candidate["version"], champion["version"])}


def markdown_table(summaries: dict, candidate: str, champion: str) -> str:
    lines = [f"| scope | {champion} (champion) | {candidate} (candidate) | tool names | arguments |",
             "|---|---:|---:|---:|---:|"]
    scopes = ["overall", *summaries["candidate"]["by_task_type"]]
    for scope in scopes:
        get = (lambda role: summaries[role]["overall"]) if scope == "overall" else \
            (lambda role: summaries[role]["by_task_type"][scope])
        cand, champ = get("candidate"), get("champion")
        lines.append(f"| {scope} | {_pct(champ)} | {_pct(cand)} | {cand['tool_name_accuracy']:.1%} | "
                     f"{cand['argument_accuracy']:.1%} |")
    return "\n".join(lines)


def _pct(block: dict) -> str:
    return f"{block['success']:.1%} [{block['success_low']:.1%}, {block['success_high']:.1%}]"
