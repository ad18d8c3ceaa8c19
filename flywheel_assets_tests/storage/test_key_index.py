"""Lookups by key through the key index (lib/storage/key_index.py) find exactly the rows a scan
finds, at any version, by a scalar or a list column, however many files a batch holds, through
each file's index or a merged run; an index or run that lies or is damaged costs a read, never a
row; maintenance deletes the index of files no table holds."""

import os

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.storage import key_index, merged_run
from flywheel_assets.lib.storage.key_index import keyed
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, FORGET_REQUESTS


def _rows(day: int, n: int = 40) -> pa.Table:
    rng = np.random.default_rng(day)
    keys = [None if i % 11 == 0 else rng.integers(0, 300, 4).tolist() for i in range(n)]
    return conform(pa.table({
        "trajectory_id": [f"t{day}-{i}" for i in range(n)],
        "created_day": [f"2026-11-0{1 + day % 3}" for _ in range(n)],  # partitions: several files a version
        "lsh_keys": pa.array(keys, pa.list_(pa.int64())),
        "messages_json": ["[]"] * n}), CURATED_TRAJECTORIES)


@pytest.fixture
def curated(lake):
    versions = []
    for day in range(8):
        lake.append(CURATED_TRAJECTORIES, _rows(day))
        versions.append(lake.version(CURATED_TRAJECTORIES))
    return lake, versions


def _scan(lake, column, wanted, version=None) -> list:
    rows = lake.read(CURATED_TRAJECTORIES, version=version).to_pylist()
    if column == "lsh_keys":
        found = [row for row in rows if set(row["lsh_keys"] or ()) & set(wanted)]
    else:
        found = [row for row in rows if row[column] in wanted]
    return sorted((row["trajectory_id"], tuple(row["lsh_keys"] or ())) for row in found)


def _look_up(lake, column, wanted, version=None) -> list:
    con = duckdb.connect()
    con.register("keys", pa.table({"key": pa.array([*wanted, None], CURATED_TRAJECTORIES.schema.field(
        column).type.value_type if column == "lsh_keys" else pa.string())}))
    found = keyed(con, lake, CURATED_TRAJECTORIES, column, "keys", ["trajectory_id", "lsh_keys"], version)
    assert found.column_names == ["trajectory_id", "lsh_keys"]
    return sorted((row["trajectory_id"], tuple(row["lsh_keys"] or ())) for row in found.to_pylist())


def _index_files(lake, column):
    folder = key_index._folder(lake, CURATED_TRAJECTORIES, column)
    return sorted(folder.glob("*.npy")) if folder.is_dir() else []


@pytest.mark.parametrize("batch, few", [
    (1, 0), (50, 0), (16_000_000, 0),  # every hash tested: a file's hashes at a time, a few files, all at once
    (50, 4_096),  # each file's sorted hashes searched for the few keys
])
def test_a_lookup_finds_what_a_scan_finds_at_any_version(curated, monkeypatch, batch, few):
    monkeypatch.setattr(key_index, "KEY_BATCH_ROWS", batch)
    monkeypatch.setattr(key_index, "FEW_KEYS", few)
    if few:  # the search alone answers
        monkeypatch.setattr(key_index, "_Hashes", None)
    lake, versions = curated
    files = len(lake.dataset(CURATED_TRAJECTORIES).files)
    ids = ["t0-3", "t2-39", "t4-0", "t4-11", "nowhere"]
    keys = [7, 150, 299, 1000, *range(40, 46)]
    for version in (None, versions[1]):
        for _ in range(2):  # the files' hashes computed, then read from the index
            assert _look_up(lake, "trajectory_id", ids, version) == _scan(lake, "trajectory_id", ids, version)
            found = _look_up(lake, "lsh_keys", keys, version)
            assert found == _scan(lake, "lsh_keys", keys, version) and len(found) > 4
    assert len(_index_files(lake, "trajectory_id")) == len(_index_files(lake, "lsh_keys")) == files >= 8
    # a file whose only hit is its first (smallest) hash is read too
    every = {row["trajectory_id"]: (row["trajectory_id"], tuple(row["lsh_keys"] or ()))
             for row in lake.read(CURATED_TRAJECTORIES).to_pylist()}
    for fragment in lake.dataset(CURATED_TRAJECTORIES).get_fragments():
        ids = fragment.to_table(columns=["trajectory_id"]).column(0)
        first = ids[int(np.argmin(pl.Series(ids).hash(key_index._SEED).to_numpy()))].as_py()
        assert _look_up(lake, "trajectory_id", [first]) == [every[first]]


