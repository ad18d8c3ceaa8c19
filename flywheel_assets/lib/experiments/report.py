"""ab_results rows → a markdown table and a chart of the effect with its interval over time."""

from __future__ import annotations

import json
from pathlib import Path


def ab_markdown(rows: list[dict]) -> str:
    """Every look; an A/B look also shows its users against the plan and its power now."""
    if not rows:
        return "No look yet."
    lines = ["| looked at | stage | outcome | effect [interval] | users c/t | users / planned, power now | reason |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        effect = (f"{r['effect']:+.3f} [{r['effect_low']:+.3f}, {r['effect_high']:+.3f}]"
                  if r.get("effect") is not None else "")
        users = f"{r['users_control']}/{r['users_treatment']}" if r.get("users_control") is not None else ""
        lines.append(f"| {r['looked_at']:%Y-%m-%d %H:%M} | {r['stage']} | **{r['outcome']}** | {effect} | {users} | "
                     f"{_progress(r)} | {r['reason']} |")
    return "\n".join(lines)


def _progress(row: dict) -> str:
    plan = json.loads(row.get("decision_json") or "{}").get("plan") or {}
    if not plan:
        return ""
    power = plan.get("power_now")
    return (f"{plan['observed_users']:,} / {plan['planned_users']:,}, "
            f"{'–' if power is None else format(power, '.0%')}")


def ab_chart(rows: list[dict], path: Path) -> Path | None:
    """Effect and interval at every A/B look; None before the first one."""
    looks = [r for r in rows if r.get("effect") is not None]
    if not looks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    x = [r["looked_at"] for r in looks]
    effect = [r["effect"] for r in looks]
    low = [r["effect_low"] for r in looks]
    high = [r["effect_high"] for r in looks]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.fill_between(x, low, high, alpha=0.25, label="anytime-valid 95% interval")
    axis.plot(x, effect, marker="o", label="treatment − champion (session quality)")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_title(f"A/B {looks[-1]['treatment']} vs {looks[-1]['control']}: {looks[-1]['outcome']}")
    axis.legend(loc="best", fontsize=8)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
