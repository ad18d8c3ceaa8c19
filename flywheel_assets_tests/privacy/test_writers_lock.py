"""A forget and the runs that write what they derived from the lake exclude each other: a curation or
training run that read a user's rows before a forget cannot write them back after it."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import dagster as dg
import pytest

from flywheel_assets.defs.curation.assets import curated_trajectories
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.ingest.lock import WRITERS_GATE, IngestBusy, holder, no_writers, writing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.privacy.forget import forget
from flywheel_assets.lib.tables import FORGET_REQUESTS


class Holder:
    """A context manager held in another thread (another open file: a real flock conflict) until released."""

    def __init__(self, lock):
        self.lock, self.entered, self.release, self.error = lock, threading.Event(), threading.Event(), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with self.lock:
                self.entered.set()
                self.release.wait(30)
        except Exception as error:  # noqa: BLE001 - handed to the test
            self.error = error
            self.entered.set()

    def stop(self):
        self.release.set()
        self.thread.join(30)


def test_writers_share_a_forget_waits_for_them_and_new_writers_queue_behind_it(tmp_path):
    landing = tmp_path / "landing"
    first = Holder(writing(landing, 5, owner="curation"))
    assert first.entered.wait(5) and first.error is None
    with writing(landing, 1, owner="training"):  # two writers at once: no conflict
        pass
    with pytest.raises(IngestBusy, match="still running"):
        with no_writers(landing, 0.3, owner="forget"):
            pass
    order: list[str] = []
    forgetting = threading.Thread(target=lambda: _hold_forget(landing, order), daemon=True)
    forgetting.start()
    # the lock file names its last holder: the forget above wrote "forget" there, this one "waiting forget"
    _wait_for_holder(landing, WRITERS_GATE, "waiting forget")  # it holds the gate and waits for `first`
    with pytest.raises(IngestBusy, match="forget"):  # a new writer queues at the gate instead of starving it
        with writing(landing, 0.3, owner="late writer"):
            pass
    late = threading.Thread(target=lambda: _write(landing, order), daemon=True)
    late.start()
    time.sleep(0.3)
    order.append("first writer done")
    first.stop()
    forgetting.join(10)
    late.join(10)
    assert order == ["first writer done", "forget", "late writer"]


def _wait_for_holder(landing, name, owner, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while (holder(landing, name) or {}).get("owner") != owner:
        assert time.monotonic() < deadline, f"{owner} never took {name}"
        time.sleep(0.02)


def _hold_forget(landing, order):
    with no_writers(landing, 10, owner="waiting forget"):
        time.sleep(0.3)
        order.append("forget")


def _write(landing, order):
    with writing(landing, 10, owner="late writer"):
        order.append("late writer")


def test_forget_waits_for_a_running_writer_and_gives_up_with_nothing_done(home):
    (home / "config.json").write_text(json.dumps({"privacy": {"lock_timeout_s": 0.3}}))
    config = load_config(home, home / "config.json")
    lake = Lake(config)
    training = Holder(writing(config.landing, 5, owner="run 1234 lora_adapter"))
    assert training.entered.wait(5)
    try:
        with pytest.raises(IngestBusy, match="still running"):
            forget(config, lake, "user-1", requested_by="dpo", now=datetime(2026, 12, 1))
        assert lake.row_count(FORGET_REQUESTS) == 0
    finally:
        training.stop()
    report = forget(config, lake, "user-1", requested_by="dpo", now=datetime(2026, 12, 1))
    assert report.passes == 1 and lake.row_count(FORGET_REQUESTS) == 1


def test_a_curation_run_waits_for_a_forget(home):
    (home / "config.json").write_text(json.dumps({"privacy": {"lock_timeout_s": 0.3}}))
    config = load_config(home, home / "config.json")
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    forgetting = Holder(no_writers(config.landing, 5, owner="forget-0001"))
    assert forgetting.entered.wait(5)
    try:
        result = dg.materialize([curated_trajectories], resources=resources, raise_on_error=False)
    finally:
        forgetting.stop()
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error.cause
    assert error.cls_name == "IngestBusy" and "flywheel forget" in error.message
