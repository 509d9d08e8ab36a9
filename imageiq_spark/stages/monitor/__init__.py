"""Monitor: profiles and drift of the champion's predictions and of the images it scored, per
window, against the champion's baseline -> `monitor_profiles`, `monitor_drift`, `alerts`.

The baseline is what the champion was trained on: the `prepared` rows of its preprocess version
prepared before its training run started (its tags name the version; the timestamp pins the
rows, so the baseline survives table copies and VACUUM). Image properties come from its train
split; label mix, confidence and accuracy from its predictions on the val split, images it never
fitted. A window (`monitor.window`: day or hour) holds the champion's predictions of images
outside that baseline by `scored_at`, and the images outside it by `ingested_at`.

Where the time goes: one pass over the champion's predictions (they carry the image's label, so
accuracy needs no join) and one over `image_profiles` (one row per image with its properties,
format and size), each split from the baseline by a join with the baseline's image ids. Each task
counts its rows per (window, variable, category or grid value) in Arrow (`counts.CountBatches`),
so a million predictions reach the driver as a few thousand counts, and `drift` computes the
statistics from those. Brightness, contrast and sharpness need a decode: `image_profiles` keeps
them, computed once per image.

A rerun with nothing new (the same table versions from the Delta logs, champion, lookback and
settings as the last run recorded: `state`) reads and writes no table: it reports the last run's
summary again and rewrites the Prometheus textfile.

Here: the run and its writes. Beside it: `profiles` (the images' properties), `windows` (the
champion, its baseline and the windows' rows), `counts` (distributions and drift statistics),
`alerts` (thresholds and breaches), `state` (what the last run read and reported), `report`
(picture, Markdown) and `prometheus` (the textfile).
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyspark.sql import SparkSession

from imageiq_spark.core import tables
from imageiq_spark.core.clock import UTC, utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Row, Stopwatch, aligned
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.stages.monitor import state
from imageiq_spark.stages.monitor.alerts import Alert, alerts_for, thresholds
from imageiq_spark.stages.monitor.counts import (
    BASELINE,
    BATCH,
    Distributions,
    collect_sides,
    drift_metrics,
    profile_metrics,
)
from imageiq_spark.stages.monitor.profiles import update_image_profiles
from imageiq_spark.stages.monitor.prometheus import write_textfile
from imageiq_spark.stages.monitor.windows import Champion, champion, population, quarantine_rates, window_end

T = TypeVar("T")
log = logging.getLogger(__name__)

#: The key columns of `monitor_profiles` and `monitor_drift`: one row per window, source, model, metric.
_WINDOW_COLUMNS = (
    "window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, source STRING NOT NULL, "
    "model_name STRING NOT NULL, model_version STRING NOT NULL, metric STRING NOT NULL, "
)
PROFILES_SCHEMA = tables.schema(
    _WINDOW_COLUMNS + "key STRING, value DOUBLE, rows BIGINT NOT NULL, computed_at TIMESTAMP NOT NULL"
)
DRIFT_SCHEMA = tables.schema(
    _WINDOW_COLUMNS + "value DOUBLE, threshold DOUBLE, window_rows BIGINT NOT NULL, "
    "baseline_rows BIGINT NOT NULL, computed_at TIMESTAMP NOT NULL"
)
ALERTS_SCHEMA = tables.schema(
    "metric STRING NOT NULL, window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, "
    "source STRING NOT NULL, model_name STRING NOT NULL, model_version STRING NOT NULL, "
    "value DOUBLE NOT NULL, threshold DOUBLE NOT NULL, severity STRING NOT NULL, "
    "raised_at TIMESTAMP NOT NULL"
)
ALERT_KEYS = ["metric", "window_start", "source", "model_name", "model_version"]
#: A window's row of `monitor_profiles` or `monitor_drift` (a profile's adds its key), upserted.
WINDOW_KEYS = ("t.window_start = s.window_start AND t.source = s.source AND t.model_name = s.model_name "
               "AND t.model_version = s.model_version AND t.metric = s.metric")
UPSERT = "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"


@dataclass
class MonitorSummary:
    model_name: str = ""
    model_version: str = ""
    windows: int = 0
    profiled_images: int = 0
    latest_window: datetime.datetime | None = None
    latest: dict[str, float] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    report_uri: str = ""
    textfile: str = ""
    watch: Stopwatch = field(default_factory=Stopwatch)
    #: Predictions (and served requests) counted in this run's windows.
    counted: int = 0

    def latest_alerts(self) -> list[Alert]:
        """Breaches in the newest batch window: what a scheduler pages on (older ones already did)."""
        return [a for a in self.alerts if a.source == BATCH and a.window_start == self.latest_window]

    def reported(self) -> dict[str, Any]:
        """What a rerun with nothing new reports again (`state`): JSON values."""
        return {"windows": self.windows, "report_uri": self.report_uri,
                "latest": {metric: float(value) for metric, value in self.latest.items()},
                "latest_window": self.latest_window and self.latest_window.isoformat(),
                "alerts": [[a.metric, a.source, a.window_start.isoformat(), float(a.value), a.threshold,
                            a.severity] for a in self.alerts]}

    @classmethod
    def again(cls, model: Champion, reported: dict[str, Any], watch: Stopwatch) -> MonitorSummary:
        """The summary `reported` recorded, for a rerun that profiled no new image."""
        latest = reported["latest_window"]
        return cls(model.name, model.version, reported["windows"], watch=watch,
                   latest_window=latest and datetime.datetime.fromisoformat(latest),
                   latest=reported["latest"], report_uri=reported["report_uri"],
                   alerts=[Alert(metric, source, datetime.datetime.fromisoformat(start), value, threshold,
                                 severity) for metric, source, start, value, threshold, severity
                           in reported["alerts"]])

    def counts(self) -> RunCounts:
        return RunCounts(read=self.windows, written=len(self.alerts), model_name=self.model_name,
                         model_version=self.model_version)

    def lines(self) -> list[str]:
        rows: list[Row] = [("model", f"{self.model_name} version {self.model_version}"),
                           ("windows", self.windows),
                           ("profiled", f"{self.profiled_images} new images")]
        if self.latest:
            rows.append((f"latest window ({self.latest_window:%Y-%m-%d %H:%M})",
                         ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.latest.items()))))
        rows.append(("alerts", len(self.alerts)))
        rows += [f"  {a.severity:<8} {a.metric} = {a.value:.4f} > {a.threshold} in {a.source} window "
                 f"{a.window_start:%Y-%m-%d %H:%M}" for a in self.alerts]
        if self.report_uri:
            rows.append(("report", self.report_uri))
        if self.textfile:
            rows.append(("prometheus", self.textfile))
        rows.append(self.watch.row(self.counted, "predictions"))
        return aligned(rows)



def run(spark: SparkSession, config: Config) -> MonitorSummary:
    """Profile every window of the last `monitor.lookback_days` against the champion's baseline."""
    watch = Stopwatch()
    for table in ("images", "prepared", "predictions"):
        if not lakehouse.table_exists(spark, config, table):
            raise RuntimeError(f"table '{table}' does not exist: monitoring needs ingest, preprocess, "
                               "train and score to have run")
    model = champion(config)
    now = utc_now()
    since = datetime.datetime.combine(now.date() - datetime.timedelta(days=config.monitor.lookback_days),
                                      datetime.time(), UTC)
    read, last = state.inputs(spark, config, model, since), state.last_recorded(config)
    if state.unchanged(read, last):
        log.info("nothing new since the last monitor run: reporting its results again")
        summary = MonitorSummary.again(model, last["summary"], watch)
        if summary.latest_window is not None:
            summary.textfile = write_textfile(config, model, summary.latest, summary.latest_alerts())
        watch.stop()
        return summary
    summary = MonitorSummary(model.name, model.version, watch=watch)
    watch.work()
    with ThreadPoolExecutor(1, thread_name_prefix="imageiq-monitor") as pool:
        # Small independent jobs overlap: most of each is driver-side (planning, Delta logs).
        quarantine = pool.submit(quarantine_rates, spark, config, since)
        if not state.profiled(read, last):
            summary.profiled_images = update_image_profiles(spark, config)
        read = read and state.with_profiles(config, read)
        by_window = collect_sides(population(spark, config, model, since))
        rates = quarantine.result()
    watch.done()
    baseline = by_window.pop((BASELINE, None), Distributions())
    summary.counted = sum(side.rows() for side in by_window.values())

    computed_at = utc_now()
    unit = config.monitor.window
    limits = thresholds(config)
    profiles: list[tuple] = [
        (model.trained_at, model.trained_at, BASELINE, model.name, model.version, metric, key, value,
         baseline.rows(), computed_at) for metric, key, value in profile_metrics(baseline)]
    drifts: list[tuple] = []
    windows = sorted(set(by_window) | {(BATCH, start) for start in rates})
    for source, start in windows:
        side = by_window.get((source, start), Distributions())
        values = drift_metrics(baseline, side)
        rate, files = rates.get(start, (None, 0)) if source == BATCH else (None, 0)
        if rate is not None:
            values["quarantine_rate"] = rate
        end = window_end(start, unit)
        profiles += [(start, end, source, model.name, model.version, metric, key, value, side.rows(),
                      computed_at) for metric, key, value in profile_metrics(side)]
        drifts += [(start, end, source, model.name, model.version, metric, value, limits.get(metric),
                    side.rows(), baseline.rows(), computed_at) for metric, value in sorted(values.items())]
        summary.alerts += alerts_for(config, source, start, values, side.rows(), files)
        if source == BATCH:
            summary.latest_window, summary.latest = start, values
    summary.windows = len(windows)
    writes = result_writes(spark, config, model, profiles, summary.alerts, unit)
    latest = summary.latest_window
    if latest is None:
        run_together(writes)
    else:
        from imageiq_spark.stages.monitor import report  # matplotlib loads only to draw one

        raised = summary.latest_alerts()
        # The report (PNG, Markdown, MLflow run) is made while the tables are written.
        drawn = functools.partial(report.write_report, config, model, baseline,
                                  by_window.get((BATCH, latest), Distributions()), latest, summary.latest,
                                  raised)
        summary.report_uri, *_ = run_together([drawn, *writes])
        summary.textfile = write_textfile(config, model, summary.latest, raised)
    # Last: its commit records this run's state, which only a run whose other writes are in may do.
    write_drift(spark, config, drifts, read and {"inputs": read, "summary": summary.reported()})
    watch.stop()
    return summary


