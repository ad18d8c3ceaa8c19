"""The one Delta read/write helper. Every table goes through here.

Writes are single Delta commits, so a failed run leaves a table at its previous
version, never half-written (an append may be followed by a compaction commit, which
rewrites small files and changes no row: see COMPACT_AT). The lake root is
FLYWHEEL_HOME/lake unless FLYWHEEL_LAKE_URI names another (for example
s3://bucket/flywheel, with credentials in FLYWHEEL_STORAGE_OPTIONS as a JSON object).

A tiered table (Table.tiered) is two Delta tables read as one: the hot one at `uri`, and the
cold one at `cold_uri` (zstd Parquet, on cheaper storage when FLYWHEEL_COLD_URI names another
bucket; the first move records the location on the hot table, so every process finds it
whatever its environment) holding the rows lib/storage/tiers.py moved there. The hot table's app
transaction TIER_MARK says which: a version of the hot table reads the cold rows ingested
before its mark. A move commits the cold rows first and then, in one hot commit, deletes them
from the hot table and advances its mark, so a reader (of any version) sees each row once
whenever it reads and wherever a move stopped. A hot table with a mark whose cold tier cannot be
opened fails every read (ColdTierMissing) rather than read half of its rows.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timedelta, timezone

import duckdb
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.dataset as pa_ds
import pyarrow.fs as pa_fs
from deltalake import CommitProperties, DeltaTable, PostCommitHookProperties, Transaction, write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.tables import Table

# Every append adds a file, and a reader opens every file: a ledger row per landing file
# or a registry row per status change would leave thousands of tiny files after some
# cycles. Once an unpartitioned table holds COMPACT_AT files under SMALL_FILE_BYTES, the
# append that made it so also compacts them (a second commit; the rows do not change).
COMPACT_AT = 64
# A Lake's writes checkpoint the table each CHECKPOINT_EVERY versions, themselves (delta-rs's
# post-commit checkpoint, each 100 versions by default, raises after the commit landed when the
# checkpoint fails: a write that happened reported as failed). An open replays the JSON commits
# since the last checkpoint: ~15 ms at 50, ~3 ms after one, and a refresh opens about a hundred.
CHECKPOINT_EVERY = 10
_NO_CHECKPOINT = PostCommitHookProperties(create_checkpoint=False)
SMALL_FILE_BYTES = 32 << 20
LOG_RETENTION, DEFAULT_LOG_RETENTION = "delta.logRetentionDuration", "interval 30 days"
ORPHAN_HOURS = 1  # purge_history: untracked files older than this are deleted
TIER_MARK = "flywheel.tiered_before"  # app transaction: rows ingested before it (µs) are in the cold tier
COLD_URI_PROPERTY = "flywheel.coldUri"  # hot table property: where its cold tier is
OPERATION, TIER_MOVE = "flywheel.operation", "tier-move"  # commit metadata tagging a tier move's commits


class Lake:
    def __init__(self, config: FlywheelConfig, root: str | None = None, storage_options: str | None = None):
        """`root` and `storage_options` (a JSON object) as the Dagster resource passes them;
        without them, FLYWHEEL_LAKE_URI and FLYWHEEL_STORAGE_OPTIONS (the CLI, notebooks)."""
        self.config = config
        self.root = root or os.environ.get("FLYWHEEL_LAKE_URI") or str(config.lake.resolve())
        options = storage_options or os.environ.get("FLYWHEEL_STORAGE_OPTIONS")
        self.storage_options: dict[str, str] | None = json.loads(options) if options else None
        explicit = os.environ.get("FLYWHEEL_COLD_URI")
        self.cold_root = f"{self.root.rstrip('/')}/cold" if not explicit else \
            explicit if "://" in explicit else os.path.abspath(explicit)
        self._cold_default = not explicit  # under the lake root: recorded relative to it (a home moves whole)
        cold_options = os.environ.get("FLYWHEEL_COLD_STORAGE_OPTIONS")
        self.cold_storage_options = json.loads(cold_options) if cold_options else self.storage_options
        self._datasets: dict[str, tuple[tuple, pa_ds.Dataset]] = {}  # _files: by location, the version read last

    def uri(self, table: Table) -> str:
        return f"{self.root.rstrip('/')}/{table.layer}/{table.name}"

    def cold_uri(self, table: Table, dt: DeltaTable | None = None) -> str:
        """Where the table's cold tier is: as its first move recorded it on the hot table (`dt`,
        default the current version), else where a first move puts it (FLYWHEEL_COLD_URI)."""
        dt = self.delta(table) if dt is None else dt
        recorded = None if dt is None else dt.metadata().configuration.get(COLD_URI_PROPERTY)
        if recorded is None:
            return f"{self.cold_root.rstrip('/')}/{table.layer}/{table.name}"
        return recorded if "://" in recorded or recorded.startswith("/") else f"{self.root.rstrip('/')}/{recorded}"

    def cold_location(self, table: Table) -> str:
        """What a first move records: relative to the lake root for the default location (a copied
        or moved home keeps its own cold tier), else FLYWHEEL_COLD_URI's location."""
        return f"cold/{table.layer}/{table.name}" if self._cold_default else self.cold_uri(table)

    def delta(self, table: Table, version: int | None = None) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            return None

    def cold(self, table: Table, dt: DeltaTable | None = None) -> DeltaTable | None:
        """The cold tier of a tiered table as hot version `dt` (default the current one) knows it;
        None: not tiered, or nothing moved yet."""
        if not table.tiered:
            return None
        dt = self.delta(table) if dt is None else dt
        uri = self.cold_uri(table, dt)
        try:
            return DeltaTable(uri, storage_options=self.cold_storage_options)
        except TableNotFoundError:
            if dt is not None and dt.transaction_version(TIER_MARK) is not None:
                raise ColdTierMissing(f"{table.layer}/{table.name}: its rows ingested before the mark were moved to "
                                      f"{uri}, and no Delta table is there (moved away? credentials: "
                                      "FLYWHEEL_COLD_STORAGE_OPTIONS)") from None
            return None

    def exists(self, table: Table) -> bool:
        return self.delta(table) is not None

    def version(self, table: Table) -> int | None:
        dt = self.delta(table)
        return None if dt is None else dt.version()

    def row_count(self, table: Table, version: int | None = None) -> int:
        """From the Delta logs alone (no data file is opened, unless a tier move stopped halfway)."""
        dt = self.delta(table, version)
        if dt is None:
            return 0
        count = _log_rows(dt)
        if (part := self._cold_part(table, dt)) is not None:
            cold_dt, uri, before = part
            count += _log_rows(cold_dt) if before is None else \
                self._files(cold_dt, uri, None).count_rows(filter=pa_ds.field("ingested_at") < micros_ts(before))
        return count

    def arrow_schema(self, table: Table) -> pa.Schema | None:
        dt = self.delta(table)
        return None if dt is None else pa.schema(dt.schema().to_arrow())

    def read(self, table: Table, columns: list[str] | None = None, filter_sql: str | None = None,
             version: int | None = None, prune: str | None = None, hot_only: bool = False,
             cold_only: bool = False) -> pa.Table:
        """The whole table (or the named columns) as arrow; empty with its schema if absent.

        `prune` is a Delta predicate that selects data files by their min/max statistics
        before any is opened: the rows of the files it keeps are read, a superset of the
        rows it matches (filter_sql then selects rows exactly). `hot_only`, `cold_only`: a
        tiered table's hot rows alone, or every row its cold tier holds (lib/storage/tiers.py)."""
        hot = self.delta(table, version)
        dt = self.cold(table, hot) if cold_only and hot is not None else hot
        if dt is None:
            schema = table.schema if columns is None else pa.schema([table.schema.field(c) for c in columns])
            return schema.empty_table()
        if cold_only:
            dataset = self._files(dt, self.cold_uri(table, hot), prune)
        else:
            dataset = self._files(dt, self.uri(table), prune) if hot_only else self._dataset(dt, table, prune)
        if filter_sql is None:
            return dataset.to_table(columns=columns)
        return rows_where(dataset, filter_sql, columns)

    def register(self, con: duckdb.DuckDBPyConnection, table: Table, name: str | None = None,
                 prune: str | None = None, version: int | None = None) -> None:
        """Expose a table to DuckDB as a view (a lazy arrow dataset: no copy); `prune` as in read:
        the view then holds only the files it keeps, so the queries must filter at least as much."""
        dt = self.delta(table, version)
        con.register(name or table.name, self._dataset(dt, table, prune)
                     if dt is not None else table.schema.empty_table())

    def dataset(self, table: Table, version: int | None = None):
        """The table's rows (at `version`) as a lazy arrow dataset, as register exposes them; None if absent."""
        dt = self.delta(table, version)
        return None if dt is None else self._dataset(dt, table, None)

    def _dataset(self, dt: DeltaTable, table: Table, prune: str | None):
        """An arrow dataset of the table's files (and of its cold tier's rows this version reads)."""
        hot = self._files(dt, self.uri(table), prune)
        if (part := self._cold_part(table, dt)) is None:
            return hot
        cold_dt, uri, before = part
        cold = self._files(cold_dt, uri, prune)
        if before is not None:  # rows moved later than this version's mark are its hot rows: left out, row by row
            cold = pa_ds.dataset(cold.to_table(filter=pa_ds.field("ingested_at") < micros_ts(before)))
        return pa_ds.dataset([hot, cold])

    def _cold_part(self, table: Table, dt: DeltaTable) -> tuple[DeltaTable, str, int | None] | None:
        """(the cold tier, its location, None when hot version `dt` reads all of its rows, else
        the mark before which it reads them), or None when `dt` reads no cold row. The cold tier
        holds more than `dt` reads when `dt` is older than the last move, or when a move stopped
        between its two commits: those reads filter the cold rows (into memory), the current
        version of a finished move reads the cold files as they are."""
        if not table.tiered or (mark := dt.transaction_version(TIER_MARK)) is None:
            return None
        cold = self.cold(table, dt)
        return cold, self.cold_uri(table, dt), None if cold.transaction_version(TIER_MARK) == mark else mark

    def _files(self, dt: DeltaTable, uri: str, prune: str | None):
        """An arrow dataset of a Delta table's files. A local table is read through Arrow's own
        file system: deltalake's default (a Python file system handler called from Arrow's I/O
        threads) made about half of the processes that had read a table abort at exit
        ("terminate called without an active exception").
        A version's files never change, so the dataset of the version of each table read last
        (without `prune`) is kept by this Lake and read again (a refresh reads the same versions a
        dozen times: ~30 ms each at 100 files); one a table, so the Parquet footers its fragments
        keep are one version's."""
        made = (dt.metadata().id, dt.version())  # (a table made again at the same place: another id)
        if prune is None and (kept := self._datasets.get(uri)) is not None and kept[0] == made:
            return kept[1]
        filesystem = None
        if "://" not in uri:
            filesystem = pa_fs.SubTreeFileSystem(os.path.abspath(uri), pa_fs.LocalFileSystem())
        dataset = dt.to_pyarrow_dataset(file_pruning_predicate=prune, filesystem=filesystem)
        if prune is None:
            self._datasets[uri] = (made, dataset)
        return dataset

    def append(self, table: Table, data: pa.Table) -> int:
        return self._write(table, data, mode="append")

    def overwrite(self, table: Table, data: pa.Table, predicate: str | None = None) -> int:
        """Replace the table, or only the rows matching predicate, in one commit."""
        return self._write(table, data, mode="overwrite", predicate=predicate)

    def _write(self, table: Table, data: pa.Table, mode: str, predicate: str | None = None) -> int:
        data = conform(data, table)
        if mode == "append" and data.num_rows == 0 and self.exists(table):
            return self.version(table)
        # a whole-table overwrite also takes the table's current schema (a column added since)
        schema_mode = "overwrite" if mode == "overwrite" and predicate is None else None
        write_deltalake(
            self.uri(table), data, mode=mode, predicate=predicate, schema_mode=schema_mode,
            storage_options=self.storage_options,
            partition_by=list(table.partition_by) or None, post_commithook_properties=_NO_CHECKPOINT,
        )
        dt = self.delta(table)
        version = _checkpointed(dt)
        if mode == "append" and not table.partition_by:
            compact_small_files(dt)
        return version

    def upsert(self, table: Table, data: pa.Table, partitions: set[str] | None = None,
               marks: dict[str, int] | None = None, replace: bool = False) -> int | None:
        """Insert or replace rows by the table's key in one commit that also records `marks`
        (Delta app transactions: see lib/feedback/refresh.py). `partitions` are the values of the
        table's partition column the rows are in now or were in before: only those are rewritten
        (all of an unpartitioned table, or without `partitions`). `replace` overwrites the whole
        table instead. None when nothing was written.

        Not a Delta MERGE: delta-rs writes a MERGE's files with Arrow's string_view types, and a
        pyarrow dataset mixing them with plain string files fails every filter on a string column
        ("no kernel matching input types (string, string_view)"). The partitions' rows are read,
        those the data replaces are dropped, and the partitions are overwritten in one commit."""
        data = conform(data, table)
        commit = CommitProperties(app_transactions=[Transaction(app, version) for app, version in (marks or {}).items()])
        dt = self.delta(table)
        partition_by = list(table.partition_by) or None
        if replace or dt is None:
            write_deltalake(self.uri(table), data, mode="overwrite", schema_mode="overwrite",
                            storage_options=self.storage_options, partition_by=partition_by,
                            commit_properties=commit, post_commithook_properties=_NO_CHECKPOINT)
            return _checkpointed(self.delta(table))
        if data.num_rows == 0:
            return None
        predicate, selected = None, None
        if table.partition_by and partitions is not None:
            column = table.partition_by[0]
            values = sorted(p for p in partitions if p is not None)
            clauses = ([f"{column} IN ({', '.join(sql_literal(v) for v in values)})"] if values else []) + \
                ([f"{column} IS NULL"] if None in partitions else [])
            predicate = " OR ".join(clauses) or "false"
            field = pa.compute.field(column)
            selected = field.isin(values) if values else None
            if None in partitions:
                selected = field.is_null() if selected is None else selected | field.is_null()
        old = self._dataset(dt, table, None).to_table(filter=selected) if selected is not None or predicate is None \
            else table.schema.empty_table()
        old = conform(old, table)
        kept = old.filter(pa.compute.invert(pa.compute.is_in(_key(old, table), value_set=_key(data, table))))
        # Both write over the snapshot read (`dt`). An overwrite fails if a commit came in between
        # (nothing is lost); an append of keys that snapshot lacked does not conflict with one, so a
        # second writer of the same keys is kept out by the refresh lock (one refresh per table).
        if kept.num_rows == old.num_rows:  # only new keys: an append, nothing rewritten
            write_deltalake(dt, data, mode="append", partition_by=partition_by, commit_properties=commit,
                            post_commithook_properties=_NO_CHECKPOINT)
        else:
            write_deltalake(dt, pa.concat_tables([kept, data]), mode="overwrite", predicate=predicate,
                            partition_by=partition_by, commit_properties=commit,
                            post_commithook_properties=_NO_CHECKPOINT)
        return _checkpointed(self.delta(table))

    def delete_where(self, table: Table, predicate: str) -> int:
        """Delete the rows a Delta predicate holds for, in one commit per tier that rewrites only
        the files holding them (an overwrite with that predicate: delta-rs's DELETE writes
        string_view files, see upsert). The rows deleted (those a read saw)."""
        before = self.row_count(table)
        if before:
            self._write(table, table.schema.empty_table(), mode="overwrite", predicate=predicate)
            if self.cold(table) is not None:  # the cold rows no version reads yet too (a stopped move)
                write_deltalake(self.cold_uri(table), table.schema.empty_table(), mode="overwrite",
                                predicate=predicate, storage_options=self.cold_storage_options, schema_mode="merge")
        return before - self.row_count(table)

    def purge_history(self, table: Table) -> None:
        """Make the current version the only one: the files earlier versions read are deleted
        (vacuum with no retention) and the log before a new checkpoint is removed, so no earlier
        version can be read back (time travel starts here). Files no commit ever named (a write
        that failed, or one still under way) are deleted once ORPHAN_HOURS old: sooner would take a
        running writer's files before its commit. The log's retention is lowered for the cleanup
        and set back to what it was."""
        for dt in (self.delta(table), self.cold(table)):
            if dt is not None:
                _purge(dt)

    def marks(self, table: Table, *apps: str, version: int | None = None) -> dict[str, int | None]:
        """The app transaction versions upsert recorded (None: never, or the table is missing)."""
        dt = self.delta(table, version)
        return {app: None if dt is None else dt.transaction_version(app) for app in apps}

    def versions(self, *tables: Table) -> dict[str, int | None]:
        return {t.name: self.version(t) for t in tables}