@pytest.mark.parametrize("few", [0, 4_096])
def test_an_index_that_lies_costs_a_read_never_a_wrong_row(curated, monkeypatch, few):
    monkeypatch.setattr(key_index, "FEW_KEYS", few)
    lake, _ = curated
    keys = [7, 150, 299]
    expected = _scan(lake, "lsh_keys", keys)
    _look_up(lake, "lsh_keys", keys)
    stored = _index_files(lake, "lsh_keys")
    every = pa.array(range(300), pa.int64())
    claims_all = np.sort(pl.Series(every).hash(key_index._SEED).to_numpy())
    half = len(stored) // 2
    for path in stored[:half]:  # these claim every key: their files are read and matched exactly
        np.save(path, np.append(claims_all, key_index._checksum(claims_all)))
    # what a crash can leave (cut short, empty, zeroed at its length) or another writer: computed again
    stored[half].write_bytes(stored[half].read_bytes()[:100])
    stored[half + 1].write_bytes(b"")
    raw, body = stored[half + 2].read_bytes(), np.load(stored[half + 2]).nbytes
    stored[half + 2].write_bytes(raw[:len(raw) - body] + b"\0" * body)  # its header whole, its hashes zeroed
    np.save(stored[half + 3], np.zeros(3, np.int64))
    # (a process trusts a file it checked while it stays the same file: what a crash leaves, the
    # next process finds)
    monkeypatch.setattr(key_index, "_CHECKED", {})
    assert _look_up(lake, "lsh_keys", keys) == expected
    assert all(key_index._load(path) is not None for path in stored)


def test_a_checked_index_file_replaced_is_checked_again(curated):
    lake, _ = curated
    _look_up(lake, "trajectory_id", ["t0-1"])
    stored = _index_files(lake, "trajectory_id")[0]
    assert key_index._load(stored) is not None and stored in key_index._CHECKED  # checked once, then trusted
    staged = stored.with_name("replacement.npy")
    np.save(staged, np.arange(5, dtype=np.uint64))  # an array, its checksum wrong; moved in place as a writer would
    os.replace(staged, stored)
    assert key_index._load(stored) is None


def test_maintenance_deletes_the_index_of_files_no_table_holds(curated):
    lake, _ = curated
    _look_up(lake, "trajectory_id", ["t0-1"])
    before = _index_files(lake, "trajectory_id")
    generation = key_index._folder(lake, CURATED_TRAJECTORIES, "x").parents[2]
    old_scheme, old_generation = generation.parent.parent / "v0-old", generation.parent / "forgets-0-old"
    (old_scheme / "silver").mkdir(parents=True)
    (old_generation / "silver").mkdir(parents=True)
    staging = before[0].with_name(f".{before[0].name}.x.tmp")
    staging.write_bytes(b"left by a crash")
    os.utime(staging, (1, 1))
    lake.overwrite(CURATED_TRAJECTORIES, _rows(9))  # every file replaced
    _look_up(lake, "trajectory_id", ["t9-1"])
    assert key_index.prune(lake, [CURATED_TRAJECTORIES]) == len(before)
    assert not set(before) & set(_index_files(lake, "trajectory_id"))
    assert len(_index_files(lake, "trajectory_id")) == len(lake.dataset(CURATED_TRAJECTORIES).files)
    assert not old_scheme.exists() and not old_generation.exists() and not staging.exists()


def test_a_forget_recorded_anywhere_starts_a_new_index(curated):
    lake, _ = curated
    _look_up(lake, "trajectory_id", ["t0-1"])
    first = key_index._folder(lake, CURATED_TRAJECTORIES, "trajectory_id")
    assert list(first.glob("*.npy"))
    lake.append(FORGET_REQUESTS, pa.Table.from_pylist([{"request_id": "r1"}], schema=FORGET_REQUESTS.schema))
    assert _look_up(lake, "trajectory_id", ["t0-1"]) == _scan(lake, "trajectory_id", ["t0-1"])
    assert not first.parents[2].exists() and list(key_index._folder(lake, CURATED_TRAJECTORIES, "trajectory_id")
                                                   .glob("*.npy"))


