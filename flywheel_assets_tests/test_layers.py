"""The layers hold: the product's logic never imports Dagster, and training, feedback and
evaluation depend on the domain interface, never on the demo's simulator."""

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "flywheel_assets" / "lib"


def _imports(folder: Path) -> dict[str, set[str]]:
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(LIB))] = names
    return found


def test_lib_never_imports_dagster():
    offenders = {f: n for f, n in _imports(LIB).items() if any(m.split(".")[0].startswith("dagster") for m in n)}
    assert not offenders


def test_training_feedback_and_evaluation_never_import_the_simulator():
    for stage in ("training", "feedback", "evaluation"):
        offenders = {f: n for f, n in _imports(LIB / stage).items()
                     if any(m.startswith("flywheel_assets.lib.simulation") for m in n)}
        assert not offenders, stage
