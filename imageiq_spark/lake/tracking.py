"""MLflow set-up shared by train, evaluate and score, and the `model_aliases` and `alias_history`
tables.

Without `mlflow.tracking_uri` the tracking store is SQLite at `<storage.root>/mlflow.db` and the
artifacts live under `<storage.root>/mlruns`, so a lakehouse folder carries its whole history.
The model registry is the tracking store unless `mlflow.registry_uri` names another
(`databricks-uc` for Unity Catalog, whose model names are `<catalog>.<schema>.<model>`).
"""

from __future__ import annotations

import getpass
import logging
import os
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.core.redact import redact, redact_settings
from imageiq_spark.core.tables import schema
from imageiq_spark.lake import conflicts, lakehouse
from imageiq_spark.lake.session import storage_uri

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow writes "View run ... at: <tracking URI>" to stdout: results only go there, and the URI
# may hold a password.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ALIASES_SCHEMA = schema(
    "model_name STRING NOT NULL, alias STRING NOT NULL, model_version STRING NOT NULL, "
    "updated_at TIMESTAMP NOT NULL"
)
#: One row per alias move: the gate's (`gate`), an operator's `promote` or `rollback`.
ALIAS_HISTORY_SCHEMA = schema(
    "model_name STRING NOT NULL, alias STRING NOT NULL, model_version STRING NOT NULL, "
    "previous_version STRING, action STRING NOT NULL, reason STRING NOT NULL, changed_by STRING, "
    "changed_at TIMESTAMP NOT NULL"
)


def tracking_uri(config: Config) -> str:
    if config.mlflow.tracking_uri:
        return config.mlflow.tracking_uri
    root = storage_uri(config.storage.root)
    if not root.startswith("file:"):
        raise ConfigError(
            f"config key 'mlflow.tracking_uri' is required when storage.root ('{config.storage.root}') "
            "is not a local path: SQLite cannot live in object storage; set it to a tracking server "
            "(http://...) or a database URI"
        )
    path = Path(config.storage.root).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def registry_uri(config: Config) -> str:
    return config.mlflow.registry_uri or tracking_uri(config)


def registry_client(config: Config) -> MlflowClient:
    """A client of the project's tracking store and registry (set explicitly: an MlflowClient made
    before `configure_mlflow` would take MLflow's defaults)."""
    return MlflowClient(tracking_uri=tracking_uri(config), registry_uri=registry_uri(config))


def artifact_location(config: Config) -> str | None:
    """`<storage.root>/mlruns` for a store of our own; MLflow speaks `s3://` where Spark speaks
    `s3a://`. A tracking server chooses (None): it proxies artifacts to its own destination, so
    clients and executors need no keys of the bucket behind it."""
    if config.mlflow.tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    root = storage_uri(config.storage.root)
    if root.startswith("s3a://"):
        root = "s3://" + root[len("s3a://"):]
    return f"{root}/mlruns"


def configure_mlflow(config: Config) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(config))
    mlflow.set_registry_uri(registry_uri(config))
    name = config.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location(config))
        except MlflowException:
            # A concurrent job created it first.
            experiment_id = mlflow.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def redact_run_tags(run_id: str) -> None:
    """Overwrite the run's tags that hold a credential with their redacted values: MLflow tags a run
    by itself, e.g. `mlflow.source.git.repoURL` from a remote like `https://user:token@host/repo`."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    for name, value in redact_settings(tags).items():
        if value != tags[name]:
            client.set_tag(run_id, name, value)


def default_model_uri(config: Config) -> str:
    return f"models:/{config.mlflow.registered_model}@{CHAMPION}"


def resolve_model(config: Config, model_uri: str) -> tuple[str, str, str]:
    """`models:/name@alias` or `models:/name/version` -> (name, version, run_id)."""
    configure_mlflow(config)
    if not model_uri.startswith("models:/"):
        raise ConfigError(
            f"--model expects a registry URI models:/<name>@<alias> or models:/<name>/<version>, "
            f"got '{model_uri}'"
        )
    ref = model_uri[len("models:/"):].strip("/")
    client = registry_client(config)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.rpartition("/")
            if not name or not number.isdigit():
                raise ConfigError(
                    f"--model expects models:/<name>@<alias> or models:/<name>/<version>, got '{model_uri}'"
                )
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise ConfigError(
            f"--model '{model_uri}' is not in the registry at {redact(registry_uri(config))}: {exc.message}. "
            "Train a model first (`imageiq train`) or pass an existing models:/ URI"
        ) from exc
    return name, str(version.version), version.run_id


def recorded_alias(spark: SparkSession, config: Config, name: str, alias: str) -> str | None:
    """The version `model_aliases` gives the alias, or None."""
    if not lakehouse.table_exists(spark, config, "model_aliases"):
        return None
    row = (lakehouse.read_table(spark, config, "model_aliases")
           .where((F.col("model_name") == name) & (F.col("alias") == alias)).select("model_version").first())
    return None if row is None else row[0]


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return None


def record_alias(spark: SparkSession, config: Config, name: str, alias: str, version: str,
                 action: str = "gate", reason: str = "") -> None:
    """Upsert (model_name, alias) -> model_version into the Delta table `model_aliases`, and
    append the move, with its reason, to `alias_history`."""
    previous = recorded_alias(spark, config, name, alias)
    lakehouse.ensure_table(spark, config, "model_aliases", MODEL_ALIASES_SCHEMA)
    lakehouse.ensure_table(spark, config, "alias_history", ALIAS_HISTORY_SCHEMA)
    rows = spark.createDataFrame(
        [(name, alias, str(version))], "model_name string, alias string, model_version string"
    ).withColumn("updated_at", F.current_timestamp())
    lakehouse.merge(
        config, "model_aliases", rows, "t.model_name = s.model_name AND t.alias = s.alias",
        "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *",
    )
    move = spark.createDataFrame(
        [(name, alias, str(version), previous, action, reason, _user(), utc_now())],
        ALIAS_HISTORY_SCHEMA,
    )
    conflicts.with_conflict_retry(
        lambda: move.write.format("delta").mode("append").save(
            lakehouse.table_location(config, "alias_history")),
        "append alias_history",
    )
    lakehouse.register_tables(spark, config)
