"""The data benchmark's indexed store (benchmarks/seed_store.py) answers the seed's query as the lake does."""

from datetime import datetime, timedelta, timezone

import duckdb
import pyarrow as pa
import pytest

from benchmarks.seed_store import SESSION_QUERY, build_indexed_store, seed_quality_score
from flywheel_assets.lib.tables import SESSION_EVENTS

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)

# (session_id, event_type, edit_ratio, minutes after T0); written out of time order on purpose
EVENTS = [
    ("s-edit", "output_edited", 0.8, 5),
    ("s-edit", "output_accepted", None, 1),
    ("s-edit", "output_edited", 0.2, 2),
    ("s-bad", "retry_requested", None, 1),
    ("s-bad", "error_reported", None, 4),
    ("s-bad", "retry_requested", None, 2),
    ("s-bad", "retry_requested", None, 3),
    ("s-good", "session_continued", None, 2),
    ("s-good", "output_accepted", None, 1),
]

# Hand-computed with the seed's ImplicitFeedback.quality_score; the last edit by time wins.
EXPECTED = [
    ("s-edit", 0.5 + 0.3 + 0.1 - 0.8 * 0.3),
    ("s-bad", 0.5 - 0.3 - 0.2 - 0.4),
    ("s-good", 0.5 + 0.3 + 0.1 + 0.1),
    ("s-none", 0.5 - 0.3 + 0.1),
]


@pytest.fixture
def stores(lake, tmp_path):
    lake.append(SESSION_EVENTS, pa.table({
        "event_id": [f"ev-{k}" for k in range(len(EVENTS))],
        "session_id": [e[0] for e in EVENTS],
        "trajectory_id": [f"t-{e[0]}" for e in EVENTS],
        "event_type": [e[1] for e in EVENTS],
        "edit_ratio": pa.array([e[2] for e in EVENTS], pa.float64()),
        "ts": pa.array([T0 + timedelta(minutes=e[3]) for e in EVENTS], pa.timestamp("us", tz="UTC")),
    }))
    con = duckdb.connect()
    lake.register(con, SESSION_EVENTS)
    store = build_indexed_store(con, tmp_path / "seed_store.sqlite", batch_rows=4)
    yield con, store
    store.connection.close()


def test_indexed_store_holds_every_row_and_is_searched_through_its_index(stores):
    _con, store = stores
    assert store.rows == len(EVENTS)
    assert store.connection.execute("SELECT count(*) FROM session_events").fetchone() == (len(EVENTS),)
    assert "USING INDEX session_events_session_id" in store.query_plan()
    assert store.table_bytes > 0 and store.index_bytes > 0


@pytest.mark.parametrize("session_id, expected", EXPECTED)
def test_indexed_store_returns_the_lakes_rows_and_the_seeds_score(stores, session_id, expected):
    con, store = stores
    lake_rows = con.execute(SESSION_QUERY, [session_id]).fetchall()
    assert store.session_rows(session_id) == lake_rows
    assert seed_quality_score(store.session_rows(session_id)) == pytest.approx(expected)
