"""`flywheel annotate --next N`: disagreements and tier edges dealt in turn, labelled ones left out."""

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from flywheel_assets.cli import EXIT_USAGE, app
from flywheel_assets.lib.config import TierConfig
from flywheel_assets.lib.feedback.label_queue import tier_edges
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import ANNOTATIONS, TRAJECTORY_SCORES
from flywheel_assets_tests.helpers import write_lines

# (id, origin, implicit, judge, explicit, combined, user_rejected, human_verified): spread = max − min of the
# sources; the edges an automatic score can cross are 0.6 and 0.3 (platinum needs a human)
ROWS = [
    ("f", "usage", 0.9, 1.0, -1.0, -0.196, True, False),  # spread 2.0; thumbs down: rejected, no edge
    ("a", "usage", 0.9, -1.0, None, 0.33, False, False),  # spread 1.9; 0.03 above silver's edge
    ("b", "usage", -0.4, 1.0, None, 0.02, True, False),  # spread 1.4; rejected, no edge
    ("d", "usage", 0.5, 0.8, None, 0.59, False, False),  # spread 0.3; 0.01 below gold's edge
    ("c", "usage", 0.6, 0.6, None, 0.6, False, False),  # on gold's edge
    ("c2", "usage", 0.6, 0.6, None, 0.6, False, False),  # c's twin: waits until the distinct ones are dealt
    ("e", "usage", None, 0.2, None, 0.2, False, False),  # judges only, 0.1 below silver's edge
    ("l", "imported", None, 0.85, None, 0.85, False, False),  # platinum's edge does not count: 0.25 from gold's
    ("g", "usage", 1.0, -1.0, None, 0.4, False, False),  # labelled in bronze/annotations
    ("h", "usage", 0.95, -1.0, None, 0.37, False, False),  # labelled in a landing file not ingested yet
    ("k", "usage", 1.0, -1.0, None, -1.0, False, True),  # labelled and scored: human-verified
    ("gold-row", "golden", None, -1.0, None, 1.0, False, True),
    ("syn", "synthetic", 0.8, -1.0, None, 0.26, False, False),  # a teacher's row: not the users'
]


@pytest.fixture
def scored_lake(config, lake):
    lake.overwrite(TRAJECTORY_SCORES, conform(pa.Table.from_pylist([
        {"trajectory_id": t, "task_type": "capital_lookup", "origin": origin, "implicit_score": implicit,
         "judge_score": judge, "explicit_score": explicit, "combined_score": combined, "user_rejected": rejected,
         "human_verified": human, "tier": "silver"}
        for t, origin, implicit, judge, explicit, combined, rejected, human in ROWS]), TRAJECTORY_SCORES))
    lake.append(ANNOTATIONS, conform(pa.Table.from_pylist([
        {"annotation_id": "x1", "trajectory_id": "g", "score": 1.0},
        {"annotation_id": "x2", "trajectory_id": "k", "score": -1.0}]), ANNOTATIONS))
    write_lines(config.landing / "annotations" / "cli-later.jsonl",
                [{"trajectory_id": "h", "score": -1.0, "annotated_at": "2026-11-26T12:00:00Z"}, "not json"])
    return lake


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_tier_edges_leave_out_the_floor_and_platinum_unless_scores_may_reach_it():
    assert tier_edges(TierConfig()) == [0.6, 0.3]
    assert tier_edges(TierConfig(platinum_requires_human=False)) == [0.85, 0.6, 0.3]


def test_next_deals_disagreements_and_tier_edges_in_turn(scored_lake):
    result = run("annotate", "--next", "20", "--json")
    assert result.exit_code == 0, result.output
    queue = json.loads(result.output)
    assert [(row["trajectory_id"], row["reason"]) for row in queue] == [
        ("f", "disagreement"), ("c", "tier edge"), ("a", "disagreement"), ("d", "tier edge"),
        ("b", "disagreement"), ("e", "tier edge"), ("l", "tier edge"), ("c2", "tier edge")]
    assert [row["rank"] for row in queue] == list(range(1, 9))
    first = queue[0]
    assert (first["spread"], first["edge_distance"], first["nearest_edge"]) == (pytest.approx(2.0), None, None)
    assert (queue[1]["edge_distance"], queue[1]["nearest_edge"]) == (0.0, 0.6)
    assert (queue[2]["edge_distance"], queue[2]["nearest_edge"]) == (pytest.approx(0.03), 0.3)
    assert (queue[6]["edge_distance"], queue[6]["nearest_edge"]) == (pytest.approx(0.25), 0.6)
    # the same lake, the same queue; a shorter one is its head
    assert json.loads(run("annotate", "--next", "20", "--json").output) == queue
    assert [row["trajectory_id"] for row in json.loads(run("annotate", "--next", "3", "--json").output)] == \
        ["f", "c", "a"]


def test_next_prints_a_table_to_label_from(scored_lake):
    result = run("annotate", "--next", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["rank", "trajectory", "reason", "spread"]
    assert lines[1].split()[:4] == ["1", "f", "disagreement", "2.00"]
    assert lines[2].split()[:3] == ["2", "c", "tier"]
    assert "flywheel annotate TRAJECTORY_ID --label good|bad" in lines[-1]


@pytest.mark.parametrize("args, message", [
    (("c", "--next", "2"), "give no TRAJECTORY_ID"),
    (("--next", "2", "--label", "good"), "give no TRAJECTORY_ID"),
    ((), "or --next N"),
    (("--next", "0"), "--next"),
])
def test_next_bad_arguments(scored_lake, args, message):
    result = run("annotate", *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output
