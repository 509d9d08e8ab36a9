"""`monitor`'s alerts: a drift metric over its `monitor.thresholds` value in a window large enough
to judge, `critical` over `monitor.critical_factor` times the threshold, else `warning`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from imageiq_spark.core.config import Config, to_dict


@dataclass(frozen=True)
class Alert:
    metric: str
    source: str
    window_start: datetime.datetime
    value: float
    threshold: float
    severity: str


def thresholds(config: Config) -> dict[str, float | None]:
    return to_dict(config.monitor.thresholds)


def alerts_for(config: Config, source: str, window: datetime.datetime, values: dict[str, float],
               rows: int, files: int) -> list[Alert]:
    """The breaches of one window. Windows too small to judge raise none."""
    alerts = []
    for metric, value in sorted(values.items()):
        threshold = thresholds(config).get(metric)
        judged_rows = files if metric == "quarantine_rate" else rows
        if threshold is None or judged_rows < config.monitor.min_rows or not value > threshold:
            continue
        severity = "critical" if value > config.monitor.critical_factor * threshold else "warning"
        alerts.append(Alert(metric, source, window, value, threshold, severity))
    return alerts
