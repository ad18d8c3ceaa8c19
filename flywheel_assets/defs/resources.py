"""Resources and the metadata helpers every stage uses."""

import base64
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from flywheel_assets.lib import clock
from flywheel_assets.lib.config import ENVIRONMENT, FlywheelConfig, load_config
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.ingest.lock import writing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import Table


def get_env() -> str:
    """LOCAL on a laptop; CLUSTER when DAGSTER_DEPLOYMENT says so (Postgres storage,
    a run launcher and executor configured in that deployment's dagster.yaml)."""
    return "CLUSTER" if os.environ.get("DAGSTER_DEPLOYMENT", "local").lower() in ("cluster", "prod") else "LOCAL"


EXECUTORS = ("in_process", "multiprocess", "dask")


def executor_name() -> str:
    """FLYWHEEL_EXECUTOR, else in_process on a laptop and multiprocess in a cluster."""
    name = os.environ.get("FLYWHEEL_EXECUTOR") or ("in_process" if get_env() == "LOCAL" else "multiprocess")
    if name not in EXECUTORS:
        raise ValueError(f"FLYWHEEL_EXECUTOR must be one of {', '.join(EXECUTORS)}, got {name!r}")
    return name


def training_run_tags() -> dict[str, str]:
    """FLYWHEEL_TRAINING_RUN_TAGS, a JSON object: tags every run of the jobs that train carries (base_model_job,
    cycle_job) — on Kubernetes, `dagster-k8s/config` puts those runs' pods on a GPU node pool (docs/scaling-out.md).
    A value that is not a string is passed as its JSON."""
    text = os.environ.get("FLYWHEEL_TRAINING_RUN_TAGS")
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError as error:
        raise ValueError(f"FLYWHEEL_TRAINING_RUN_TAGS is not JSON: {error}") from None
    if not isinstance(tags, dict):
        raise ValueError("FLYWHEEL_TRAINING_RUN_TAGS must be a JSON object of tag: value")
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in tags.items()}


def executor() -> dg.ExecutorDefinition | None:
    """The executor every job runs its steps with (README: Scaling out).

    in_process: two cores, one step at a time keeps training and DuckDB from fighting for them, in the
    run's own process (a process per step cost 8-10 s of start-up for ~1 s of work). multiprocess:
    Dagster's default, a process per step. dask: each step a task on the Dask cluster whose scheduler
    FLYWHEEL_DASK_SCHEDULER names (tcp://host:8786), workers on any host (flywheel_assets/dask_executor.py);
    needs the `scaleout` extra and a persistent instance (DAGSTER_HOME)."""
    name = executor_name()
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return None  # Dagster's default
    address = os.environ.get("FLYWHEEL_DASK_SCHEDULER")
    if not address:
        raise ValueError("FLYWHEEL_EXECUTOR=dask needs FLYWHEEL_DASK_SCHEDULER (the scheduler's tcp://host:port)")
    from flywheel_assets.dask_executor import dask_executor

    return dask_executor.configured({"address": address}, name="dask")


def _value(field):
    """A field's value. In a run Dagster has resolved every EnvVar already; the CLI and the demo
    driver also use the resources outside a run, where an EnvVar is still the variable's name."""
    return field.get_value() if isinstance(field, dg.EnvVar) else field


class LakeResource(dg.ConfigurableResource):
    """The lake: where every Delta table lives (FLYWHEEL_HOME/lake unless `uri` names another root)."""

    uri: str | None = Field(default=None, description="the lake's root, FLYWHEEL_LAKE_URI "
                                                      "(e.g. s3://bucket/flywheel; default FLYWHEEL_HOME/lake)")
    storage_options: str | None = Field(default=None, description="object-store credentials as a JSON object, "
                                                                  "FLYWHEEL_STORAGE_OPTIONS")

    def lake(self, config: FlywheelConfig) -> Lake:
        return Lake(config, root=_value(self.uri), storage_options=_value(self.storage_options))


class ModelStoreResource(dg.ConfigurableResource):
    """The model store: the base model and every trained adapter, by version."""

    root: str | None = Field(default=None, description="FLYWHEEL_MODELS_DIR (default FLYWHEEL_HOME/models)")


class EndpointResource(dg.ConfigurableResource):
    """An OpenAI-compatible endpoint: the LLM judge, or the teacher of the cold start and the corrections."""

    url: str | None = Field(default=None, description="the base URL, e.g. https://api.openai.com/v1")
    model: str | None = Field(default=None, description="the model name it is asked for")
    api_key: str | None = Field(default=None, description="the key (an environment variable, never shown)")

    def settings(self) -> dict:
        return {key: value for key, value in (("url", _value(self.url)), ("model", _value(self.model)),
                                              ("api_key", _value(self.api_key))) if value}