def _merged_lookups_equal_scans(lake, versions) -> None:
    ids = ["t0-3", "t2-39", "t4-0", "t4-11", "t9-5", "nowhere"]
    keys = [7, 150, 299, 1000, *range(40, 46)]
    for version in (None, versions[1]):
        assert _look_up(lake, "trajectory_id", ids, version) == _scan(lake, "trajectory_id", ids, version)
        assert _look_up(lake, "lsh_keys", keys, version) == _scan(lake, "lsh_keys", keys, version)


@pytest.mark.parametrize("few", [0, 4_096])
def test_a_merged_run_answers_for_the_files_it_covers(curated, monkeypatch, few):
    """After maintenance's merge a lookup reads no covered file's own index, and finds what a scan
    finds: the files written since (loose), a covered file rewritten since (no longer read), an
    older version, equal hashes in several files across block boundaries."""
    monkeypatch.setattr(key_index, "FEW_KEYS", few)
    monkeypatch.setattr(merged_run, "BLOCK", 4)  # many blocks, equal hashes spanning them
    monkeypatch.setattr(merged_run, "GAP_BLOCKS", 0)  # each run of needed blocks read on its own
    monkeypatch.setattr(merged_run, "READ_BLOCKS", 3)  # ... and split
    monkeypatch.setattr(merged_run, "MERGE_ENTRIES", 50)  # merged a range of the hash space at a time
    lake, versions = curated
    _look_up(lake, "trajectory_id", ["t0-1"])
    _look_up(lake, "lsh_keys", [1])
    covered = {fragment.path for fragment in lake.dataset(CURATED_TRAJECTORIES).get_fragments()}
    assert key_index.merge(lake, [CURATED_TRAJECTORIES]) > 2 * 8 * 40  # both columns, every file
    lake.append(CURATED_TRAJECTORIES, _rows(9))  # loose
    lake.upsert(CURATED_TRAJECTORIES, _rows(4, n=12), partitions={"2026-11-02"})  # covered files rewritten
    read = []
    original = key_index._hashes
    monkeypatch.setattr(key_index, "_hashes", lambda fragment, *rest: read.append(fragment.path) or original(fragment, *rest))
    _merged_lookups_equal_scans(lake, versions)
    assert read and not set(read) & covered  # the covered files answered by the merged run alone
    # merged again: now it covers the files written since too
    monkeypatch.setattr(key_index, "_hashes", original)
    assert key_index.merge(lake, [CURATED_TRAJECTORIES])
    monkeypatch.setattr(key_index, "_hashes", lambda fragment, *rest: read.append(fragment.path) or original(fragment, *rest))
    read.clear()
    ids = ["t9-5", "t4-3"]
    assert _look_up(lake, "trajectory_id", ids) == _scan(lake, "trajectory_id", ids) and not read


def _run(path):
    handle = open(path, "rb")
    return handle, merged_run.MergedRun.read(handle)


