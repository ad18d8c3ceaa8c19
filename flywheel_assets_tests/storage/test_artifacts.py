"""Models, datasets and reports on object storage (FLYWHEEL_ARTIFACTS_URI, moto's S3 server): what one
machine trains, another serves, evaluates and trains over without a shared volume; a local copy
follows the store's generation; a forget rewrites the store's copies and leaves no byte there."""

from __future__ import annotations

import gzip
import json
import shutil
import uuid

import dagster as dg
import pytest

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.training.assets import _base_weights, lora_adapter
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.storage.artifacts import MARKER, ArtifactStore, artifact_store, local
from flywheel_assets_tests.privacy.test_forget import SECRET, trained_home  # noqa: F401  (the fixture)
from flywheel_assets_tests.storage.s3_server import BUCKET, prefix_in_env, s3  # noqa: F401  (the fixture)


@pytest.fixture
def store_env(s3, monkeypatch):
    """An artifact store of its own under the test bucket, as the environment names it."""
    return prefix_in_env(s3, monkeypatch, "artifacts", "FLYWHEEL_ARTIFACTS_URI")


def _objects(client, prefix: str) -> dict[str, bytes]:
    found, token = {}, None
    while True:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        for item in listed.get("Contents", []):
            found[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        if not listed.get("IsTruncated"):
            return found
        token = listed["NextContinuationToken"]


def test_a_folder_is_fetched_whole_and_follows_the_stores_generation(s3, tmp_path):
    _, options = s3
    uri = f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}"
    writer, reader = ArtifactStore(tmp_path / "a", uri, json.loads(options)), \
        ArtifactStore(tmp_path / "b", uri, json.loads(options))
    folder = tmp_path / "a" / "models" / "v1"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 10_000)
    (folder / "sub" / "card.json").write_text('{"n": 1}')
    (folder / ".v1.tmp").mkdir()
    (folder / ".v1.tmp" / "half").write_text("a half-made staging folder is never published")
    writer.publish(folder)
    # its merged weights: published on their own, later; the folder's generation does not change
    merged = folder / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    writer.publish(merged)

    copy = tmp_path / "b" / "models" / "v1"
    assert not copy.exists()
    assert reader.fetch(copy) == copy
    assert (copy / "weights.bin").read_bytes() == b"w" * 10_000 and (copy / "sub" / "card.json").read_text() == '{"n": 1}'
    assert not (copy / ".v1.tmp").exists() and not (copy / "merged").exists()  # merged is fetched when named
    assert json.loads((copy / MARKER).read_text()) == json.loads((folder / MARKER).read_text())
    assert (reader.fetch(copy / "merged") / "config.json").read_text() == "{}"
    assert not [p for p in copy.rglob("*") if p.name.startswith(".flywheel-pull-")]  # no temporary copy left

    # a rewrite on the writer's side (a forget) is a new generation: the reader's copy follows it
    (folder / "sub" / "card.json").write_text('{"n": 2}')
    writer.publish(folder)
    reader.fetch(copy)
    assert (copy / "sub" / "card.json").read_text() == '{"n": 2}'
    # a single file: current when its size and mtime are the store's
    report = tmp_path / "a" / "reports" / "velocity.json"
    report.parent.mkdir()
    report.write_text("[1]")
    writer.publish(report)
    assert reader.fetch(tmp_path / "b" / "reports" / "velocity.json").read_text() == "[1]"
    report.write_text("[1, 2]")
    writer.publish(report)
    assert reader.fetch(tmp_path / "b" / "reports" / "velocity.json").read_text() == "[1, 2]"
    # what the store does not hold is left as it is (a Hugging Face id as base_path, a local-only file)
    assert reader.fetch(tmp_path / "b" / "models" / "nothing") == tmp_path / "b" / "models" / "nothing"
    assert reader.listing(tmp_path / "b" / "models") == sorted([
        tmp_path / "b" / "models" / "v1" / name for name in ("merged/config.json", "sub/card.json", "weights.bin")])


