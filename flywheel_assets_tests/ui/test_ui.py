"""The Dagster UI in a real browser: `dg dev` on loopback over a FLYWHEEL_HOME holding a
finished A/B test, and Debian's headless chromium through the asset graph, the catalog,
the ab_report page with its decision and chart, and a table asset's page.

Screenshots go to a temporary folder, or to FLYWHEEL_SCREENSHOTS when set (README's
are refreshed with FLYWHEEL_SCREENSHOTS=docs/screenshots).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from flywheel_assets.defs.experiments.assets import ab_report
from flywheel_assets.defs.feedback.assets import trajectory_scores
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.experiments.rollout import advance
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import AB_RESULTS, TRAJECTORY_SCORES
from flywheel_assets_tests.experiments.test_rollout import T0, _gate, _traffic
from flywheel_assets_tests.ui.browser import Chromium

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["simulation", "ingest", "feedback", "curation", "training", "evaluation", "experiments"]
CYCLE = "cycle-0001"
CANDIDATE = f"{CYCLE}-lora"
START_TIMEOUT_S = 180  # dg dev loads the code location (torch included) before it serves


def finished_ab_test(home: Path) -> list[dict]:
    """A good candidate rolled out look by look (gate → canary → A/B → SHIP) in a scratch
    lake; only its ab_results rows are copied to `home`, so the registry there stays empty
    and dg dev's sensors find nothing to launch while the browser looks around."""
    scratch = load_config(home / "scratch")
    scratch.ab.min_users_per_arm, scratch.ab.planned_users = 60, 2000
    scratch.rollout.canary_min_users = 10
    scratch.rollout.canary_share, scratch.rollout.treatment_share = 0.05, 0.3
    lake = Lake(scratch)
    clock = {"now": T0}
    registry = ModelRegistry(lake, clock=lambda: clock["now"])
    registry.register("base", base="base", base_path="models/base", reason="start", actor="test")
    registry.register(CANDIDATE, base="base", base_path="models/base", adapter_path="models/c1", parent="base",
                      cycle=CYCLE, reason="trained", actor="test")
    _gate(lake, CANDIDATE, CYCLE, True)
    rows: list[dict] = []
    for day in range(10):
        clock["now"] = T0 + timedelta(days=day, hours=23)
        rows += advance(scratch, lake, registry, clock["now"])
        if rows and rows[-1]["outcome"] == "SHIP":
            break
        # 1,500 users a day: the guardrails' σ floor (ab.sigma_floor) needs that many to show a
        # zero-variance metric within its margin
        _traffic(lake, registry, T0 + timedelta(days=day + 1), 1500, {"base": 0.3, CANDIDATE: 0.37}, seed=day)
    Lake(load_config(home)).append(AB_RESULTS, pa.Table.from_pylist(rows, schema=AB_RESULTS.schema))
    return rows


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DagsterDev:
    """`dg dev` as `make dev` starts it, in its own process group so the webserver, the
    daemon and the code server all go down with it."""

    def __init__(self, home: Path, dagster_home: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k not in ("FLYWHEEL_CONFIG", "FLYWHEEL_LLM_JUDGE_URL")}
        env.update(FLYWHEEL_HOME=str(home), DAGSTER_HOME=str(dagster_home))
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "dg"), "dev", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_until_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dg dev exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as reply:
                    if reply.status == 200 and "dagster_version" in json.load(reply):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"dg dev did not serve {self.url} within {timeout_s} s; its log:\n{self.log()}")

    def stop(self) -> None:
        """The whole group at once: a graceful shutdown takes dagster dev ~10 s and saves nothing
        worth keeping in a temporary home."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("Debian's chromium is not installed; `make test` installs it where apt-get can run as root "
                    "(apt-get install --no-install-recommends chromium)")
    return binary


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("FLYWHEEL_SCREENSHOTS")
    return Path(folder).resolve() if folder else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def ui(chromium_binary, tmp_path_factory):
    """(base url, browser) over a home whose ab_report[cycle-0001] was materialized while
    dg dev started up."""
    home = tmp_path_factory.mktemp("ui-home")
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    # nux: the community sign-up dialog a loopback UI shows once would cover the pages.
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        # This creates the instance's databases: dg dev creating them at the same time would collide.
        instance.add_dynamic_partitions("cycle", [CYCLE])
    server = DagsterDev(home, dagster_home, home / "dg-dev.log")
    browser = None
    try:
        finished_ab_test(home)  # while dg dev starts up
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            result = dg.materialize([ab_report], partition_key=CYCLE, instance=instance,
                                    resources={"flywheel": FlywheelResource(home=str(home))})
        assert result.success
        server.wait_until_serving(START_TIMEOUT_S)
        browser = Chromium(chromium_binary, home / "chromium-profile")
        yield server.url, browser
    finally:
        if browser is not None:
            browser.close()
        server.stop()


def test_asset_graph_shows_every_stage(ui, screenshots):
    url, browser = ui
    expanded = ",".join(f"global@global:{stage}" for stage in STAGES)  # what "Expand all groups" puts there
    browser.goto(f"{url}/asset-groups?expanded={urllib.parse.quote(expanded)}")
    # The code location loads after the webserver answers: the first page waits longest.
    browser.wait_for_text(["Global asset lineage", *STAGES], timeout_s=90)
    browser.wait_for_text(["session_events", "trajectory_scores", "training_dataset", "lora_adapter", "ab_report"])
    sidebar = browser.evaluate("[...document.querySelectorAll('button')].map(b => b.innerText.split('\\n')[0])")
    assert set(STAGES) <= set(sidebar)
    browser.screenshot(screenshots / "asset-graph.png")


def test_catalog_lists_assets_with_descriptions_and_groups(ui, screenshots):
    url, browser = ui
    browser.goto(f"{url}/assets")
    text = browser.wait_for_text(["ab_report", "trajectory_scores", "lora_adapter"])
    assert "Staged rollout and A/B test of the cycle's candidate" in text
    assert all(stage in text for stage in STAGES)
    browser.wait_for("!document.body.innerText.includes('Loading')", "every asset's status")
    browser.screenshot(screenshots / "catalog.png")


def _metadata_value(browser: Chromium, key: str):
    return browser.evaluate(f"""(() => {{
        const row = [...document.querySelectorAll('tr')].find(r => r.cells.length >= 3
            && r.cells[0].innerText.trim() == {json.dumps(key)});
        return row ? row.cells[row.cells.length - 1].innerText.trim() : null; }})()""")


def test_ab_report_page_shows_the_decision_and_the_chart(ui, screenshots):
    url, browser = ui
    browser.goto(f"{url}/assets/ab_report")
    browser.wait_for_text(["Latest materialization", "decision", "SHIP"])
    assert _metadata_value(browser, "decision") == "SHIP"
    assert _metadata_value(browser, "reason").startswith("Treatment is better")
    assert _metadata_value(browser, "looks") == "3"  # gate, canary, the A/B look that shipped
    browser.screenshot(screenshots / "ab-report.png")

    # A chart is too long to show inline; the row links to it, and the dialog renders the PNG.
    browser.evaluate("""[...document.querySelectorAll('tr')].find(r => r.cells[0].innerText.trim() == 'chart')
        .querySelector('a').click()""")
    size = browser.wait_for("""(() => {
        const image = [...document.images].find(i => i.src.startsWith('data:image/png;base64,'));
        return image && image.complete && image.naturalWidth > 0 ? [image.naturalWidth, image.naturalHeight] : null;
        })()""", "the chart's image to load")
    assert size == [700, 350]  # ab_chart's 7 × 3.5 in at 100 dpi, decoded by the browser
    assert browser.evaluate("[...document.images].find(i => i.src.startsWith('data:image/png')).alt") == \
        f"A/B effect of {CANDIDATE} over time"
    browser.screenshot(screenshots / "ab-report-chart.png")


def test_a_table_asset_page_documents_its_columns(ui, screenshots):
    url, browser = ui
    browser.goto(f"{url}/assets/trajectory_scores")
    text = browser.wait_for_text(["Columns", "combined_score", "Never materialized"])
    assert next(iter(trajectory_scores.specs)).description in text
    assert all(name in text and doc in text for name, _, doc in TRAJECTORY_SCORES.columns)
    assert "feedback" in text and "delta" in text  # its stage and its kinds
    browser.screenshot(screenshots / "trajectory-scores.png")