def _purge(dt: DeltaTable) -> None:
    """Lake.purge_history of one Delta table."""
    dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    dt.vacuum(retention_hours=ORPHAN_HOURS, enforce_retention_duration=False, dry_run=False, full=True)
    retention = dt.metadata().configuration.get(LOG_RETENTION, DEFAULT_LOG_RETENTION)
    dt.alter.set_table_properties({LOG_RETENTION: "interval 0 seconds"})
    dt.update_incremental()
    dt.create_checkpoint()
    dt.cleanup_metadata()
    dt.alter.set_table_properties({LOG_RETENTION: retention})


def _log_rows(dt: DeltaTable) -> int:
    actions = pa.table(dt.get_add_actions(flatten=True))
    return int(pa.compute.sum(actions.column("num_records")).as_py() or 0)


class ColdTierMissing(RuntimeError):
    """A tiered table moved rows to a cold tier this process cannot open."""


def micros_ts(micros: int) -> pa.Scalar:
    return pa.scalar(micros, pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def micros_iso(micros: int) -> str:
    """Microseconds since the epoch as an ISO timestamp (UTC) a Delta predicate compares with."""
    return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros)).isoformat()


def rows_where(rows, condition: str, columns: list[str] | None = None) -> pa.Table:
    """The rows (the `columns`) of an arrow table or dataset that a SQL condition holds for
    (DuckDB over it, no copy in; the condition is pushed into a dataset's scan)."""
    con = duckdb.connect()
    con.register("rows", rows)
    selected = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    return con.execute(f"SELECT {selected} FROM rows WHERE {condition}").to_arrow_table()