def test_a_merged_run_that_fails_its_checks_is_not_used(curated, monkeypatch):
    """Whatever happens to a merged run (cut short, a block zeroed, entries or owners changed or
    swapped, ids swapped, a header's sizes changed), a lookup finds what a scan finds: the run is
    left out, its files looked up on their own; never an exception."""
    monkeypatch.setattr(merged_run, "BLOCK", 8)
    lake, versions = curated
    _look_up(lake, "lsh_keys", [1])
    _look_up(lake, "trajectory_id", ["t0-1"])
    key_index.merge(lake, [CURATED_TRAJECTORIES])
    runs = [key_index._folder(lake, CURATED_TRAJECTORIES, column) / merged_run.NAME
            for column in ("lsh_keys", "trajectory_id")]
    intact = [run.read_bytes() for run in runs]
    every = np.sort(pl.Series(pa.array(range(300), pa.int64())).hash(key_index._SEED).to_numpy())
    for damage in ("cut", "zeroed", "owner", "hash", "owners swapped", "hashes swapped", "ids swapped",
                   "files", "blocks"):
        for run, raw in zip(runs, intact):
            run.write_bytes(raw)
            handle, merged = _run(run)
            handle.close()
            entries, start, body = merged.entries, merged.start, bytearray(raw)
            owners_at, magic = start + 8 * entries, len(merged_run._MAGIC)
            if damage == "cut":
                body = body[:-5]
            elif damage == "zeroed":
                body[start:owners_at] = b"\0" * (8 * entries)
            elif damage in ("owner", "hash"):  # every owner made another file's, or every hash moved
                width, at = (4, owners_at) if damage == "owner" else (8, start)
                values = np.frombuffer(raw, np.uint32 if width == 4 else np.uint64, entries, at)
                body[at:at + width * entries] = (values + values.dtype.type(1)).tobytes()
            elif damage == "owners swapped":  # the sums of each block unchanged
                owners = np.frombuffer(raw, np.uint32, entries, owners_at).copy()
                at = next(i for i in range(entries - 1) if owners[i] != owners[i + 1] and (i + 1) % 8)
                owners[[at, at + 1]] = owners[[at + 1, at]]
                body[owners_at:owners_at + 4 * entries] = owners.tobytes()
            elif damage == "hashes swapped":
                hashes = np.frombuffer(raw, np.uint64, entries, start).copy()
                at = next(i for i in range(entries - 1) if hashes[i] != hashes[i + 1] and (i + 1) % 8)
                hashes[[at, at + 1]] = hashes[[at + 1, at]]
                body[start:owners_at] = hashes.tobytes()
            elif damage == "ids swapped":
                ids = magic + 32
                body[ids:ids + 64] = raw[ids + 32:ids + 64] + raw[ids:ids + 32]
            else:  # a header's size made huge (a bit flipped high): nothing that size is read
                at = magic + (8 if damage == "files" else 16)
                body[at:at + 8] = np.array([2**45 + 7], np.uint64).tobytes()
            assert bytes(body) != raw, damage
            run.write_bytes(bytes(body))
        _merged_lookups_equal_scans(lake, versions)
        _look_up(lake, "lsh_keys", list(range(300)))
        for run in runs:
            handle, merged = _run(run)
            with handle:
                assert merged is None or merged.holding(handle, every) is None, damage


def test_a_lookup_reads_the_run_it_opened_though_another_replaces_it(curated):
    """A merge replacing the run while a lookup reads it: the lookup goes on reading the one whose
    head it read (the new one's owners would name other files)."""
    lake, _ = curated
    _look_up(lake, "trajectory_id", ["t0-1"])
    key_index.merge(lake, [CURATED_TRAJECTORIES])
    path = key_index._folder(lake, CURATED_TRAJECTORIES, "trajectory_id") / merged_run.NAME
    handle, merged = _run(path)
    lake.upsert(CURATED_TRAJECTORIES, _rows(4, n=12), partitions={"2026-11-02"})
    key_index.merge(lake, [CURATED_TRAJECTORIES])  # other files, other owners
    with handle:
        wanted = pl.Series(["t0-3", "t7-2"]).hash(key_index._SEED).sort().to_numpy()
        found = {merged.ids[owner] for owner in merged.holding(handle, wanted)}
    files = {key_index._file_id(fragment, fragment.path): fragment
             for fragment in lake.dataset(CURATED_TRAJECTORIES, version=7).get_fragments()}
    holding = {file_id for file_id, fragment in files.items()
               if {"t0-3", "t7-2"} & set(fragment.to_table(columns=["trajectory_id"]).column(0).to_pylist())}
    assert found == holding and len(found) == 2


def test_a_merged_run_finds_every_file_of_a_hash_held_by_many(tmp_path, monkeypatch):
    """Equal hashes spanning blocks: every file holding one is found, whichever block it starts in."""
    monkeypatch.setattr(merged_run, "BLOCK", 4)
    hashes = [1, 3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 9, 9, 12, 2**64 - 1]
    merged_run.write(tmp_path / "run", [f"{i:032d}" for i in range(len(hashes))],
                           [np.array([value], np.uint64) for value in hashes])
    handle, merged = _run(tmp_path / "run")
    with handle:
        assert merged.holding(handle, np.array([5], np.uint64)) == set(range(2, 11))
        assert merged.holding(handle, np.array([0, 4, 2**63], np.uint64)) == set()
        assert merged.holding(handle, np.array([1, 9, 2**64 - 1], np.uint64)) == {0, 11, 12, 14}
