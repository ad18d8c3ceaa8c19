"""README stays true: every table, column and make target it must document."""

from pathlib import Path

from flywheel_assets.lib.tables import markdown_reference

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_reference_is_current():
    assert markdown_reference().rstrip() in (ROOT / "README.md").read_text()


def test_readme_documents_every_make_target_and_ci_calls_make_test():
    readme = (ROOT / "README.md").read_text()
    targets = [line.split(":")[0] for line in (ROOT / "Makefile").read_text().splitlines()
               if line and line[0].isalpha() and ":" in line and "=" not in line]
    assert set(targets) >= {"dev", "demo", "test", "bench"}
    assert all(f"make {target}" in readme for target in targets)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
