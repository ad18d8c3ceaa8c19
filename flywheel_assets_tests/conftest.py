"""Shared fixtures: a temporary FLYWHEEL_HOME and its config and lake."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_assets.lib.config import FlywheelConfig, load_config
from flywheel_assets.lib.lake import Lake


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.delenv("FLYWHEEL_CONFIG", raising=False)
    monkeypatch.delenv("FLYWHEEL_LLM_JUDGE_URL", raising=False)
    return tmp_path


@pytest.fixture
def config(home) -> FlywheelConfig:
    return load_config(home)


@pytest.fixture
def lake(config) -> Lake:
    return Lake(config)
