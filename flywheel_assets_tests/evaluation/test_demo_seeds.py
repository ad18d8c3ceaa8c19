"""make demo-seeds: every seed's row and the median; a seed moves every seed of the profile."""

from __future__ import annotations

import json

from flywheel_assets import demo_seeds, flywheel
from flywheel_assets.lib.config import FlywheelConfig, load_config


def _report(home, champion: float, best: str, over_best: float, se: float) -> None:
    (home / "reports").mkdir(parents=True)
    (home / "reports" / "flywheel_demo.json").write_text(json.dumps({
        "success": {"base": 0.44, "control": 0.45, "teacher_budget": 0.55, "no_teacher": 0.50, "champion": champion},
        "best_other": best, "over_best": over_best, "over_best_se": se, "over_base": champion - 0.44,
        "over_base_se": 0.02}))


def test_the_table_shows_every_seed_and_the_median(tmp_path, capsys):
    for seed, (champion, se) in enumerate([(0.60, 0.02), (0.66, 0.025), (0.62, 0.0)]):
        _report(tmp_path / f"home-{seed}", champion, "teacher_budget", champion - 0.55, se)
    assert demo_seeds.main([str(tmp_path / f"home-{s}") for s in range(3)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| home-0", "| home-1", "| home-2", "| **median**"]
    median = lines[-1]
    assert "62.0%" in median and "+7.0 (" in median and "+18.0" in median  # medians of champion, margins
    assert "no spread" in lines[4]  # a zero standard error is said, not divided by
    assert (tmp_path / "demo-seeds.md").read_text().strip() == "\n".join(lines)


def test_a_missing_report_names_the_home(tmp_path, capsys):
    assert demo_seeds.main([str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_a_seed_moves_every_seeded_section_and_keeps_the_profile(tmp_path, monkeypatch):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"ab": {"max_days": 4}, "lora": {"steps": 50}}))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(profile))
    config = FlywheelConfig(home=tmp_path / "home")
    seeded = load_config(config.home, str(flywheel.seeded_profile(config, 2)))
    for section in flywheel.SEEDED_SECTIONS:
        assert getattr(seeded, section).seed == getattr(config, section).seed + 2, section
    assert seeded.ab.max_days == 4 and seeded.lora.steps == 50
    assert seeded.domain.split_seed == config.domain.split_seed  # the held-out tasks stay the same
