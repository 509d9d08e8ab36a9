"""Operator commands that move the `champion` alias: `imageiq promote VERSION --reason TEXT` and
`imageiq rollback --reason TEXT`.

The registry alias and the `model_aliases` table move together (the registry first; if the table
cannot be written the registry alias is put back), and every move lands in `alias_history` with
its action, reason and user, and as tags on the version (`imageiq.champion_action`,
`imageiq.champion_reason`). `rollback` goes back to the champion before the current one: the
champion moves of `alias_history` form a stack (the gate's and `promote`'s moves push, `rollback`
pops), so rolling back twice goes back two champions, never forth.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.core.summary import aligned
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.lake.tracking import (
    CHAMPION,
    configure_mlflow,
    record_alias,
    registry_client,
    registry_uri,
)

REASON_TAG = "imageiq.champion_reason"
ACTION_TAG = "imageiq.champion_action"


@dataclass(frozen=True)
class AliasMove:
    model_name: str
    version: str
    previous: str | None
    action: str
    reason: str

    def counts(self) -> RunCounts:
        return RunCounts(model_name=self.model_name, model_version=self.version)

    def lines(self) -> list[str]:
        if self.previous == self.version:
            return aligned([("champion", f"{self.model_name} version {self.version} already; nothing moved")])
        return aligned([("champion", f"{self.model_name} version {self.previous or 'none'} -> {self.version} "
                                     f"({self.action})"), ("reason", self.reason)])


def _client_and_champion(config: Config) -> tuple[MlflowClient, str | None]:
    configure_mlflow(config)
    client = registry_client(config)
    try:
        current = str(client.get_model_version_by_alias(config.mlflow.registered_model, CHAMPION).version)
    except MlflowException:
        current = None
    return client, current


def _require_reason(reason: str, command: str) -> str:
    if not reason.strip():
        raise ConfigError(f"{command}: --reason is empty; say why the champion moves, e.g. "
                          f"--reason \"v3 mislabels night photos\"")
    return reason.strip()


def _move(spark: SparkSession, config: Config, client: MlflowClient, version: str, previous: str | None,
          action: str, reason: str) -> AliasMove:
    name = config.mlflow.registered_model
    client.set_registered_model_alias(name, CHAMPION, version)
    try:
        record_alias(spark, config, name, CHAMPION, version, action=action, reason=reason)
    except BaseException:
        # Registry and table move together or not at all.
        if previous is None:
            client.delete_registered_model_alias(name, CHAMPION)
        else:
            client.set_registered_model_alias(name, CHAMPION, previous)
        raise
    client.set_model_version_tag(name, version, ACTION_TAG, action)
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    return AliasMove(name, version, previous, action, reason)


def promote(spark: SparkSession, config: Config, version: str, reason: str) -> AliasMove:
    """Give `champion` to registered version `version` of `mlflow.registered_model`."""
    reason = _require_reason(reason, "promote")
    client, current = _client_and_champion(config)
    name = config.mlflow.registered_model
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise ConfigError(
            f"promote: version '{version}' of model '{name}' is not in the registry at "
            f"{registry_uri(config)}; registered versions: {', '.join(map(str, known)) or 'none'}. "
            "Pass one of them (or set mlflow.registered_model)"
        ) from exc
    if current == version:
        return AliasMove(name, version, current, "promote", reason)
    return _move(spark, config, client, version, current, "promote", reason)


def champion_stack(spark: SparkSession, config: Config) -> list[str]:
    """Champions of `mlflow.registered_model` in the order they took over, as `alias_history`
    records them; a rollback takes the top one off."""
    if not lakehouse.table_exists(spark, config, "alias_history"):
        return []
    moves = (lakehouse.read_table(spark, config, "alias_history")
             .where((F.col("model_name") == config.mlflow.registered_model) & (F.col("alias") == CHAMPION))
             .orderBy("changed_at").select("model_version", "action").collect())
    stack: list[str] = []
    for version, action in moves:
        if action == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != version:
            stack.append(version)
    return stack


def rollback(spark: SparkSession, config: Config, reason: str) -> AliasMove:
    """Give `champion` back to the version that held it before the current one."""
    reason = _require_reason(reason, "rollback")
    client, current = _client_and_champion(config)
    stack = champion_stack(spark, config)
    if stack and stack[-1] == current:
        stack.pop()
    if not stack:
        raise ConfigError(
            f"rollback: model '{config.mlflow.registered_model}' has no previous champion in "
            f"{config.catalog.database}.alias_history (current champion: {current or 'none'}); "
            "give the alias to a version explicitly with `imageiq promote VERSION --reason TEXT`"
        )
    return _move(spark, config, client, stack[-1], current, "rollback", reason)
