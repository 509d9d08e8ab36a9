"""The optional request log: online predictions as Parquet files under
`<storage.root>/request_log/request_date=YYYY-MM-DD/` that `spark.read.parquet` reads.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import pyarrow as pa

from imageiq_spark.lake import storage

log = logging.getLogger(__name__)

REQUEST_LOG_ROWS = 1000

REQUEST_LOG_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("predicted_label", pa.string()),
        ("confidence", pa.float64()),
        ("top_k", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("route", pa.string()),
        ("size_bytes", pa.int64()),
        ("requested_at", pa.timestamp("us", tz="UTC")),
    ]
)


class RequestLog:
    """Online predictions buffered, then written as Parquet files (one per flush) under `uri`."""

    def __init__(self, uri: str) -> None:
        self.filesystem, self.path = storage.filesystem(uri)
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, rows: list[dict[str, Any]]) -> bool:
        """Buffer rows; True when the buffer is big enough to write now."""
        with self._lock:
            self._rows.extend(rows)
            return len(self._rows) >= REQUEST_LOG_ROWS

    def flush(self) -> int:
        import pyarrow.parquet as pq

        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return 0
        day = rows[0]["requested_at"].date().isoformat()
        folder = f"{self.path}/request_date={day}"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        try:
            self.filesystem.create_dir(folder, recursive=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=REQUEST_LOG_SCHEMA),
                           f"{folder}/part-{stamp}-{uuid.uuid4().hex[:12]}.parquet",
                           filesystem=self.filesystem)
        except (OSError, pa.ArrowException) as exc:  # storage away: keep serving, retry later
            log.warning("request log: could not write %d rows (%s); retrying with the next write",
                        len(rows), exc)
            with self._lock:
                self._rows[:0] = rows[-REQUEST_LOG_ROWS * 10:]  # bounded: the oldest are dropped
            return 0
        return len(rows)