def test_a_model_store_outside_home_is_left_where_it_is(s3, store_env, home, tmp_path_factory):
    from flywheel_assets.lib.storage.artifacts import ensure_published, publish

    client, _ = s3
    outside = tmp_path_factory.mktemp("shared-models") / "v1"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"w")
    publish(home, outside)
    ensure_published(home, outside)
    assert local(home, str(outside)) == outside and artifact_store(home).listing(outside) == []
    assert _objects(client, store_env) == {}  # nothing uploaded, nothing raised


@pytest.fixture
def stored_home(store_env, trained_home):
    return trained_home


def test_another_machine_serves_and_trains_over_the_champion_from_the_store(s3, store_env, stored_home, home,
                                                                            config, lake, tmp_path_factory):
    from flywheel_assets.lib.gateway.backends import _load_version

    client, _ = s3
    keys = _objects(client, store_env)
    assert {f"{store_env}/models/c1-lora/{MARKER}", f"{store_env}/datasets/c1/train.jsonl",
            f"{store_env}/datasets/c1/{MARKER}"} <= set(keys)
    assert any(key.startswith(f"{store_env}/models/base-") and key.endswith(MARKER) for key in keys)

    # a second machine: the same lake, its own empty FLYWHEEL_HOME, no shared volume
    other = tmp_path_factory.mktemp("other-machine")
    shutil.copytree(home / "lake", other / "lake")  # (the lake is shared; here a copy stands for it)
    shutil.copy(home / "config.json", other / "config.json")
    champion = ModelRegistry(lake).champion()
    assert champion["version"] == "c1-lora"
    model, tokenizer = _load_version(other, champion)  # the gateway's loader
    assert (other / champion["adapter_path"] / "adapter_config.json").exists() and model is not None

    # a cycle trained there over the champion: the merged weights it sits on are made and published
    resources = {"flywheel": FlywheelResource(home=str(other), config_path=str(other / "config.json"))}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("cycle", ["c2"])
    from flywheel_assets.defs.curation.assets import training_dataset

    assert dg.materialize([training_dataset, lora_adapter], partition_key="c2", resources=resources,
                          instance=instance).success
    c2 = ModelRegistry(lake.__class__(config.model_copy(update={"home": other}), root=str(other / "lake"))).get("c2-lora")
    assert c2["base_path"] == "models/c1-lora/merged"
    keys = set(_objects(client, f"{store_env}/models/"))
    assert {f"{store_env}/models/c1-lora/merged/{MARKER}", f"{store_env}/models/c2-lora/{MARKER}"} <= keys
    # and back on the first machine, which never had it: c2 loads from the store
    shutil.rmtree(home / "models" / "c1-lora" / "merged", ignore_errors=True)
    assert _load_version(home, c2)[0] is not None
    assert (home / "models" / "c1-lora" / "merged" / "config.json").exists()
    assert _base_weights(config, ModelRegistry(lake).get("c1-lora")) == home / "models" / "c1-lora" / "merged"


def test_forget_rewrites_the_stores_copies_and_leaves_no_byte_there(s3, store_env, stored_home, home, monkeypatch):
    from typer.testing import CliRunner

    from flywheel_assets.cli import app

    client, _ = s3
    before = [key for key, data in _objects(client, store_env).items() if SECRET.encode() in _plain(data)]
    assert f"{store_env}/datasets/c1/train.jsonl" in before
    # a copy only the store holds (another machine trained it): the forget finds it there too
    shutil.rmtree(home / "models" / "c1-lora")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(home / "config.json"))
    result = CliRunner().invoke(app, ["forget", "--user", "user-gone", "--json"])
    assert result.exit_code == 0, result.output
    stored = _objects(client, store_env)
    assert [key for key, data in stored.items() if SECRET.encode() in _plain(data)] == []
    ids = json.loads(stored[f"{store_env}/models/c1-lora/trajectory_ids.json"])
    assert "t-gone-1" not in ids and "t-kept-1" in ids
    assert json.loads(stored[f"{store_env}/models/c1-lora/{MARKER}"]) == json.loads(
        (home / "models" / "c1-lora" / MARKER).read_text())  # published again whole: a new generation
    store = artifact_store(home)
    assert store is not None and (local(home, "models/c1-lora") / "adapter_config.json").exists()


def _plain(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
