"""FLYWHEEL_HOME/flywheel.duckdb: one file that opens every table.

A view per Delta table, `SELECT * FROM delta_scan('<table>')` (a tiered table's view adds its
cold tier's rows, see `_select`): DuckDB's delta extension
reads the table's log when a query runs, so a view always answers with the current
version (never a file list frozen when the view was made) and the catalog only needs
writing when a table appears. Open it from Python or the DuckDB CLI:

    duckdb.connect("data/home/flywheel.duckdb", read_only=True).sql("SELECT count(*) FROM trajectories")

The extension cannot be downloaded here: the PyPI package duckdb-extension-delta ships the
binary for this DuckDB (1.5.5, Linux x86-64) and it is installed from there into DuckDB's
extension folder (~/.duckdb/extensions), from where any later connection autoloads it.
Elsewhere DuckDB's own `INSTALL delta` fetches it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import duckdb

from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.tables import ALL_TABLES, Table

CATALOG_NAME = "flywheel.duckdb"


def packaged_extension() -> Path | None:
    """The delta extension binary of the duckdb-extension-delta package, if installed."""
    spec = importlib.util.find_spec("duckdb_extension_delta")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension"
    return path if path.exists() else None


def load_delta(con: duckdb.DuckDBPyConnection) -> None:
    """LOAD delta, installing it first (from the package, else from DuckDB's repository)."""
    try:
        con.execute("LOAD delta")
        return
    except duckdb.Error:
        pass
    packaged = packaged_extension()
    con.execute(f"INSTALL {sql_literal(str(packaged))}" if packaged else "INSTALL delta")
    con.execute("LOAD delta")


def refresh_catalog(con: duckdb.DuckDBPyConnection, lake: Lake) -> dict:
    """Create or replace a view per existing Delta table in the database `con` is open on
    (with the table's description as its comment); returns the views made and the tables
    not created yet."""
    load_delta(con)
    views, missing = [], []
    for table in ALL_TABLES:
        if not lake.exists(table):
            missing.append(table.name)
            continue
        con.execute(f'CREATE OR REPLACE VIEW "{table.name}" AS {_select(lake, table)}')
        con.execute(f'COMMENT ON VIEW "{table.name}" IS {sql_literal(f"{table.layer}/{table.name}: {table.description}")}')
        views.append(table.name)
    return {"views": views, "missing": missing}


def _select(lake: Lake, table: Table) -> str:
    """The view's query. A tiered table with a cold tier reads both: the cold rows ingested before
    the hot table's oldest row (a move that stopped halfway left rows in both; the hot copy is
    the one read, as Lake does), so the view needs no refresh when rows move."""
    hot = f"delta_scan({sql_literal(lake.uri(table))})"
    if lake.cold(table) is None:
        return f"SELECT * FROM {hot}"
    return (f"SELECT * FROM {hot} UNION ALL BY NAME SELECT * FROM delta_scan({sql_literal(lake.cold_uri(table))}) "
            f"WHERE ingested_at < (SELECT coalesce(min(ingested_at), 'infinity'::TIMESTAMPTZ) FROM {hot})")
