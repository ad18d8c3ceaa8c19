"""Hot and cold tiers: a move changes no row any reader sees (any version, Lake or the DuckDB
catalog), a move stopped between its two commits shows each row once and is finished by the next,
deletes reach the cold tier, and the incremental refreshes take a move as harmless."""

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from flywheel_assets.lib.catalog import refresh_catalog
from flywheel_assets.lib.feedback.refresh import _rewrites
from flywheel_assets.lib.lake import COLD_URI_PROPERTY, TIER_MARK, ColdTierMissing, Lake, conform
from flywheel_assets.lib.storage import tiers
from flywheel_assets.lib.storage.maintenance import footprint, maintain
from flywheel_assets.lib.tables import SESSION_EVENTS

DAY0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _events(day: int, n: int = 50) -> pa.Table:
    at = DAY0 + timedelta(days=day)
    return conform(pa.Table.from_pylist([{
        "event_id": f"e{day}-{i}", "session_id": f"s{(i * 7919 + day) % 97:03d}", "user_id": f"u{i % 9}",
        "tenant_id": "acme", "event_type": "output_accepted", "ts": at, "data_json": "{}" + "x" * 40,
        "ingested_at": at + timedelta(seconds=i)} for i in range(n)]), SESSION_EVENTS)


def _ids(table: pa.Table) -> list[str]:
    return sorted(table.column("event_id").to_pylist())


@pytest.fixture
def tiered(lake):
    for day in range(4):
        lake.append(SESSION_EVENTS, _events(day))
    return lake


def test_a_move_changes_no_row_read_at_any_version(tiered):
    lake = tiered
    before_version, everything = lake.version(SESSION_EVENTS), _ids(lake.read(SESSION_EVENTS))
    moved = tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=2))
    assert moved.rows == 100 and not moved.finished_stopped
    hot = lake.read(SESSION_EVENTS, hot_only=True)
    assert hot.num_rows == 100 and pa.compute.min(hot.column("ingested_at")).as_py() >= DAY0 + timedelta(days=2)
    assert _ids(lake.read(SESSION_EVENTS)) == everything and lake.row_count(SESSION_EVENTS) == 200
    assert _ids(lake.read(SESSION_EVENTS, version=before_version)) == everything  # time travel: no row twice
    assert lake.row_count(SESSION_EVENTS, before_version) == 200
    # a filter and a prune read both tiers
    assert lake.read(SESSION_EVENTS, filter_sql="ts < TIMESTAMPTZ '2026-11-02'", prune="ts < '2026-11-02'").num_rows == 50

    # a file a day of ingestion: zstd, sorted by session_id
    cold_files = list(Path(lake.cold_uri(SESSION_EVENTS)).glob("*.parquet"))
    assert len(cold_files) == 2
    for path in cold_files:
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        sessions = pq.read_table(path).column("session_id").to_pylist()
        assert sessions == sorted(sessions)

    # a second move takes the next day only; the first version still reads as it was
    second = tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=3))
    assert second.rows == 50 and _ids(lake.read(SESSION_EVENTS)) == everything
    assert _ids(lake.read(SESSION_EVENTS, version=before_version)) == everything
    assert tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=3)).rows == 0  # nothing left to move


