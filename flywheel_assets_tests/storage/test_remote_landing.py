"""The landing zone on object storage (FLYWHEEL_LANDING_URI, moto's S3 server): agents write objects,
the sensor sees them, every line ends in a table once whichever machine ingests, a machine lost
between the copy and the commit loses nothing, and forget scrubs the objects too."""

from __future__ import annotations

import gzip
import json
import shutil
import time

import pytest
from typer.testing import CliRunner

from flywheel_assets.cli import app
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.ingest.remote_landing import RemoteLanding, local_relative, pull, remote_landing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import INGESTED_FILES, SESSION_EVENTS, TRAJECTORIES
from flywheel_assets_tests.helpers import landing_sensor_ticks
from flywheel_assets_tests.ingest.test_ingest import event
from flywheel_assets_tests.privacy.test_forget import SECRET, _event, _trajectory
from flywheel_assets_tests.storage.s3_server import BUCKET, prefix_in_env, s3  # noqa: F401  (the fixture)


@pytest.fixture
def bucket(s3, monkeypatch):
    """(client, prefix): a landing bucket of its own, as the environment names it."""
    return s3[0], prefix_in_env(s3, monkeypatch, "landing", "FLYWHEEL_LANDING_URI")


def _put(client, key: str, lines: list, compressed: bool = False) -> None:
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    client.put_object(Bucket=BUCKET, Key=key, Body=gzip.compress(body) if compressed else body)


def test_objects_are_ingested_once_whichever_machine_ingests_and_a_lost_copy_loses_nothing(
        bucket, home, config, lake, tmp_path_factory):
    client, prefix = bucket
    _put(client, f"{prefix}/events/2026/12/05/part-0001.jsonl", [event(i) for i in range(5)])
    _put(client, f"{prefix}/events/part-0002.jsonl.gz", [event(i) for i in range(3, 9)], compressed=True)
    _put(client, f"{prefix}/events/part-0003.jsonl.tmp", [event(99)])  # still being written: not ready
    _put(client, f"{prefix}/other/notes.jsonl", [event(98)])  # not a landing kind
    _put(client, f"{prefix}/events/../../escape.jsonl", [event(97)])  # a key that would climb out: ignored
    # as Kafka Connect's S3 sink names its objects (topic routed to "events")
    _put(client, f"{prefix}/events/partition=0/events+0+0000000000.json.gz", [event(i) for i in range(20, 24)],
         compressed=True)

    tick = landing_sensor_ticks(home)
    first = tick(None)
    assert [r.tags["flywheel/files"] for r in first.run_requests] == ["3"]  # the bucket's ready objects
    report = ingest_landing(config, lake, log=lambda _: None)
    assert report.pulled == 3 and report.rows_new["events"] == 13 and sum(report.duplicates.values()) == 2
    assert (config.landing / "events" / "from-bucket-json" / "partition=0" / "events+0+0000000000.jsonl.gz").is_file()
    assert not (home.parent / "escape.jsonl").exists() and not list(home.rglob("escape.jsonl"))
    # (whatever the server made of that key: the mapping itself refuses to climb or to skip a part)
    assert [local_relative(key) for key in ("events/../../escape.jsonl", "events//a.jsonl", "events/./a.jsonl",
                                            "events/a.jsonl", "events/p=0/a.json", "other/a.jsonl")] == [
        None, None, None, "events/from-bucket/a.jsonl", "events/from-bucket-json/p=0/a.jsonl", None]
    copy = config.landing / "events" / "from-bucket" / "2026" / "12" / "05" / "part-0001.jsonl"
    info = remote_landing().fs.get_file_info(f"{BUCKET}/{prefix}/events/2026/12/05/part-0001.jsonl")
    assert copy.stat().st_mtime_ns == info.mtime_ns and copy.stat().st_size == info.size  # the ledger's key
    assert tick(first.cursor).run_requests == []  # nothing pending: the ledger holds both objects
    assert ingest_landing(config, lake, log=lambda _: None).pulled == 0

    # another machine, its own (empty) landing zone, the same lake: nothing copied, nothing added
    other = load_config(tmp_path_factory.mktemp("other"))
    other_lake = Lake(other, root=lake.root)
    assert ingest_landing(other, other_lake, log=lambda _: None).pulled == 0
    assert lake.row_count(SESSION_EVENTS) == 13

    # a new object copied in by a machine that is then lost before its ingest committed: the object
    # is still in the bucket, so the next ingest anywhere copies and ingests it
    _put(client, f"{prefix}/trajectories/t.jsonl", [_trajectory("t-gone-1", "s1", "u1", "hello")])
    assert pull(config, lake, log=lambda _: None) == 1
    shutil.rmtree(config.landing)  # the machine and its volume are gone
    again = ingest_landing(other, other_lake, log=lambda _: None)
    assert again.pulled == 1 and again.rows_new["trajectories"] == 1
    assert lake.row_count(TRAJECTORIES) == 1
    assert sorted(r["source_file"] for r in lake.read(INGESTED_FILES).to_pylist()) == [
        "events/from-bucket-json/partition=0/events+0+0000000000.jsonl.gz", "events/from-bucket/2026/12/05/part-0001.jsonl",
        "events/from-bucket/part-0002.jsonl.gz", "trajectories/from-bucket/t.jsonl"]


