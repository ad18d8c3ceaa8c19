"""The five-arm table's headline: the champion against the best other arm, and what it says
when an arm wins or none could be trained."""

from types import SimpleNamespace

from flywheel_assets.lib.evaluation.comparison import Arm, render


def _arm(name: str, wins: int, n: int = 600) -> Arm:
    outcomes = [SimpleNamespace(task_id=i, task_type="calc", success=i < wins, tool_names_right=i < wins,
                                arguments_right=i < wins) for i in range(n)]
    return Arm(name, name, outcomes)


def test_the_headline_is_against_the_best_other_arm_and_says_when_the_teacher_budget_won():
    report, numbers = render([_arm("base", 270), _arm("control", 300), _arm("teacher_budget", 450),
                              _arm("no_teacher", 390), _arm("champion", 440)], 600)
    assert numbers["best_other"] == "teacher_budget"
    assert round(numbers["over_best"] * 600) == -10 and round(numbers["over_base"] * 600) == 170
    assert numbers["targets_met"] == {"best": False, "base": True}
    assert "did at least as well as the loop" in report


def test_a_champion_that_is_the_base_says_why_no_arm_was_trained():
    note = "No cycle was promoted: the champion is the base"
    report, numbers = render([_arm("base", 270), _arm("champion", 270)], 600, [note])
    assert note in report and numbers["best_other"] == "base" and numbers["targets_met"]["best"] is False
