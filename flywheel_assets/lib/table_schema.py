"""How a table is declared: its layer, name, documented columns, key and partitions (lib/tables.py
declares the lake's data tables with it, lib/tables_ops.py the operational record)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa

UTC_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Table:
    layer: str
    name: str
    description: str
    columns: tuple[tuple[str, pa.DataType, str], ...]
    key: tuple[str, ...] = ()
    partition_by: tuple[str, ...] = ()
    # append-only with an ingested_at column: rows past maintenance.cold_after_days move to the
    # cold tier (lib/storage/tiers.py) and are still read through Lake as one table
    tiered: bool = False

    @cached_property  # (a frozen dataclass: the cache goes to the instance's __dict__ directly)
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(name, dtype) for name, dtype, _ in self.columns])

    @property
    def column_docs(self) -> dict[str, str]:
        return {name: doc for name, _, doc in self.columns}


def cols(*columns: tuple[str, pa.DataType, str]) -> tuple[tuple[str, pa.DataType, str], ...]:
    return columns
