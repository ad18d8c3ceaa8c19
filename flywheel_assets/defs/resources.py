"""Resources and the metadata helpers every stage uses."""

import base64
import os
from datetime import datetime
from pathlib import Path

import dagster as dg
import pyarrow as pa
from pydantic import Field, PrivateAttr

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
    """Where Flywheel keeps its state and how it is tuned (see README: Configuration). Every
    field is shown on the UI's resource page; secrets come from environment variables
    (dg.EnvVar, never their values)."""

    home: str | None = Field(default=None, description="FLYWHEEL_HOME (default ./data/home)")
    config_path: str | None = Field(default=None, description="the profile, FLYWHEEL_CONFIG (JSON)")
    lake_uri: str | None = Field(default=None, description="the lake's root, FLYWHEEL_LAKE_URI (e.g. s3://bucket/flywheel)")
    storage_options: str | None = Field(default=None, description="object-store credentials as a JSON object, "
                                                                   "FLYWHEEL_STORAGE_OPTIONS")
    llm_judge_api_key: str | None = Field(default=None, description="the LLM judge's key, FLYWHEEL_LLM_JUDGE_API_KEY")
    _parsed: FlywheelConfig | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._parsed = self._load()  # once per run: every step of the run reads the same settings

    def _load(self) -> FlywheelConfig:
        config = load_config(self.home, self.config_path)
        if self.llm_judge_api_key:
            config.llm_judge.api_key = self.llm_judge_api_key
        return config

    def config(self) -> FlywheelConfig:
        return self._parsed if self._parsed is not None else self._load()

    def lake(self) -> Lake:
        return Lake(self.config(), root=self.lake_uri, storage_options=self.storage_options)

    def now(self) -> datetime:
        return clock.now(self.config())

    def registry(self, context=None) -> ModelRegistry:
        """With a run's `context`, every change is also a materialization of model_registry in that run."""
        config = self.config()
        from flywheel_assets.defs.records import registry_changed

        on_change = None if context is None else (lambda rows: context.log_event(registry_changed(rows)))
        return ModelRegistry(self.lake(), clock=lambda: clock.now(config), on_change=on_change)


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

    # Settings that come from the environment are EnvVars, so the UI names the variable, not
    # its value; one left unset keeps the default (EnvVar of an unset variable is an error).
    from_env = {field: dg.EnvVar(variable) for field, variable in (
        ("lake_uri", "FLYWHEEL_LAKE_URI"), ("storage_options", "FLYWHEEL_STORAGE_OPTIONS"),
        ("llm_judge_api_key", "FLYWHEEL_LLM_JUDGE_API_KEY")) if os.environ.get(variable)}
    # The catalog's path is FLYWHEEL_HOME's at load time: where `make dev` and the demo keep it.
    return dg.Definitions(resources={"flywheel": FlywheelResource(**from_env),
                                     "catalog": DuckDBResource(database=str(load_config().home / CATALOG_NAME))})
