"""`imageiq monitor`'s latest window for Prometheus: node-exporter's textfile-collector file, apart
from `report` so that a rerun with nothing new writes it without loading matplotlib.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from imageiq_spark.core.config import Config
from imageiq_spark.stages.monitor.alerts import Alert
from imageiq_spark.stages.monitor.windows import Champion


def textfile_path(config: Config) -> str | None:
    if config.monitor.textfile:
        return config.monitor.textfile
    root = config.storage.root
    if "://" in root or root.startswith("dbfs:"):
        return None
    return str(Path(root) / "monitor" / f"{config.catalog.database}.prom")


def write_textfile(config: Config, model: Champion, latest: dict[str, float], alerts: Sequence[Alert]) -> str:
    """The latest window's values (`latest`, its `alerts`) in node-exporter's textfile-collector
    format (written atomically)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    path = textfile_path(config)
    if path is None:
        return ""
    registry = CollectorRegistry()
    labels = ["metric", "model_name", "model_version"]
    values = Gauge("imageiq_drift", "Drift of the latest monitored window against the champion's baseline",
                   labels, registry=registry)
    breached = Gauge("imageiq_drift_alert", "1 when the metric breaches its threshold in the latest window",
                     labels, registry=registry)
    raised = {a.metric for a in alerts}
    for metric, value in latest.items():
        values.labels(metric, model.name, model.version).set(value)
        breached.labels(metric, model.name, model.version).set(1 if metric in raised else 0)
    Gauge("imageiq_monitor_last_run_timestamp_seconds", "When monitoring last ran",
          registry=registry).set(time.time())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(path, registry)
    return path

