"""Hot, warm and cold: where a tiered table's rows live as they age (README: Storage upkeep).

- hot: the rows ingested in the last `maintenance.cold_after_days`, in the lake's Delta table,
  where the ingest appends small files;
- warm: the same table once lake_maintenance has compacted it and, when appends came in since,
  Z-ordered it on `session_id` (`zorder`): a per-session read opens few row groups. The hot table
  holds a bounded number of days, so the nightly rewrite is bounded too;
- cold: rows ingested earlier, moved by `move_to_cold` into a second Delta table at
  Lake.cold_uri (FLYWHEEL_COLD_URI: cheaper storage), zstd-compressed and sorted by session_id,
  one file per move, never compacted (lib/lake.py reads them with the hot rows as one table).

A move commits the rows into the cold table with the cut-off as its TIER_MARK, then deletes them
from the hot table in one commit that sets the hot table's TIER_MARK to the same cut-off. Only
that second commit makes the move visible; a move stopped between the two (a kill, a full disk)
is finished by the next one, which deletes from the hot table what the cold table already holds
and appends nothing twice. Both commits are tagged `flywheel.operation: tier-move`, which the
incremental refreshes treat as harmless (no row changed, lib/feedback/refresh.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa
from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake

from flywheel_assets.lib.lake import OPERATION, TIER_MARK, TIER_MOVE, Lake, conform, micros_iso
from flywheel_assets.lib.tables import Table

ZSTD_LEVEL = 9  # cold files are written once and read rarely: a smaller file for a slower write


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
    """Move the hot rows ingested before `before` to the cold tier. The caller holds the ingest lock
    (no append meanwhile: rows ingested later all carry a later ingested_at)."""
    assert table.tiered, table.name
    done = TierMove(f"{table.layer}/{table.name}", 0, None)
    if (hot := lake.delta(table)) is None:
        return done
    hot_mark = hot.transaction_version(TIER_MARK) or 0
    cold = lake.cold(table)
    cold_mark = None if cold is None else cold.transaction_version(TIER_MARK)
    if cold_mark is not None and cold_mark > hot_mark:  # the cold side committed, the hot side did not
        done.rows += _delete_hot(lake, table, cold_mark)
        done.finished_stopped, hot_mark = True, cold_mark
        done.cutoff = _moment(cold_mark)
    cutoff = to_micros(before)
    if cutoff <= hot_mark:
        return done
    where = f"ingested_at < '{micros_iso(cutoff)}'"
    rows = conform(pa_sorted(lake.read(table, filter_sql=where, hot_only=True), "session_id"), table)
    if rows.num_rows == 0:
        return done
    write_deltalake(lake.cold_uri(table), rows, mode="append", storage_options=lake.cold_storage_options,
                    writer_properties=WriterProperties(compression="ZSTD", compression_level=ZSTD_LEVEL),
                    commit_properties=_commit(cutoff))
    done.rows += _delete_hot(lake, table, cutoff)
    done.cutoff = before
    return done


def _delete_hot(lake: Lake, table: Table, mark: int) -> int:
    """Delete the hot rows ingested before `mark` and set the hot TIER_MARK, in one commit."""
    where = f"ingested_at < '{micros_iso(mark)}'"
    count = lake.read(table, columns=["ingested_at"], filter_sql=where, hot_only=True).num_rows
    write_deltalake(lake.uri(table), table.schema.empty_table(), mode="overwrite",
                    predicate=where, storage_options=lake.storage_options,
                    commit_properties=_commit(mark))
    return count


def zorder(lake: Lake, table: Table) -> bool:
    """Z-order the hot table on session_id when rows were appended since its last Z-order."""
    dt = lake.delta(table)
    if dt is None:
        return False
    for commit in dt.history():
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