def test_forget_scrubs_the_landing_buckets_objects_and_they_are_not_ingested_again(bucket, home, config, lake,
                                                                                  monkeypatch):
    client, prefix = bucket
    _put(client, f"{prefix}/trajectories/a.jsonl", [_trajectory("t-gone-1", "s-gone-1", "user-gone", SECRET),
                                                    _trajectory("t-kept-1", "s-kept-1", "user-kept", "kept")])
    _put(client, f"{prefix}/events/b.jsonl.gz", [_event("e-gone-1", "s-gone-1", "user-gone", "t-gone-1"),
                                                 _event("e-kept-1", "s-kept-1", "user-kept", "t-kept-1")],
         compressed=True)
    ingest_landing(config, lake, log=lambda _: None)
    # an object not ingested yet holds the user's data too
    _put(client, f"{prefix}/events/c.jsonl", [_event("e-gone-2", "s-gone-1", "user-gone", "t-gone-1",
                                                     "output_edited", edited_answer=SECRET)])
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    time.sleep(1.1)  # LastModified has whole seconds here: an object rewritten now gets another one
    # a forget killed halfway through the bucket (an upload failing after the first): run again, it
    # must find the objects not yet uploaded unscrubbed in the bucket, whatever their local copies
    calls = []

    def failing(self, path, key):
        calls.append(key)
        if len(calls) > 1:
            raise OSError("connection reset")
        return upload(self, path, key)

    upload = RemoteLanding.upload
    monkeypatch.setattr(RemoteLanding, "upload", failing)
    assert CliRunner().invoke(app, ["forget", "--user", "user-gone", "--json"]).exit_code != 0
    # the object it did upload (the first in order, the gzip one: blanking changed its size) has its
    # ledger row moved already, so it is not taken for a new file
    uploaded = calls[0].rsplit("/", 1)[-1]
    assert uploaded == "b.jsonl.gz"
    ledger = lake.read(INGESTED_FILES, filter_sql="source_file = 'events/from-bucket/b.jsonl.gz'").to_pylist()
    assert [(row["size_bytes"], row["mtime_ns"]) for row in ledger] == [remote_landing().listed(f"events/{uploaded}")]
    monkeypatch.setattr(RemoteLanding, "upload", upload)
    result = CliRunner().invoke(app, ["forget", "--user", "user-gone", "--json"])
    assert result.exit_code == 0, result.output
    assert not list((home / "privacy").glob(".bucket-*"))  # no download of the user's text left behind

    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    bodies = {item["Key"]: client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read() for item in listed}
    plain = {key: gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body for key, body in bodies.items()}
    assert len(plain) == 3 and not [key for key, body in plain.items() if SECRET.encode() in body]
    assert b"t-kept-1" in plain[f"{prefix}/trajectories/a.jsonl"]
    assert not [p for p in config.landing.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    # the rewritten objects are the ledger's files still; the one not ingested yet (copied in by the
    # forget, blanked, uploaded back) comes in with nothing left to add
    report = ingest_landing(config, lake, log=lambda _: None)
    assert report.pulled == 0 and [f["file"] for f in report.files] == ["events/from-bucket/c.jsonl"]
    assert report.rows_new["events"] == 0
    assert lake.read(TRAJECTORIES, filter_sql="user_id = 'user-gone'").num_rows == 0
    assert lake.read(SESSION_EVENTS, columns=["event_id"]).column("event_id").to_pylist() == ["e-kept-1"]
    assert landing_sensor_ticks(home)(None).run_requests == []