def test_a_stopped_move_shows_each_row_once_and_the_next_finishes_it(tiered, home):
    lake = tiered
    everything = _ids(lake.read(SESSION_EVENTS))
    cutoff = DAY0 + timedelta(days=2)
    # the cold commit of a first move (its location recorded first), then a kill before its hot commit
    lake.delta(SESSION_EVENTS).alter.set_table_properties({COLD_URI_PROPERTY: lake.cold_uri(SESSION_EVENTS)},
                                                          raise_if_not_exists=False)
    old = lake.read(SESSION_EVENTS, filter_sql="ingested_at < TIMESTAMPTZ '2026-11-03'", hot_only=True)
    # (one row short: a row the cold commits missed must not be lost by the finish)
    write_deltalake(lake.cold_uri(SESSION_EVENTS), old.slice(1), mode="append",
                    commit_properties=tiers._commit(tiers.to_micros(cutoff)))
    assert _ids(lake.read(SESSION_EVENTS)) == everything and lake.row_count(SESSION_EVENTS) == 200
    con = duckdb.connect(str(home / "flywheel.duckdb"))
    refresh_catalog(con, lake)
    assert con.execute("SELECT count(*), count(DISTINCT event_id) FROM session_events").fetchone() == (200, 200)
    assert lake.cold(SESSION_EVENTS).to_pyarrow_dataset().count_rows() == 99

    finished = tiers.move_to_cold(lake, SESSION_EVENTS, cutoff)
    assert finished.finished_stopped and finished.rows == 100
    assert lake.delta(SESSION_EVENTS).transaction_version(TIER_MARK) == tiers.to_micros(cutoff)
    assert lake.read(SESSION_EVENTS, hot_only=True).num_rows == 100
    assert lake.cold(SESSION_EVENTS).to_pyarrow_dataset().count_rows() == 100
    assert _ids(lake.read(SESSION_EVENTS)) == everything
    assert con.execute("SELECT count(*), count(DISTINCT event_id) FROM session_events").fetchone() == (200, 200)


def test_deletes_and_history_purges_reach_the_cold_tier(tiered):
    lake = tiered
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=2))
    # u3's rows: in both tiers
    assert lake.delete_where(SESSION_EVENTS, "user_id = 'u3'") == 24  # 6 a day
    assert lake.read(SESSION_EVENTS, filter_sql="user_id = 'u3'").num_rows == 0
    lake.purge_history(SESSION_EVENTS)
    with pytest.raises(Exception):  # no earlier cold version to travel back to
        DeltaTable(lake.cold_uri(SESSION_EVENTS), version=0)
    for path in Path(lake.cold_uri(SESSION_EVENTS)).glob("*.parquet"):
        assert "u3" not in pq.read_table(path).column("user_id").to_pylist()


def test_a_refresh_takes_a_move_and_a_z_order_as_harmless(tiered):
    lake = tiered
    folded = lake.version(SESSION_EVENTS)
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=2))
    assert tiers.zorder(lake, SESSION_EVENTS) is True
    assert tiers.zorder(lake, SESSION_EVENTS) is False  # nothing appended since
    assert _rewrites(lake.delta(SESSION_EVENTS), folded) is None
    lake.delete_where(SESSION_EVENTS, "user_id = 'u3'")  # a forget is not harmless
    assert _rewrites(lake.delta(SESSION_EVENTS), folded) is not None


def test_maintenance_moves_z_orders_and_reports_the_cold_tier(tiered, config):
    lake = tiered
    everything = _ids(lake.read(SESSION_EVENTS))
    done = {u.table: u for u in maintain(config, lake, retention_hours=0,
                                         cold_before=DAY0 + timedelta(days=3)).tables}
    events = done["bronze/session_events"]
    assert events.moved.rows == 150 and events.zordered and events.cold_files == 1
    assert (events.files_after, events.bytes_after) == footprint(lake, SESSION_EVENTS)
    assert _ids(lake.read(SESSION_EVENTS)) == everything
    sessions = lake.read(SESSION_EVENTS, hot_only=True).column("session_id").to_pylist()
    assert sessions == sorted(sessions)  # one column's Z-order is its sort


def test_the_cold_tier_is_found_where_it_was_put_or_reads_fail(tiered, monkeypatch, tmp_path):
    lake = tiered
    monkeypatch.setenv("FLYWHEEL_COLD_URI", str(tmp_path / "cheap"))
    moved = Lake(lake.config)
    tiers.move_to_cold(moved, SESSION_EVENTS, DAY0 + timedelta(days=2))
    monkeypatch.delenv("FLYWHEEL_COLD_URI")
    elsewhere = Lake(lake.config)  # a process without the variable: the hot table says where the rows went
    assert elsewhere.cold_uri(SESSION_EVENTS) == str(tmp_path / "cheap" / "bronze" / "session_events")
    assert elsewhere.row_count(SESSION_EVENTS) == 200 and elsewhere.delete_where(SESSION_EVENTS, "user_id = 'u3'") == 24
    (tmp_path / "cheap").rename(tmp_path / "gone")
    with pytest.raises(ColdTierMissing):  # never half of the rows
        elsewhere.read(SESSION_EVENTS)


