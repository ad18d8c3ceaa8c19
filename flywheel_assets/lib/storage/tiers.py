"""Hot, warm and cold: where a tiered table's rows live as they age (README: Storage upkeep).

- hot: the rows ingested in the last `maintenance.cold_after_days`, in the lake's Delta table,
  where the ingest appends small files;
- warm: the same table once lake_maintenance has compacted it and, when appends came in since,
  Z-ordered it on `session_id` (`zorder`): a per-session read opens few row groups. The hot table
  holds a bounded number of days, so the nightly rewrite is bounded too;
- cold: rows ingested earlier, moved by `move_to_cold` into a second Delta table at
  Lake.cold_uri (FLYWHEEL_COLD_URI: cheaper storage; the first move records it on the hot
  table), zstd-compressed, each day's rows sorted by session_id, compacted by lake_maintenance (lib/lake.py reads them with the hot rows as one table).

A move commits the rows into the cold table, a day of ingestion per commit with the day's end as
its TIER_MARK, then deletes them from the hot table in one commit that sets the hot table's
TIER_MARK to the last cut-off. Only that hot commit makes the move visible; a move stopped before
it (a kill, a full disk) is finished by the next one, which appends nothing twice, and no hot
row is deleted before the cold tier holds it. The commits are tagged `flywheel.operation: tier-move`, which the
incremental refreshes treat as harmless (no row changed, lib/feedback/refresh.py). Cut-offs are
whole milliseconds and never ahead of the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake

from flywheel_assets.lib.lake import (
    COLD_URI_PROPERTY, OPERATION, TIER_MARK, TIER_MOVE, Lake, conform, micros_iso,
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
    """Move the hot rows ingested before `before` (at most now) to the cold tier: a cold commit per
    day of ingestion (no commit holds more than a day in memory), then one hot commit. The caller
    holds the ingest lock (no append meanwhile: rows ingested later carry a later ingested_at)."""
    assert table.tiered, table.name
    done = TierMove(f"{table.layer}/{table.name}", 0, None)
    if (hot := lake.delta(table)) is None:
        return done
    hot_mark = hot.transaction_version(TIER_MARK) or 0
    recorded = hot.metadata().configuration.get(COLD_URI_PROPERTY)
    cold = lake.cold(table)
    cold_mark = (None if cold is None else cold.transaction_version(TIER_MARK)) or 0
    if cold is not None and recorded is None and not hot_mark:
        raise ColdTierMismatch(f"{lake.cold_uri(table)} holds a cold tier this {table.name} table never moved rows "
                               "to (a lake made anew beside an old cold tier?): move it away or set FLYWHEEL_COLD_URI")
    if recorded is None:  # every process finds the cold tier through the hot table
        hot.alter.set_table_properties({COLD_URI_PROPERTY: lake.cold_location(table)}, raise_if_not_exists=False,
                                       commit_properties=CommitProperties(custom_metadata={OPERATION: TIER_MOVE}))
    done.finished_stopped = cold_mark > hot_mark  # the cold side of a move committed, its hot side did not
    mark = max(cold_mark, hot_mark)
    cutoff = min(to_micros(before), to_micros(datetime.now(timezone.utc))) // 1000 * 1000  # whole ms, never ahead
    # the ends of the ingestion days to move, from one read of the column
    ingested = lake.read(table, columns=["ingested_at"], hot_only=True,
                         filter_sql=f"ingested_at >= TIMESTAMPTZ '{micros_iso(mark)}' AND {_before(cutoff)}")
    days = sorted({min(cutoff, (to_micros(at) // DAY_US + 1) * DAY_US) for at in ingested.column(0).to_pylist()})
    for step in days:
        rows = lake.read(table, hot_only=True,
                         filter_sql=f"ingested_at >= TIMESTAMPTZ '{micros_iso(mark)}' AND {_before(step)}")
        _append_cold(lake, table, rows, step)
        mark = step
    if mark > hot_mark:
        done.rows = _delete_hot(lake, table, mark)
        done.cutoff = _moment(mark)
    return done


def _before(mark: int) -> str:
    return f"ingested_at < TIMESTAMPTZ '{micros_iso(mark)}'"


def _append_cold(lake: Lake, table: Table, rows: pa.Table, mark: int) -> None:
    write_deltalake(lake.cold_uri(table), conform(rows.sort_by("session_id"), table), mode="append",
                    storage_options=lake.cold_storage_options, writer_properties=COLD_WRITER, schema_mode="merge",
                    commit_properties=_commit(mark))


def _delete_hot(lake: Lake, table: Table, mark: int) -> int:
    """Delete the hot rows ingested before `mark` and set the hot TIER_MARK, in one commit, once
    the cold tier holds every one of them (a row the cold commits missed — ingested meanwhile
    with a clock behind — is appended to it first, under the same mark). The rows deleted."""
    key = table.key[0]
    hot = lake.read(table, columns=[key], filter_sql=_before(mark), hot_only=True).column(0)
    cold = lake.read(table, columns=[key], filter_sql=_before(mark), cold_only=True).column(0)
    missing = hot.filter(pa.compute.invert(pa.compute.is_in(hot, value_set=cold)))
    if len(missing):  # only then are whole rows read
        rows = lake.read(table, filter_sql=_before(mark), hot_only=True)
        _append_cold(lake, table, rows.filter(pa.compute.is_in(rows.column(key), value_set=missing)), mark)
    write_deltalake(lake.uri(table), table.schema.empty_table(), mode="overwrite",
                    predicate=f"ingested_at < '{micros_iso(mark)}'", storage_options=lake.storage_options,
                    commit_properties=_commit(mark))
    return len(hot)


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


def _moment(mark: int) -> datetime:
    return datetime.fromisoformat(micros_iso(mark))
