"""Edges a review found in the folding refreshes (each failed before its fix): a trajectory two
sessions end on, events without a session, an input row rewritten in place."""

from __future__ import annotations

from datetime import timedelta

from flywheel_assets.lib.tables import JUDGE_SCORES, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES
from flywheel_assets_tests.feedback.test_refresh import T0, _ingest, _refresh_all, _snapshot


def _trajectory(tid, sid, minutes=0, **extra):
    return ("trajectories", extra.pop("batch", 0), {
        "trajectory_id": tid, "session_id": sid, "task_type": "qa", "origin": "usage", "is_synthetic": False,
        "created_at": T0 + timedelta(minutes=minutes),
        "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c"}],
        "tool_calls": [], "tools_offered": [], "final_response": "a b c", **extra})


def _event(eid, sid, kind, tid=None, minutes=0, batch=0, **extra):
    return ("events", batch, {"event_id": eid, "session_id": sid, "event_type": kind, "trajectory_id": tid,
                              "ts": T0 + timedelta(minutes=minutes), "user_id": "u", "tenant_id": "default",
                              "data_json": "{}", **extra})


def _rows(lake):
    snapshot = {}
    for table in (SESSION_FEEDBACK, TRAJECTORY_SCORES):
        rows = lake.read(table).drop_columns(["updated_at"]).to_pylist()
        snapshot[table.name] = sorted(rows, key=lambda r: (r[table.key[0]] is None, r[table.key[0]] or ""))
    return snapshot


def _full_equals_incremental(lake, config):
    incremental = _rows(lake)
    _refresh_all(lake, config, full=True)
    full = _rows(lake)
    for name in full:
        assert incremental[name] == full[name], name


def test_two_sessions_with_one_final_trajectory(lake, config):
    """s1 accepts t1; s2 logs nothing and its only scored event names t1: t1 is the final
    trajectory of both sessions. trajectory_scores must still hold one row per trajectory,
    and a later event for t1 must fold in (not fail, not duplicate)."""
    world = [_trajectory("t1", "s1"),
             _event("e1", "s1", "output_accepted", "t1", 1),
             _event("e2", "s2", "retry_requested", "t1", 2)]
    _ingest(lake, world, 0)
    _refresh_all(lake, config)
    _ingest(lake, [_event("e3", "s1", "thumbs_up", "t1", 3, batch=1)], 1)
    _refresh_all(lake, config)
    ids = lake.read(TRAJECTORY_SCORES).column("trajectory_id").to_pylist()
    assert ids == ["t1"], ids
    _full_equals_incremental(lake, config)


def test_null_session_id_event_is_not_duplicated(lake, config):
    """An event row with a null session_id (appended with ingested_at, so the watermark
    sees it) in two batches: a full recompute folds both into one null-session row; the
    incremental MERGE never matches NULL = NULL and inserts a second row."""
    _ingest(lake, [_trajectory("t1", "s1"), _event("e1", "s1", "output_accepted", "t1", 1),
                   _event("n1", None, "retry_requested", None, 1)], 0)
    _refresh_all(lake, config)
    _ingest(lake, [_event("n2", None, "retry_requested", None, 2, batch=1)], 1)
    _refresh_all(lake, config)
    _full_equals_incremental(lake, config)


def test_rewritten_input_row_is_noticed(lake, config):
    """README: 'an input whose row count is not what was folded plus what is new (rows deleted
    or rewritten ...)' recomputes in full. A row rewritten in place (a Delta UPDATE: same row
    count, same ingested_at) is neither counted nor read."""
    _ingest(lake, [_trajectory("t1", None, reward=0.2)], 0)
    _refresh_all(lake, config)
    lake.delta(TRAJECTORIES).update({"reward": "0.9"}, predicate="trajectory_id = 't1'")
    _refresh_all(lake, config)  # every refresh stays incremental and reads nothing new
    _full_equals_incremental(lake, config)  # the full recompute sees reward 0.9


def test_a_few_rows_looked_up_by_key_from_a_stored_table(lake, config):
    """DuckDB pushes a small key set's range into the arrow scan as string_view bounds, which
    Arrow cannot compare with a string column (the judges' redo of flipped rows failed so)."""
    import duckdb
    import pyarrow as pa

    from flywheel_assets.lib.feedback.refresh_scores import keyed
    from flywheel_assets.lib.tables import JUDGE_SCORES
    from flywheel_assets_tests.feedback.test_refresh import _world

    world = _world(1)
    for batch in range(2):
        _ingest(lake, world, batch)
        _refresh_all(lake, config)
    ids = sorted(lake.read(JUDGE_SCORES).column("trajectory_id").to_pylist())[:3]
    con = duckdb.connect()
    con.register("keys", pa.table({"key": pa.array(ids, pa.string())}))
    assert sorted(keyed(con, lake, JUDGE_SCORES, "trajectory_id", "keys").column("trajectory_id").to_pylist()) == ids