class FlywheelResource(dg.ConfigurableResource):
    """The profile (README: Configuration) and the stores it works on: the lake, the model store,
    the LLM judge's and the teacher's endpoints, each its own resource on the UI's resource page
    (secrets come from environment variables as dg.EnvVar, never their values). Parsed once per run."""

    home: str | None = Field(default=None, description="FLYWHEEL_HOME (default ./data/home)")
    config_path: str | None = Field(default=None, description="the profile, FLYWHEEL_CONFIG (JSON)")
    lake_store: LakeResource | None = None
    model_store: ModelStoreResource | None = None
    llm_judge: EndpointResource | None = None
    teacher: EndpointResource | None = None
    engine: DuckDBResource | None = None
    _parsed: FlywheelConfig | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._parsed = self._load()  # once per run: every step of the run reads the same settings

    def _load(self) -> FlywheelConfig:
        config = load_config(self.home, self.config_path)
        for section, endpoint in (("llm_judge", self.llm_judge), ("teacher", self.teacher)):
            if endpoint is not None and endpoint.settings():
                setattr(config, section, getattr(config, section).model_copy(update=endpoint.settings()))
        if self.model_store is not None and _value(self.model_store.root):
            config.models_root = Path(_value(self.model_store.root))
        return config

    def config(self) -> FlywheelConfig:
        return self._parsed if self._parsed is not None else self._load()

    def lake(self) -> Lake:
        return (self.lake_store or LakeResource()).lake(self.config())

    def now(self) -> datetime:
        return clock.now(self.config())

    @contextmanager
    def sql(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection from the `duckdb` resource (in memory: the tables are registered
        into it from the lake) with its settings; closed after."""
        with (self.engine or DuckDBResource(database=":memory:")).get_connection() as con:
            yield con

    @contextmanager
    def writing(self, step: str, context=None) -> Iterator[None]:
        """Held by a step that writes what it derived from the lake: it waits while a `flywheel forget`
        runs, and a forget waits for it (lib/ingest/lock.py `writing`)."""
        config = self.config()
        run = f"run {context.run_id[:8]} " if context is not None else ""
        with writing(config.landing, config.privacy.lock_timeout_s, owner=f"{run}{step}",
                     log=context.log.info if context is not None else None):
            yield

    def registry(self, context=None) -> ModelRegistry:
        """The model registry (a table in the lake). With a run's `context`, every change is also a
        materialization of model_registry in that run."""
        config = self.config()
        from flywheel_assets.defs.records import registry_changed

        on_change = None if context is None else (lambda rows: context.log_event(registry_changed(rows)))
        return ModelRegistry(self.lake(), clock=lambda: clock.now(config), on_change=on_change,
                             tenancy=config.tenancy)


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


class RefreshConfig(dg.Config):
    """full: recompute every row instead of folding in what is new (lib/feedback/refresh.py)."""

    full: bool = False


def refresh_metadata(table, outcome, con_sql: str, flywheel: FlywheelResource, more=None) -> dict:
    """What the refresh read and wrote, and aggregates of the whole table (`con_sql` over view t;
    `more(con)`: further metadata from the same view)."""
    lake = flywheel.lake()
    with flywheel.sql() as con:
        lake.register(con, table, "t")
        cursor = con.execute(con_sql)
        whole = dict(zip([column[0] for column in cursor.description], cursor.fetchone()))
        whole |= more(con) if more else {}
    return table_metadata(table, delta_version=outcome.version, refresh="full" if outcome.full else "incremental",
                          refresh_reason=outcome.reason, rows_written=outcome.rows.num_rows,
                          new_input_rows=dg.MetadataValue.json(outcome.new_rows), **whole) \
        | {"dagster/row_count": lake.row_count(table)}


def markdown_counts(counts: dict, key: str = "value", value: str = "rows") -> dg.MetadataValue:
    total = sum(counts.values()) or 1
    lines = [f"| {key} | {value} | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v} | {v / total:.1%} |" for k, v in counts.items()]
    return dg.MetadataValue.md("\n".join(lines))


def chart_metadata(path: Path, title: str) -> dg.MetadataValue:
    """A PNG chart as markdown with the image inline: the UI shows a path as text, but renders this."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


# The one place the environment configures the resources: each field's variable. Nothing set is
# the local default (everything under FLYWHEEL_HOME); FLYWHEEL_LAKE_URI + FLYWHEEL_STORAGE_OPTIONS
# is the object-store profile. The profile's own variables are lib/config.py's ENVIRONMENT.
RESOURCE_ENVIRONMENT: dict[str, tuple[type[dg.ConfigurableResource], dict[str, str]]] = {
    "lake": (LakeResource, {"uri": "FLYWHEEL_LAKE_URI", "storage_options": "FLYWHEEL_STORAGE_OPTIONS"}),
    "model_store": (ModelStoreResource, {"root": "FLYWHEEL_MODELS_DIR"}),
    **{section: (EndpointResource, {key: variable for s, key, variable in ENVIRONMENT if s == section})
       for section in ("llm_judge", "teacher")},
}


@dg.definitions
def resources() -> dg.Definitions:
    from flywheel_assets.lib.catalog import CATALOG_NAME

    # EnvVar: the UI names the variable, not its value, and reads it when a run starts; a variable
    # left unset keeps the default (an EnvVar of an unset variable is an error).
    stores = {key: kind(**{field: dg.EnvVar(variable) for field, variable in fields.items()
                           if os.environ.get(variable)})
              for key, (kind, fields) in RESOURCE_ENVIRONMENT.items()}
    # the SQL engine of the assets: an in-memory DuckDB per use, the tables registered from the
    # lake; connection_config takes DuckDB's settings (threads, memory_limit, temp_directory)
    stores["duckdb"] = DuckDBResource(database=":memory:")
    flywheel = FlywheelResource(lake_store=stores["lake"], model_store=stores["model_store"],
                                llm_judge=stores["llm_judge"], teacher=stores["teacher"], engine=stores["duckdb"])
    # The catalog's path is FLYWHEEL_HOME's at load time: where `make dev` and the demo keep it.
    return dg.Definitions(resources={"flywheel": flywheel, **stores,
                                     "catalog": DuckDBResource(database=str(load_config().home / CATALOG_NAME))})
