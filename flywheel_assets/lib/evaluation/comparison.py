"""The demo's proof: the champion against every arm that could beat it, on the held-out tasks.

Arms: the base; the three of `arms.py` (control, equal teacher budget, the loop without
its teacher), each trained as many cycles as the champion's lineage; the champion; and the
latest adapter when the A/B test did not promote it. The headline is the champion minus
the best other arm, paired per task, with its standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.evaluation import arms as arm_data
from flywheel_assets.lib.evaluation.offline import evaluate_version, paired_difference, summarise
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.storage.artifacts import local
from flywheel_assets.lib.tenancy import SHARED, lane_of

HEADLINE_OVER_BEST = 0.05  # the targets: ≥ +5 points over the best other arm,
HEADLINE_OVER_BASE = 0.20  # ≥ +20 over the base, both more than 3 standard errors
MIN_STANDARD_ERRORS = 3.0
RANDOM_TEACHER_SALT = 7919  # the random tasks' draw: not the users' own seed


@dataclass
class Arm:
    name: str
    label: str
    outcomes: list


def compare(config: FlywheelConfig, lake: Lake, registry, *, train_arms: bool = True,
            log: Callable[[str], None] = print) -> tuple[str, dict]:
    """The markdown report and its numbers ({arm: success}, the headline)."""
    from flywheel_assets.lib.domains import load_domain

    champion = registry.champion()
    base = registry.get(champion["base"])
    chain = arm_data.lineage(registry, champion)
    domain = load_domain(config.domain)
    tasks = domain.heldout_tasks(config.evaluation.tasks)

    def measured(version: dict) -> list:
        return evaluate_version(config, version, domain, tasks, log=log)

    arms = [Arm("base", f"base `{base['version']}`", measured(base))]
    notes = []
    if train_arms and not chain:
        notes.append("No cycle was promoted: the champion is the base, so no comparison arm was trained "
                     "(an arm trains as many cycles as the champion's lineage).")
        log(notes[-1])
    if train_arms and chain:
        cycles = [arm_data.cycle_data(lake, row["cycle"]) for row in chain]
        teacher = arm_data.RandomTeacher(domain, config.curation.seed + RANDOM_TEACHER_SALT)
        makers = {"control": lambda data: arm_data.control_rows(data, config),
                  "teacher_budget": lambda data: arm_data.teacher_budget_rows(data, config, teacher),
                  "no_teacher": lambda data: arm_data.no_teacher_rows(data, config)}
        base_dir = local(config.home, base["base_path"])
        for name in arm_data.ARMS:
            log(f"arm {name}: {len(cycles)} cycle(s) of {config.lora.steps} steps over the base")
            folder = arm_data.train_arm(config, base_dir, cycles, makers[name], config.models / "arms" / name,
                                        log=log, name=name)
            version = {"version": name, "adapter_path": None, "base_path": config.stored_path(folder)}
            arms.append(Arm(name, f"{arm_data.LABELS[name]}, {len(cycles)} cycle(s)", measured(version)))
    arms.append(Arm("champion", f"**champion** `{champion['version']}` (the full loop, "
                                f"{len(chain)} cycle(s))", measured(champion)))
    # the latest adapter, when it is not the champion: what the cycles trained, beside what the
    # online test let through
    adapters = [r for r in registry.current()
                if r["adapter_path"] and r["version"] != champion["version"] and lane_of(r) == SHARED]
    latest = max(adapters, key=lambda r: r["changed_at"]) if adapters else None
    if latest is not None and (champion["adapter_path"] is None or latest["cycle"] > champion["cycle"]):
        arms.append(Arm("latest", f"latest adapter `{latest['version']}` ({latest['status']})", measured(latest)))
    return render(arms, len(tasks), notes)


def render(arms: list[Arm], n_tasks: int, notes: list[str] = ()) -> tuple[str, dict]:
    by_name = {arm.name: arm for arm in arms}
    champion = by_name["champion"]
    others = [a for a in arms if a.name not in ("champion", "latest")]
    success = {a.name: summarise(a.outcomes)["overall"]["success"] for a in arms}
    best = max(others, key=lambda a: (success[a.name], a.name == "base"))
    lines = [f"held-out success on {n_tasks} tasks never trained on (95% Wilson interval); "
             "differences paired per task:", "",
             "| arm | held-out success | champion − arm |", "|---|---:|---|"]
    for arm in arms:
        block = summarise(arm.outcomes)["overall"]
        cell = "" if arm is champion else _difference(champion, arm)
        lines.append(f"| {arm.label} | {block['success']:.1%} [{block['success_low']:.1%}, "
                     f"{block['success_high']:.1%}] | {cell} |")
    over_best = paired_difference(champion.outcomes, best.outcomes)
    over_base = paired_difference(champion.outcomes, by_name["base"].outcomes)
    verdicts = {"best": _met(over_best, HEADLINE_OVER_BEST), "base": _met(over_base, HEADLINE_OVER_BASE)}
    lines += ["", f"**Headline: the champion {over_best['difference'] * 100:+.1f} points over the best other arm "
                  f"({best.name})**, {_spread(over_best)} (target ≥ {HEADLINE_OVER_BEST * 100:+.0f} and > 3 SE: "
                  f"{'met' if verdicts['best'] else 'NOT met'}); {over_base['difference'] * 100:+.1f} over the base, "
                  f"{_spread(over_base)} (target ≥ {HEADLINE_OVER_BASE * 100:+.0f} and > 3 SE: "
                  f"{'met' if verdicts['base'] else 'NOT met'})."]
    if "teacher_budget" in by_name and success["teacher_budget"] >= success["champion"]:
        lines.append("The same teacher budget spent on random tasks did at least as well as the loop: "
                     "on this run the flywheel's targeting of failures did not pay for itself.")
    lines += list(notes)
    numbers = {"success": success, "best_other": best.name, "over_best": over_best["difference"],
               "over_best_se": over_best["standard_error"], "over_base": over_base["difference"],
               "over_base_se": over_base["standard_error"], "targets_met": verdicts}
    return "\n".join(lines), numbers


def _difference(champion: Arm, arm: Arm) -> str:
    d = paired_difference(champion.outcomes, arm.outcomes)
    return f"{d['difference'] * 100:+.1f} points [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}], {_spread(d)}"


def _spread(d: dict) -> str:
    if not d["standard_error"]:  # every paired difference the same (both arms one model): nothing to measure
        return "no spread"
    return f"{d['difference'] / d['standard_error']:.1f} SE"


def _met(d: dict, target: float) -> bool:
    return bool(d["standard_error"]) and d["difference"] >= target \
        and d["difference"] / d["standard_error"] > MIN_STANDARD_ERRORS
