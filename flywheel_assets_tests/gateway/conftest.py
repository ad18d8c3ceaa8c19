"""A FLYWHEEL_HOME the gateway can serve: a registry with a champion and a canary (half the
users), and a gateway over it with a scripted model (the HTTP and logging rules do not
depend on what the model says; test_embedded.py serves the real one)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.gateway.app import create_app
from flywheel_assets.lib.gateway.service import Gateway
from flywheel_assets_tests.gateway.support import Scripted, register_versions


@pytest.fixture
def gateway_config(home, monkeypatch):
    def make(**settings):
        path = home / "flywheel.json"
        path.write_text(json.dumps({"gateway": {"flush_interval_s": 3600, **settings}}))
        monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))
        return load_config(home)
    return make


@pytest.fixture
def serve(gateway_config):
    """serve(**gateway settings) → (TestClient, gateway, scripted backend, API key of tenant acme)."""
    opened = []

    def make(backend=None, **settings):
        config = gateway_config(**settings)
        if not (config.lake / "gold" / "model_registry").exists():
            register_versions(config)
        backend = backend or Scripted()
        gateway = Gateway(config, backend=backend)
        key, _ = gateway.keys.create("acme")
        client = TestClient(create_app(gateway), headers={"Authorization": f"Bearer {key}"})
        client.__enter__()
        opened.append(client)
        return client, gateway, backend, key

    yield make
    for client in opened:
        client.__exit__(None, None, None)
