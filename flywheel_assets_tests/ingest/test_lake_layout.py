"""Many small appends stay cheap to read: compaction, statistics pruning, and the ledger read only for new files."""

from __future__ import annotations

import os

import pyarrow as pa

from flywheel_assets.lib import lake as lake_module
from flywheel_assets.lib.ingest.landing import list_landing
from flywheel_assets.lib.ingest.pipeline import ingest_landing, pending_files
from flywheel_assets.lib.tables import INGESTED_FILES, SESSION_EVENTS
from flywheel_assets_tests.helpers import write_lines


def _ledger_row(i: int) -> pa.Table:
    return pa.Table.from_pylist([{"source_file": f"events/{i}.jsonl", "kind": "events", "size_bytes": 10,
                                  "mtime_ns": 1000 + i}])


def test_appends_compact_small_files_without_changing_rows_or_versions(lake, monkeypatch):
    monkeypatch.setattr(lake_module, "COMPACT_AT", 8)
    versions = [lake.append(INGESTED_FILES, _ledger_row(i)) for i in range(20)]
    assert len(lake.delta(INGESTED_FILES).file_uris()) < 8  # 20 appends, compacted twice
    assert sorted(lake.read(INGESTED_FILES).column("mtime_ns").to_pylist()) == [1000 + i for i in range(20)]
    # each append returns its own commit, which holds exactly the rows appended so far
    assert versions == sorted(versions) and len(set(versions)) == 20
    assert lake.read(INGESTED_FILES, version=versions[9]).num_rows == 10
    assert lake.row_count(INGESTED_FILES) == 20


def test_prune_skips_files_by_statistics_and_keeps_every_matching_row(lake, monkeypatch):
    monkeypatch.setattr(lake_module, "COMPACT_AT", 10**9)
    for i in range(6):
        lake.append(INGESTED_FILES, _ledger_row(i))
    kept = lake.read(INGESTED_FILES, columns=["mtime_ns"], prune="mtime_ns >= 1004").column("mtime_ns").to_pylist()
    assert sorted(kept) == [1004, 1005]  # one row per file: the other four files are not read
    assert lake.read(INGESTED_FILES, prune="source_file = 'events/2.jsonl'").num_rows == 1
    quote = lake_module.sql_literal("it's")
    assert quote == "'it''s'" and lake.read(INGESTED_FILES, prune=f"source_file = {quote}").num_rows == 0


def test_pending_files_of_a_subset_are_those_of_the_whole_zone(config, lake):
    for i in range(6):
        path = write_lines(config.landing / "events" / f"{i}.jsonl",
                           [{"session_id": "s", "user_id": "u", "event_type": "output_accepted",
                             "ts": "2026-11-26T10:00:00Z", "event_id": f"e{i}"}])
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    every = list_landing(config.landing)
    ingest_landing(config, lake, files=every[:3], log=lambda _: None)
    assert lake.row_count(SESSION_EVENTS) == 3
    pending = pending_files(config, lake)
    assert [f.relative for f in pending] == ["events/3.jsonl", "events/4.jsonl", "events/5.jsonl"]
    for subset in (every, every[2:], every[4:], every[:2], []):
        assert pending_files(config, lake, subset) == [f for f in pending if f in subset]


def test_a_table_version_is_read_through_one_dataset_until_the_table_changes(lake):
    """A version's files never change: the dataset of the version read last is built once; another
    version, or a table deleted and made again at the same place (its versions counted from 0
    again), is read anew. One is kept a table."""
    import shutil

    from flywheel_assets.lib.lake import conform
    from flywheel_assets.lib.tables import CURATED_TRAJECTORIES

    def rows(tag: str) -> pa.Table:
        return conform(pa.table({"trajectory_id": [tag]}), CURATED_TRAJECTORIES)

    lake.append(CURATED_TRAJECTORIES, rows("a"))
    first = lake.dataset(CURATED_TRAJECTORIES)
    assert lake.dataset(CURATED_TRAJECTORIES) is first and lake.dataset(CURATED_TRAJECTORIES, version=0) is first
    lake.append(CURATED_TRAJECTORIES, rows("b"))
    assert sorted(lake.read(CURATED_TRAJECTORIES).column("trajectory_id").to_pylist()) == ["a", "b"]
    assert lake.dataset(CURATED_TRAJECTORIES, version=0) is not first  # one version kept: the last read
    assert lake.read(CURATED_TRAJECTORIES, version=0).column("trajectory_id").to_pylist() == ["a"]
    shutil.rmtree(lake.uri(CURATED_TRAJECTORIES))
    lake.append(CURATED_TRAJECTORIES, rows("c"))  # version 0 again, another table
    assert lake.read(CURATED_TRAJECTORIES).column("trajectory_id").to_pylist() == ["c"]
    assert list(lake._datasets) == [lake.uri(CURATED_TRAJECTORIES)]


def test_a_lake_checkpoints_each_tenth_version_and_a_failed_checkpoint_fails_no_write(lake, monkeypatch):
    """An open replays the JSON commits since the last checkpoint: the Lake's writes checkpoint
    each CHECKPOINT_EVERY versions (delta-rs's default: 100); a checkpoint of the Lake's that
    fails leaves the write done and reported so. (delta-rs's own post-commit checkpoint, off in
    these writes, is not made to fail here.)"""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    from flywheel_assets.lib.lake import CHECKPOINT_EVERY, conform
    from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, TRAJECTORY_SCORES

    def rows(tag: str, table) -> pa.Table:
        return conform(pa.table({"trajectory_id": [tag], "created_day": ["d"]}), table)

    for i in range(CHECKPOINT_EVERY + 2):
        lake.append(CURATED_TRAJECTORIES, rows(f"t{i}", CURATED_TRAJECTORIES))
    for i in range(CHECKPOINT_EVERY + 1):  # the upsert's append, overwrite and first write
        lake.upsert(TRAJECTORY_SCORES, rows("t" if i % 2 else f"t{i}", TRAJECTORY_SCORES))
    for table in (CURATED_TRAJECTORIES, TRAJECTORY_SCORES):
        log = os.listdir(os.path.join(lake.uri(table), "_delta_log"))
        assert f"{CHECKPOINT_EVERY:020d}.checkpoint.parquet" in log and "_last_checkpoint" in log
    assert lake.row_count(CURATED_TRAJECTORIES) == CHECKPOINT_EVERY + 2

    def fails(self):
        raise DeltaError("the disk is full")

    monkeypatch.setattr(DeltaTable, "create_checkpoint", fails)
    versions = [lake.append(CURATED_TRAJECTORIES, rows(f"u{i}", CURATED_TRAJECTORIES)) for i in range(CHECKPOINT_EVERY)]
    assert 2 * CHECKPOINT_EVERY in versions and lake.row_count(CURATED_TRAJECTORIES) == 2 * CHECKPOINT_EVERY + 2
    log = os.listdir(os.path.join(lake.uri(CURATED_TRAJECTORIES), "_delta_log"))
    assert f"{2 * CHECKPOINT_EVERY:020d}.checkpoint.parquet" not in log  # (failed, as it was made to)
