"""What `monitor`'s last run read and reported, so that a rerun with nothing new costs no Spark job.

A run that writes drift rows records its state in the commit of its `monitor_drift` MERGE, as
Delta's commitInfo `userMetadata`: atomic with the rows, no table or column of its own, and read
back from the newest `_delta_log` commit file on the driver (milliseconds, no Spark job). The
state holds the run's `inputs`, found before it reads them: the Delta log versions of
`predictions`, `images`, `quarantine`, `prepared` (the baseline) and `image_profiles` (as this
run's profiling left it), a hash of the serving request log's files, the champion (name, version,
run), the lookback's first day and the `monitor` settings; and its `summary` (windows, latest
window and values, alerts, report). The drift MERGE is the run's last write (after profiles,
alerts and the report), so a recorded state means all of the run's results are in.

A rerun whose inputs equal the newest commit's state reports that summary again and writes no
table; one whose `images` and `image_profiles` are as the last run left them skips the profiling
check. A commit without a state (a Spark Connect client, which cannot read the log; an OPTIMIZE)
or other inputs mean the work is done again, as before this shortcut.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from typing import Any

from pyarrow import fs
from pyspark.sql import SparkSession

from imageiq_spark.core.config import Config, to_dict
from imageiq_spark.lake import delta_log, lakehouse, storage
from imageiq_spark.stages.monitor.windows import Champion

log = logging.getLogger(__name__)

#: Delta's session setting whose value each commit of the session carries as `userMetadata`.
USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
#: The Delta tables `monitor` reads (a run records `image_profiles` as its profiling left it).
INPUT_TABLES = ("predictions", "images", "quarantine", "prepared", "image_profiles")
#: Where the state is recorded: the table `monitor` writes last.
RECORDED_IN = "monitor_drift"


def version(config: Config, table: str) -> int | None:
    """The table's newest Delta log version (None: no table), listed without a Spark job."""
    versions = delta_log.log_versions(lakehouse.table_location(config, table))
    return max(versions) if versions else None


def request_log_files(config: Config) -> str:
    """A hash of the serving request log's files (path, size, modification time): its version."""
    filesystem, path = storage.filesystem(lakehouse.lake_path(config, "request_log"))
    listing = filesystem.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted((f.path, f.size, f.mtime_ns) for f in listing if f.type == fs.FileType.File)
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def inputs(spark: SparkSession, config: Config, model: Champion, since: datetime.datetime
           ) -> dict[str, Any] | None:
    """What this run reads, as versions; None where the driver cannot list the lake (then every run
    does the work)."""
    if not delta_log.readable(spark):
        return None
    try:
        versions: dict[str, Any] = {table: version(config, table) for table in INPUT_TABLES}
        versions["request_log"] = request_log_files(config)
    except (OSError, ValueError) as exc:  # pyarrow's: no such file system, no access
        log.debug("listing the inputs failed (%s): monitoring in full", exc)
        return None
    read = {"tables": versions, "champion": [model.name, model.version, model.run_id],
            "since": since.isoformat(), "settings": to_dict(config.monitor)}
    return json.loads(json.dumps(read))  # as a recorded state reads back: lists, not tuples


def with_profiles(config: Config, read: dict[str, Any]) -> dict[str, Any]:
    """`read` with the version of `image_profiles` now (after this run's profiling)."""
    return {**read, "tables": {**read["tables"], "image_profiles": version(config, "image_profiles")}}


def last_recorded(config: Config) -> dict[str, Any] | None:
    """The state in the newest commit of RECORDED_IN, or None (no table, no state, unreadable)."""
    location = lakehouse.table_location(config, RECORDED_IN)
    try:
        versions = delta_log.log_versions(location)
        if not versions:
            return None
        filesystem, path = storage.filesystem(location)
        with filesystem.open_input_stream(f"{path}/_delta_log/{max(versions):020d}.json") as commit:
            actions = [json.loads(line) for line in commit.read().decode().splitlines() if line.strip()]
        metadata = next((a["commitInfo"].get("userMetadata") for a in actions if "commitInfo" in a), None)
        return json.loads(metadata) if metadata else None
    except (OSError, ValueError) as exc:  # a log cleaned up meanwhile, metadata of someone else
        log.debug("no monitor state in %s (%s)", location, exc)
        return None


def unchanged(read: dict[str, Any] | None, recorded: dict[str, Any] | None) -> bool:
    """Whether the last run read what this one would: then its summary still holds."""
    return read is not None and recorded is not None and read == recorded.get("inputs")


def profiled(read: dict[str, Any] | None, recorded: dict[str, Any] | None) -> bool:
    """Whether every image was profiled at the last run and neither table changed since."""
    if read is None or recorded is None:
        return False
    before = recorded.get("inputs", {}).get("tables", {})
    return all(before.get(table) == read["tables"][table] for table in ("images", "image_profiles"))


def recording(spark: SparkSession, state: dict[str, Any] | None) -> SparkSession:
    """A session of its own whose Delta commits carry `state` (`spark` itself without a state)."""
    if state is None:
        return spark
    session = spark.newSession()
    session.conf.set(USER_METADATA, json.dumps(state, sort_keys=True))
    return session