def _key(rows: pa.Table, table: Table) -> pa.Array:
    """The table's key of each row as one value (a composite key joined by a separator no key holds)."""
    if len(table.key) == 1:
        return rows.column(table.key[0]).combine_chunks()
    parts = [pa.compute.cast(rows.column(name), pa.string()) for name in table.key]
    return pa.compute.binary_join_element_wise(*parts, "\x1f").combine_chunks()


def compact_small_files(dt: DeltaTable, at: int | None = None) -> bool:
    """Rewrite the table's small files into few (their order kept) once there are `at` (COMPACT_AT) of them."""
    sizes = pa.table(dt.get_add_actions()).column("size_bytes")
    if (pa.compute.sum(pa.compute.less(sizes, SMALL_FILE_BYTES)).as_py() or 0) < (COMPACT_AT if at is None else at):
        return False
    try:
        dt.optimize.compact(target_size=SMALL_FILE_BYTES)
    except DeltaError:  # e.g. another writer changed these files meanwhile: the append stands, the next one retries
        return False
    return True


def _checkpointed(dt: DeltaTable) -> int:
    """The version of `dt` (just written), checkpointed first at each CHECKPOINT_EVERY-th: a
    checkpoint that fails (a full disk, a store error) is left to the next one, the write done."""
    version = dt.version()
    if version and version % CHECKPOINT_EVERY == 0:
        with contextlib.suppress(DeltaError, OSError):
            dt.create_checkpoint()
    return version


def conform(data: pa.Table, table: Table) -> pa.Table:
    """Select and cast columns to the table's declared schema (missing ones as null)."""
    columns = []
    for field in table.schema:
        if field.name in data.column_names:
            columns.append(data.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(data.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=table.schema)


def sql_literal(value: str) -> str:
    """A string as a SQL literal, for Delta predicates (`prune`) that take no parameters."""
    return "'" + value.replace("'", "''") + "'"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