def test_a_lake_made_anew_beside_an_old_cold_tier_is_refused(tiered):
    lake = tiered
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=2))
    shutil.rmtree(lake.uri(SESSION_EVENTS))
    lake.append(SESSION_EVENTS, _events(5))
    assert lake.row_count(SESSION_EVENTS) == 50  # no mark: the old cold rows are not this table's
    with pytest.raises(tiers.ColdTierMismatch):
        tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=9))


def test_a_cut_off_inside_a_millisecond_and_a_cold_rewrite_read_each_row_once(lake):
    at = DAY0 + timedelta(microseconds=123_456)
    rows = [{"event_id": name, "session_id": name, "ingested_at": at + timedelta(microseconds=shift)}
            for name, shift in (("old", -100_000), ("edge", 0), ("new", 50_000_000))]
    lake.append(SESSION_EVENTS, conform(pa.Table.from_pylist(rows), SESSION_EVENTS))
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(microseconds=123_400))  # floored to .123000
    between = lake.version(SESSION_EVENTS)
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(seconds=1))
    lake.delete_where(SESSION_EVENTS, "event_id = 'nothing'")  # rewrites no cold file
    write_deltalake(lake.cold_uri(SESSION_EVENTS), conform(pa.table({"event_id": ["x"]}), SESSION_EVENTS).slice(0, 0),
                    mode="overwrite", predicate="event_id = 'x'")
    lake.cold(SESSION_EVENTS).optimize.compact()  # the two moves' files in one
    assert _ids(lake.read(SESSION_EVENTS, version=between)) == ["edge", "new", "old"]
    assert lake.row_count(SESSION_EVENTS, between) == 3
    assert _ids(lake.read(SESSION_EVENTS)) == ["edge", "new", "old"]


def test_a_copied_lake_reads_its_own_cold_tier(tiered, tmp_path):
    lake = tiered
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=2))
    shutil.copytree(lake.root, tmp_path / "copy")
    shutil.rmtree(lake.cold_root)  # the original's cold tier gone: the copy must not have been reading it
    copy = Lake(lake.config, root=str(tmp_path / "copy"))
    assert copy.cold_uri(SESSION_EVENTS) == f"{tmp_path / 'copy'}/cold/bronze/session_events"
    assert copy.row_count(SESSION_EVENTS) == 200 and len(copy.read(SESSION_EVENTS)) == 200


@pytest.mark.parametrize("batch_rows", [1, 4_000_000])  # a file's keys at a time, or all at once
def test_a_lookup_by_key_finds_its_rows_in_both_tiers_at_any_version(tiered, monkeypatch, batch_rows):
    from flywheel_assets.lib.storage import key_index
    from flywheel_assets.lib.storage.key_index import keyed

    monkeypatch.setattr(key_index, "KEY_BATCH_ROWS", batch_rows)
    lake = tiered
    before_version = lake.version(SESSION_EVENTS)
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=1))
    first_move = lake.version(SESSION_EVENTS)
    tiers.move_to_cold(lake, SESSION_EVENTS, DAY0 + timedelta(days=2))
    con = duckdb.connect()
    con.register("keys", pa.table({"key": ["s000", "s001", "s050", "nowhere", None]}))
    # now (hot and cold files), after the first move (its cold rows filtered out of the cold tier,
    # which holds more since), before any move (hot only)
    for version in (None, first_move, before_version):
        every = lake.read(SESSION_EVENTS, version=version)
        expected = sorted((row["event_id"], row["ts"]) for row in every.to_pylist()
                          if row["session_id"] in ("s000", "s001", "s050"))
        for _ in range(2):  # the files' key hashes computed, then read from the index
            found = keyed(con, lake, SESSION_EVENTS, "session_id", "keys", ["event_id", "ts"], version=version)
            assert found.column_names == ["event_id", "ts"]
            assert sorted(zip(*found.to_pydict().values())) == expected and len(expected) > 4
        # rows of both tiers, the cold ones older than the move
        assert {row[1] < DAY0 + timedelta(days=2) for row in expected} == {True, False}