def test_refreshed_tables_answer_filters_on_string_columns(lake, config):
    """A Delta MERGE wrote its files with string_view types; mixed with plain string files, every
    filter DuckDB pushed into the scan of a string column failed (the trigger, after day 4 of the
    demo). The refresh now overwrites its partitions with plain types, and the filters answer."""
    import duckdb
    import pyarrow.parquet as pq

    from flywheel_assets.lib.tables import JUDGE_SCORES
    from flywheel_assets_tests.feedback.test_refresh import _world

    world = _world(2)
    for batch in range(3):
        _ingest(lake, world, batch)
        _refresh_all(lake, config)
    con = duckdb.connect()
    for table, column in ((TRAJECTORY_SCORES, "origin"), (JUDGE_SCORES, "trajectory_id"),
                          (SESSION_FEEDBACK, "session_id")):
        dt = lake.delta(table)
        assert dt.version() >= 2  # written more than once
        types = {str(pq.read_schema(uri).field(column).type) for uri in dt.file_uris()}
        assert types == {"string"}, table.name
        lake.register(con, table)
        expected = sum(1 for row in lake.read(table, columns=[column]).to_pylist() if row[column] >= "a")
        assert con.execute(f"SELECT count(*) FROM {table.name} WHERE {column} >= 'a'").fetchone()[0] == expected


def test_a_lake_written_the_old_way_is_recomputed_in_full_once(lake, config, monkeypatch):
    """WRITE_FORMAT is part of every fingerprint: a lake whose score tables hold a MERGE's
    string_view files is rewritten whole by its next refresh, then folds incrementally again."""
    from flywheel_assets.lib.feedback import refresh
    from flywheel_assets.lib.feedback.refresh_scores import refresh_session_feedback
    from flywheel_assets_tests.feedback.test_refresh import _world

    import duckdb
    import pyarrow.parquet as pq

    def file_types():
        return {str(pq.read_schema(uri).field("session_id").type) for uri in lake.delta(SESSION_FEEDBACK).file_uris()}

    world = _world(3)
    _ingest(lake, world, 0)
    monkeypatch.setattr(refresh, "WRITE_FORMAT", 1)
    assert refresh_session_feedback(lake, config).full
    # what the MERGE of WRITE_FORMAT 1 left: its rows merged onto themselves, string_view files
    dt = lake.delta(SESSION_FEEDBACK)
    dt.merge(lake.read(SESSION_FEEDBACK), "t.session_id = s.session_id", source_alias="s", target_alias="t") \
        .when_matched_update_all().when_not_matched_insert_all().execute()
    assert "string_view" in file_types()
    monkeypatch.setattr(refresh, "WRITE_FORMAT", 2)
    _ingest(lake, world, 1)
    outcome = refresh_session_feedback(lake, config)
    assert outcome.full and outcome.reason == "settings changed"
    assert file_types() == {"string"}  # rewritten whole: filters on string columns answer again
    con = duckdb.connect()
    lake.register(con, SESSION_FEEDBACK)
    assert con.execute("SELECT count(*) FROM session_feedback WHERE session_id >= ''").fetchone()[0] == \
        lake.row_count(SESSION_FEEDBACK) > 0
    _ingest(lake, world, 2)
    assert not refresh_session_feedback(lake, config).full


def test_an_upsert_over_a_table_changed_since_it_read_fails_and_loses_nothing(lake, config):
    """The partitions are read, then overwritten: a commit in between must make the write fail
    (Delta's conflict check on the snapshot read), not be overwritten."""
    import pyarrow as pa
    import pytest
    from deltalake.exceptions import DeltaError

    from flywheel_assets.lib.lake import Lake, conform

    def row(session, day, quality):
        return {"session_id": session, "first_day": day, "quality_score": quality}

    lake.upsert(SESSION_FEEDBACK, conform(pa.Table.from_pylist([row("s1", "2026-11-01", 0.1)]), SESSION_FEEDBACK),
                {"2026-11-01"})

    class Racing(Lake):
        raced = False

        def _dataset(self, dt, table, prune):
            if not self.raced:  # another writer commits between this upsert's read and its write
                self.raced = True
                Lake(config).append(table, conform(pa.Table.from_pylist([row("s2", "2026-11-01", 0.2)]), table))
            return super()._dataset(dt, table, prune)

    with pytest.raises(DeltaError):
        Racing(config).upsert(SESSION_FEEDBACK, conform(pa.Table.from_pylist([row("s1", "2026-11-01", 0.9)]),
                                                        SESSION_FEEDBACK), {"2026-11-01"})
    assert sorted(lake.read(SESSION_FEEDBACK).column("session_id").to_pylist()) == ["s1", "s2"]


def test_a_verdict_that_new_lengths_flip_is_rewritten(lake, config):
    """length_ok compares a conversation with its task type's whole population: new rows that
    narrow the spread make an old long answer an outlier, and the refresh rewrites that old row
    (found by its length) as the full recompute does."""
    def answered(tid, length, batch):
        text = "x" * length
        return _trajectory(tid, f"s-{tid}", batch=batch, final_response=text,
                           turns=[{"role": "user", "content": "q"}, {"role": "assistant", "content": text}])

    _ingest(lake, [answered(f"a{length}", length, 0) for length in (50, 60, 70, 80, 90, 110, 120, 130, 400)], 0)
    _refresh_all(lake, config)
    verdict = {row["trajectory_id"]: row["length_ok"] for row in lake.read(JUDGE_SCORES).to_pylist()}
    assert verdict["a400"] == 1.0
    _ingest(lake, [answered(f"b{i}", 100, 1) for i in range(40)], 1)
    _refresh_all(lake, config)
    verdict = {row["trajectory_id"]: row["length_ok"] for row in lake.read(JUDGE_SCORES).to_pylist()}
    assert verdict["a400"] == 0.0 and verdict["a90"] == 1.0
    incremental = _snapshot(lake)
    _refresh_all(lake, config, full=True)
    assert _snapshot(lake) == incremental
