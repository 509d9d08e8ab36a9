"""What a Delta table's `_delta_log` says, read on the driver without a Spark job.

A table's commits are the files `<version, 20 digits>.json` in its `_delta_log`. Listing the
folder with the driver's file system takes milliseconds where `DESCRIBE HISTORY` or
`DeltaTable.history` runs a Spark job of about a second. A Spark Connect client may not reach the
lake, nor may pyarrow every file system: those ask the server with SQL.
"""

from __future__ import annotations

import logging
import re

from pyarrow import fs
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession

from imageiq_spark.lake import storage
from imageiq_spark.lake.session import is_connect

log = logging.getLogger(__name__)

#: A commit file; a hidden or temporary name is a commit still being written.
COMMIT = re.compile(r"^(\d{20})\.json$")
#: A checkpoint file (single-file, multi-part or V2): its version comes first.
CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint\.")


def log_versions(location: str) -> list[int]:
    """Versions of the commits and checkpoints in `location`/_delta_log, as Delta finds them."""
    filesystem, path = storage.filesystem(location)
    listing = filesystem.get_file_info(fs.FileSelector(f"{path}/_delta_log", allow_not_found=True))
    found = (COMMIT.match(entry.base_name) or CHECKPOINT.match(entry.base_name) for entry in listing)
    return [int(match.group(1)) for match in found if match]


def has_delta_log(location: str) -> bool:
    """Whether `location` holds a Delta table: a commit or a checkpoint in its `_delta_log`."""
    return bool(log_versions(location))


def readable(spark: SparkSession) -> bool:
    """Whether this driver reads `_delta_log` itself (not a Spark Connect client)."""
    return not is_connect(spark)


def is_delta_table(spark: SparkSession, location: str) -> bool:
    """Whether `location` holds a Delta table: listed where the driver reaches the lake, else asked
    with SQL (~80 ms; SQL rather than Delta's Python `DeltaTable`, which Spark Connect serves only
    with Delta's Connect plugin on the server)."""
    if readable(spark):
        try:
            return has_delta_log(location)
        except (OSError, ValueError) as exc:  # pyarrow's errors: no such file system, no access
            log.debug("listing %s/_delta_log failed (%s): asking Spark", location, exc)
    try:
        detail = spark.sql(f"DESCRIBE DETAIL delta.`{location}`").select("format").first()
    except AnalysisException:
        return False
    return detail is not None and detail["format"] == "delta"


def history(spark: SparkSession, location: str, limit: int | None = None) -> DataFrame:
    """The Delta table's commit history, newest first (DESCRIBE HISTORY's columns): a Spark job."""
    return spark.sql(f"DESCRIBE HISTORY delta.`{location}`" + (f" LIMIT {limit}" if limit else ""))


def latest_version(spark: SparkSession, location: str) -> int:
    """The table's newest commit version, from its log's listing where the driver reaches it."""
    if readable(spark):
        try:
            versions = log_versions(location)
            if versions:
                return max(versions)
        except (OSError, ValueError) as exc:
            log.debug("listing %s/_delta_log failed (%s): asking Spark", location, exc)
    return int(history(spark, location, 1).select("version").first()[0])

