"""Resources and the metadata helpers every stage uses."""

import base64
import os
from datetime import datetime
from pathlib import Path

import dagster as dg
import pyarrow as pa

from flywheel_assets.lib import clock
from flywheel_assets.lib.config import FlywheelConfig, load_config
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import Table


def get_env() -> str:
    """LOCAL on a laptop; CLUSTER when DAGSTER_DEPLOYMENT says so (Postgres storage,
    a run launcher and executor configured in that deployment's dagster.yaml)."""
    return "CLUSTER" if os.environ.get("DAGSTER_DEPLOYMENT", "local").lower() in ("cluster", "prod") else "LOCAL"


class FlywheelResource(dg.ConfigurableResource):
    """Where Flywheel keeps its state and how it is tuned (see README: Configuration)."""

    home: str | None = None
    config_path: str | None = None

    def config(self) -> FlywheelConfig:
        return load_config(self.home, self.config_path)

    def lake(self) -> Lake:
        return Lake(self.config())

    def now(self) -> datetime:
        return clock.now(self.config())

    def registry(self, context=None) -> ModelRegistry:
        """With a run's `context`, every change is also a materialization of model_registry in that run."""
        config = self.config()
        from flywheel_assets.defs.records import registry_changed

        on_change = None if context is None else (lambda rows: context.log_event(registry_changed(rows)))
        return ModelRegistry(Lake(config), clock=lambda: clock.now(config), on_change=on_change)


def table_metadata(table: Table, data: pa.Table | None = None, **extra) -> dict:
    """Column docs (shown as the asset's schema), row count and a preview."""
    metadata: dict = {
        "dagster/column_schema": dg.TableSchema(columns=[
            dg.TableColumn(name, str(dtype), description=doc) for name, dtype, doc in table.columns
        ]),
        "table": dg.MetadataValue.text(f"{table.layer}/{table.name}"),
    }
    if data is not None:
        metadata["dagster/row_count"] = dg.MetadataValue.int(data.num_rows)
    metadata.update(extra)
    return metadata


def markdown_counts(counts: dict, key: str = "value", value: str = "rows") -> dg.MetadataValue:
    total = sum(counts.values()) or 1
    lines = [f"| {key} | {value} | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v} | {v / total:.1%} |" for k, v in counts.items()]
    return dg.MetadataValue.md("\n".join(lines))


def chart_metadata(path: Path, title: str) -> dg.MetadataValue:
    """A PNG chart as markdown with the image inline: the UI shows a path as text, but renders this."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


@dg.definitions
def resources() -> dg.Definitions:
    from dagster_duckdb import DuckDBResource

    from flywheel_assets.lib.catalog import CATALOG_NAME

    # The catalog's path is FLYWHEEL_HOME's at load time: where `make dev` and the demo keep it.
    return dg.Definitions(resources={"flywheel": FlywheelResource(),
                                     "catalog": DuckDBResource(database=str(load_config().home / CATALOG_NAME))})
