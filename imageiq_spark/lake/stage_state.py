"""What a stage's last run left behind, so a rerun with nothing new can report it without redoing it.

A stage whose output follows from tables records, when a run ends, the newest Delta version of each
table it read or wrote (from the `_delta_log` listings: no Spark job) beside what it found; a rerun
that finds every table at those versions would find the same. One JSON file per stage under
<storage.root>/state/, written whole: readers see the old file or the new one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pyspark.sql import SparkSession

from imageiq_spark.core.config import Config
from imageiq_spark.lake import delta_log, lakehouse, storage


def table_versions(spark: SparkSession, config: Config, tables: Iterable[str]) -> dict[str, int | None]:
    """The newest Delta version of each table, None for a table that does not exist."""
    return {table: delta_log.latest_version(spark, lakehouse.table_location(config, table))
            if lakehouse.table_exists(spark, config, table) else None for table in tables}


def state_uri(config: Config, stage: str) -> str:
    return lakehouse.lake_path(config, "state", f"{stage}.json")


def read(config: Config, stage: str) -> dict[str, Any] | None:
    """The stage's recorded state, None when there is none (or a file this code did not write)."""
    raw = storage.read_bytes(state_uri(config, stage))
    try:
        state = json.loads(raw) if raw else None
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def unchanged(config: Config, stage: str, settings: str,
              versions: dict[str, int | None]) -> dict[str, Any] | None:
    """What the stage's last run found, when it ran with these settings on tables at these versions."""
    state = read(config, stage)
    if state and state.get("settings") == settings and state.get("versions") == versions:
        return state.get("found")
    return None


def record(config: Config, stage: str, settings: str, versions: dict[str, int | None],
           found: dict[str, Any]) -> None:
    state = {"settings": settings, "versions": versions, "found": found}
    storage.write_bytes(state_uri(config, stage), json.dumps(state, sort_keys=True).encode())