def result_writes(spark: SparkSession, config: Config, model: Champion, profiles: list[tuple],
                  alerts: list[Alert], unit: str) -> list[Callable[[], object]]:
    """The writes of this run's profiles and alerts, one per table (`run_together` runs them):
    profiles upserted (a window still open changes), alerts insert-only."""
    writes: list[Callable[[], object]] = []
    lakehouse.ensure_table(spark, config, "monitor_profiles", PROFILES_SCHEMA)
    if profiles:
        writes.append(functools.partial(lakehouse.merge, config, "monitor_profiles",
                                        spark.createDataFrame(profiles, PROFILES_SCHEMA),
                                        WINDOW_KEYS + " AND t.key <=> s.key", UPSERT))
    lakehouse.ensure_table(spark, config, "alerts", ALERTS_SCHEMA)
    if alerts:
        raised_at = utc_now()
        rows = [(a.metric, a.window_start, window_end(a.window_start, unit), a.source, model.name,
                 model.version, a.value, a.threshold, a.severity, raised_at) for a in alerts]
        writes.append(functools.partial(lakehouse.merge_new_rows, config, "alerts",
                                        spark.createDataFrame(rows, ALERTS_SCHEMA), ALERT_KEYS))
    return writes


def write_drift(spark: SparkSession, config: Config, drifts: list[tuple], recorded: dict[str, Any] | None
                ) -> None:
    """Upsert the drift rows, their commit carrying `recorded` (`state`) where there is one."""
    lakehouse.ensure_table(spark, config, "monitor_drift", DRIFT_SCHEMA)
    if drifts:
        session = state.recording(spark, recorded)
        lakehouse.merge(config, "monitor_drift", session.createDataFrame(drifts, DRIFT_SCHEMA), WINDOW_KEYS,
                        UPSERT)


def run_together(actions: list[Callable[[], T]]) -> list[T]:
    """Run independent writes (different tables, the report) at once; their results in order, or
    the first failure raised once all have ended. Each is mostly driver-side work (a Delta MERGE
    of a few hundred rows: plans, log reads, a commit), so together they take little longer than
    the longest."""
    with ThreadPoolExecutor(max(1, len(actions)), thread_name_prefix="imageiq-monitor") as pool:
        running = [pool.submit(action) for action in actions]
    return [done.result() for done in running]
