"""Hot, warm and cold: where a tiered table's rows live as they age (README: Storage upkeep).

- hot: the rows ingested in the last `maintenance.cold_after_days`, in the lake's Delta table,
  where the ingest appends small files;
- warm: the same table once lake_maintenance has compacted it and, when appends came in since,
  Z-ordered it on `session_id` (`zorder`): a per-session read opens few row groups. The hot table
  holds a bounded number of days, so the nightly rewrite is bounded too;
- cold: rows ingested earlier, moved by `move_to_cold` into a second Delta table at
  Lake.cold_uri (FLYWHEEL_COLD_URI: cheaper storage; the first move records it on the hot
  table), zstd-compressed and sorted by session_id, a day of ingestion per move, compacted by
  lake_maintenance (lib/lake.py reads them with the hot rows as one table).

A move commits the rows into the cold table with the cut-off as its TIER_MARK, then deletes them
from the hot table in one commit that sets the hot table's TIER_MARK to the same cut-off. Only
that second commit makes the move visible; a move stopped between the two (a kill, a full disk)
is finished by the next one, which checks that the cold table holds every hot row it deletes and
appends nothing twice. The commits are tagged `flywheel.operation: tier-move`, which the
incremental refreshes treat as harmless (no row changed, lib/feedback/refresh.py). Cut-offs are
whole milliseconds and never ahead of the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake

from flywheel_assets.lib.lake import (
    COLD_URI_PROPERTY, OPERATION, TIER_MARK, TIER_MOVE, Lake, conform, micros_iso, rows_where,
)
from flywheel_assets.lib.tables import Table

ZSTD_LEVEL = 9  # cold files are written once and read rarely: a smaller file for a slower write
DAY_US = 86_400 * 1_000_000
COLD_WRITER = WriterProperties(compression="ZSTD", compression_level=ZSTD_LEVEL)


@dataclass
class TierMove:
    table: str
    rows: int  # rows moved by this run (a stopped move's rows included)
    cutoff: datetime | None  # rows ingested before it are cold now
    finished_stopped: bool = False  # a move stopped between its commits was finished


def to_micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _commit(mark: int) -> CommitProperties:
    return CommitProperties(app_transactions=[Transaction(TIER_MARK, mark)], custom_metadata={OPERATION: TIER_MOVE})


def move_to_cold(lake: Lake, table: Table, before: datetime) -> TierMove:
    """Move the hot rows ingested before `before` (at most now) to the cold tier, a day of
    ingestion per move so no move holds more than a day in memory. The caller holds the ingest
    lock (no append meanwhile: rows ingested later all carry a later ingested_at)."""
    assert table.tiered, table.name
    done = TierMove(f"{table.layer}/{table.name}", 0, None)
    if (hot := lake.delta(table)) is None:
        return done
    hot_mark = hot.transaction_version(TIER_MARK)
    recorded = hot.metadata().configuration.get(COLD_URI_PROPERTY)
    cold = lake.cold(table)
    cold_mark = None if cold is None else cold.transaction_version(TIER_MARK)
    if cold is not None and recorded is None:
        raise ColdTierMismatch(f"{lake.cold_uri(table)} holds a cold tier this {table.name} table never moved rows "
                               "to (a lake made anew beside an old cold tier?): move it away or set FLYWHEEL_COLD_URI")
    if cold_mark is not None and cold_mark > (hot_mark or 0):  # the cold side committed, the hot side did not
        done.rows += _finish(lake, table, hot_mark or 0, cold_mark)
        done.finished_stopped, hot_mark, done.cutoff = True, cold_mark, _moment(cold_mark)
    cutoff = min(to_micros(before), to_micros(datetime.now(timezone.utc))) // 1000 * 1000  # whole ms, never ahead
    while (hot_mark or 0) < cutoff:
        oldest = lake.read(table, columns=["ingested_at"], hot_only=True, filter_sql=_before(cutoff)) \
            .column("ingested_at")
        if len(oldest) == 0:
            break
        step = min(cutoff, (to_micros(pa.compute.min(oldest).as_py()) // DAY_US + 1) * DAY_US)
        if recorded is None:  # the first move: every process finds the cold tier through the hot table
            hot.alter.set_table_properties({COLD_URI_PROPERTY: lake.cold_uri(table)}, raise_if_not_exists=False,
                                           commit_properties=CommitProperties(custom_metadata={OPERATION: TIER_MOVE}))
            recorded = lake.cold_uri(table)
        rows = conform(pa_sorted(lake.read(table, filter_sql=_before(step), hot_only=True), "session_id"), table)
        write_deltalake(recorded, rows, mode="append", storage_options=lake.cold_storage_options,
                        writer_properties=COLD_WRITER,
                        schema_mode="merge", commit_properties=_commit(step))
        done.rows += _delete_hot(lake, table, step)
        hot_mark, done.cutoff = step, _moment(step)
    return done


def _before(mark: int) -> str:
    return f"ingested_at < TIMESTAMPTZ '{micros_iso(mark)}'"


def _finish(lake: Lake, table: Table, hot_mark: int, cold_mark: int) -> int:
    """Finish a move stopped after its cold commit, once the cold tier holds every hot row it is
    to delete (a row ingested meanwhile with an older clock would otherwise be lost)."""
    window = f"ingested_at >= TIMESTAMPTZ '{micros_iso(hot_mark)}' AND {_before(cold_mark)}"
    cold = lake.cold(table)
    hot_rows = lake.read(table, columns=[table.key[0]], filter_sql=window, hot_only=True).column(0)
    cold_rows = rows_where(lake._files(cold, lake.cold_uri(table), None), window, [table.key[0]]).column(0)
    if not pa.compute.all(pa.compute.is_in(hot_rows, value_set=cold_rows)).as_py() and len(hot_rows):
        raise ColdTierMismatch(f"{table.name}: a stopped move is not finished: {len(hot_rows)} hot rows ingested before "
                               f"{micros_iso(cold_mark)}, not all of them in the cold tier (a clock behind?)")
    return _delete_hot(lake, table, cold_mark)


def _delete_hot(lake: Lake, table: Table, mark: int) -> int:
    """Delete the hot rows ingested before `mark` and set the hot TIER_MARK, in one commit."""
    count = lake.read(table, columns=["ingested_at"], filter_sql=_before(mark), hot_only=True).num_rows
    write_deltalake(lake.uri(table), table.schema.empty_table(), mode="overwrite",
                    predicate=f"ingested_at < '{micros_iso(mark)}'", storage_options=lake.storage_options,
                    commit_properties=_commit(mark))
    return count


class ColdTierMismatch(RuntimeError):
    """The cold tier found does not hold what the hot table says it moved there."""


def zorder(lake: Lake, table: Table) -> bool:
    """Z-order the hot table on session_id when rows were appended since its last Z-order."""
    dt = lake.delta(table)
    if dt is None:
        return False
    for commit in dt.history(limit=500):
        if commit.get("operation") == "OPTIMIZE" and \
                (commit.get("operationMetrics") or {}).get("plannerStrategy") == "zOrder":
            return False
        if commit.get("operation") == "WRITE" and (commit.get("operationParameters") or {}).get("mode") == "Append":
            break
    else:
        return False
    dt.optimize.z_order(["session_id"], commit_properties=CommitProperties(custom_metadata={OPERATION: "z-order"}))
    return True


def pa_sorted(rows: pa.Table, column: str) -> pa.Table:
    return rows.sort_by([(column, "ascending")]) if rows.num_rows else rows


def _moment(mark: int) -> datetime:
    return datetime.fromisoformat(micros_iso(mark))
