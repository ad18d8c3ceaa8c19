"""Teacher corrections of the requests users gave up on (lib/feedback/corrections.py)."""

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource, markdown_counts
from flywheel_assets.lib.domains import load_domain
from flywheel_assets.lib.feedback.corrections import correction_lines, failed_requests, to_jsonl
from flywheel_assets.lib.simulation.seed import write_landing_file
from flywheel_assets.lib.simulation.teachers import make_teacher


@dg.asset(group_name="feedback", kinds={"python", "duckdb"}, deps=["trajectory_scores"])
def teacher_corrections(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Once a day, up to corrections.daily_budget failed user requests (no attempt reached a
    training tier), balanced over task types, are solved again by the cold-start teacher; the
    verified answers land in landing/trajectories/corrections-<day>.jsonl with origin
    `correction`, and the landing sensor ingests them like any other trajectory file."""
    with flywheel.writing("teacher_corrections", context):
        config, lake = flywheel.config(), flywheel.lake()
        settings = config.corrections
        day = flywheel.now()
        target = config.landing / "trajectories" / f"corrections-{day:%Y-%m-%d}.jsonl"
        if settings.daily_budget == 0 or target.exists():
            reason = "turned off (corrections.daily_budget = 0)" if settings.daily_budget == 0 else \
                f"today's corrections already landed in {target.name}"
            context.log.info(reason)
            return dg.MaterializeResult(metadata={"corrected": 0, "skipped_because": reason})
        failures = failed_requests(lake, config, settings.daily_budget)
        domain = load_domain(config.domain)
        teacher = make_teacher(config.cold_start.teacher, settings.seed + day.toordinal(), domain, config.teacher)
        lines, skipped = correction_lines(failures, teacher, day, domain)
        if lines:
            write_landing_file(target, to_jsonl(lines))
        by_type: dict[str, int] = {}
        for line in lines:
            by_type[line["task_type"]] = by_type.get(line["task_type"], 0) + 1
        context.log.info(f"{len(failures)} failed requests sent to the {config.cold_start.teacher} teacher: "
                         f"{len(lines)} corrected, {dict(skipped) or 'none'} skipped")
        return dg.MaterializeResult(metadata={
            "failed_requests": len(failures), "corrected": len(lines), "teacher": teacher.model_version,
            "file": str(target) if lines else "", "by_task_type": markdown_counts(by_type, "task type", "corrections"),
            "skipped": markdown_counts(dict(skipped), "reason", "requests"),
        })
