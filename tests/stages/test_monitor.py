"""Monitoring: job_runs, status, drift of real batches against a real champion's baseline.

One lake is ingested, preprocessed, trained (a small CNN on 900 real digits) and scored; each
scenario then copies its tables into a database of its own, ingests a batch of 250 held-out
digits (undisturbed, with one class missing, or darkened by 40%), scores it and monitors."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import make_config
from pyspark.sql import functions as F
from scipy import stats

from imageiq_spark import cli
from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.cli.status import status
from imageiq_spark.core.config import to_dict
from imageiq_spark.lake import delta_log, lakehouse, runs
from imageiq_spark.ml import drift
from imageiq_spark.stages import monitor
from imageiq_spark.stages.monitor import report as monitor_report
from imageiq_spark.stages.monitor.alerts import Alert
from imageiq_spark.stages.monitor.counts import (
    BASELINE,
    BATCH,
    ONLINE,
    Distributions,
    collect_sides,
    decode_side,
    drift_metrics,
    side_code,
)
from imageiq_spark.stages.monitor.profiles import IMAGE_PROFILES_SCHEMA, update_image_profiles

# The digits come sorted by label: a seeded shuffle gives every set all ten classes.
ORDER = np.random.default_rng(7).permutation(5000)
BASE, HELD_OUT = ORDER[:900], ORDER[900:1150]
WITHOUT_THREES = int(np.sum(load_digits()[1][HELD_OUT] != 3))
# A champion whose preprocessing equalises contrast (CLAHE), as one should have for images whose
# exposure varies: a darkened batch then changes the images' brightness, not what it predicts.
# Thresholds for windows of a few hundred images: the label mix alerts on PSI alone (the
# Jensen-Shannon distance of 250 images is too noisy to alert on, so it is only profiled).
SECTIONS = {
    "preprocess": {"split": {"train": 0.6, "val": 0.4, "test": 0.0}, "enhance": ["clahe"]},
    "train": {"epochs": 15, "patience": 3, "batch_size": 32, "learning_rate": 0.002,
              "augment": {"contrast": 0.5}},
    "monitor": {"thresholds": {"label_psi": 0.12, "label_js": None}},
}


def write_digits(folder: Path, indices: np.ndarray, darken: float = 1.0,
                 skip_label: int | None = None) -> Path:
    digits, labels = load_digits()
    for i in indices:
        if labels[i] == skip_label:
            continue
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits[i].astype(np.float64) * darken).astype(np.uint8)
        cv2.imwrite(str(folder / str(labels[i]) / f"{i}.png"), pixels)
    return folder


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    source = write_digits(root / "base", BASE)
    config = make_config(root, ingest={"source": str(source)}, **SECTIONS)
    for stage in ("ingest", "preprocess", "train", "score", "monitor"):
        cli.run_stage(spark, config, stage)
    return root, config


def scenario(spark, trained, name: str, **batch) -> tuple:
    """A copy of the trained lake that then ingests, scores and monitors one new batch."""
    root, base = trained
    config = make_config(root, ingest={"source": str(write_digits(root / name, HELD_OUT, **batch))},
                         **SECTIONS)
    for table in ("images", "prepared", "predictions", "model_aliases", "image_profiles"):
        (lakehouse.read_table(spark, base, table).write.format("delta")
         .save(lakehouse.table_location(config, table)))
    for stage in ("ingest", "score"):
        cli.run_stage(spark, config, stage)
    return config, cli.run_stage(spark, config, "monitor")


def alerted(summary) -> set[str]:
    return {a.metric for a in summary.alerts}


@pytest.fixture(scope="module")
def missing_class(spark, trained):
    return scenario(spark, trained, "missing", skip_label=3)


def test_a_batch_without_one_class_raises_the_label_mix_alerts_only(missing_class):
    _, summary = missing_class
    print(summary.lines())
    assert alerted(summary) == {"label_psi"}


def test_the_elapsed_line_paces_the_predictions_of_the_windows(missing_class):
    _, summary = missing_class
    assert summary.counted == WITHOUT_THREES  # the new batch's, its one window
    (line,) = [line for line in summary.lines() if line.startswith("elapsed:")]
    assert " s before the first prediction, then " in line and line.endswith(" s after the last")


def test_alerts_land_in_the_alerts_table_once_per_window_and_metric(spark, missing_class):
    config, summary = missing_class
    cli.run_stage(spark, config, "monitor")  # a rerun raises the same breaches, stored once
    rows = lakehouse.read_table(spark, config, "alerts").collect()
    assert [r["metric"] for r in rows] == ["label_psi"]
    today = datetime.datetime.combine(datetime.date.today(), datetime.time())
    assert {r["window_start"] for r in rows} == {today}
    psi = next(r for r in rows if r["metric"] == "label_psi")
    assert psi["threshold"] == 0.12 and psi["value"] > psi["threshold"]
    assert psi["severity"] == ("critical" if psi["value"] > 0.24 else "warning")


@pytest.mark.slow
def test_a_darkened_batch_raises_the_brightness_alert_only_and_pictures_it(spark, trained):
    _, summary = scenario(spark, trained, "dark", darken=0.6)
    print(summary.lines())
    assert alerted(summary) == {"brightness_ks"}
    # The report's alt text names the picture's panels (monitor_report.panel_names of its figure).
    assert "![predicted label mix, confidence, brightness](drift.png)" in report_text(summary)


@pytest.mark.slow
def test_an_undisturbed_held_out_batch_raises_no_alert(spark, trained):
    _, summary = scenario(spark, trained, "plain")
    print(summary.lines())
    assert alerted(summary) == set()


def test_image_profiles_made_before_the_image_columns_get_them_and_keep_their_values(spark, tmp_path):
    from pyspark.sql.types import StructType

    from imageiq_spark.stages import ingest

    config = make_config(tmp_path, ingest={"source": str(write_digits(tmp_path / "digits", HELD_OUT[:3]))})
    ingest.run(spark, config)
    images = {r.image_id: r for r in lakehouse.read_table(spark, config, "images").collect()}
    first = sorted(images)[0]
    older = StructType(IMAGE_PROFILES_SCHEMA.fields[:5])  # the schema before the image columns
    lakehouse.ensure_table(spark, config, "image_profiles", older)
    lakehouse.merge_new_rows(config, "image_profiles", spark.createDataFrame(
        [(first, 1.0, 2.0, 3.0, datetime.datetime(2026, 1, 1))], older), ["image_id"])

    assert update_image_profiles(spark, config) == 2
    profiles = lakehouse.read_table(spark, config, "image_profiles")
    assert profiles.schema == IMAGE_PROFILES_SCHEMA
    rows = {r.image_id: r for r in profiles.collect()}
    assert sorted(rows) == sorted(images)
    for image, row in rows.items():
        expected = images[image]
        assert (row.format, row.width, row.height, row.ingested_at) == (
            expected.format, expected.width, expected.height, expected.ingested_at)
    assert (rows[first].brightness, rows[first].contrast, rows[first].sharpness) == (1.0, 2.0, 3.0)


def test_a_failed_stage_leaves_a_failed_row_in_job_runs(spark, config):
    lakehouse.ensure_table(spark, config, "prepared", runs.JOB_RUNS_SCHEMA)  # any table but images
    with pytest.raises(RuntimeError, match="run `imageiq ingest` first"):
        cli.run_stage(spark, config, "preprocess")
    (row,) = lakehouse.read_table(spark, config, "job_runs").collect()
    assert (row["stage"], row["status"], row["exit_code"]) == ("preprocess", "failed", 1)
    assert row["error"].startswith("RuntimeError: table images does not exist")
    assert row["ended_at"] >= row["started_at"]
    assert row["config_fingerprint"] == runs.config_fingerprint(config)
    assert row["spark_app_id"] == spark.sparkContext.applicationId


def test_job_runs_hold_each_stage_with_its_counts(spark, trained):
    _, config = trained
    rows = {r["stage"]: r for r in lakehouse.read_table(spark, config, "job_runs").collect()}
    assert sorted(rows) == ["ingest", "monitor", "preprocess", "score", "train"]
    assert all(r["status"] == "succeeded" and r["exit_code"] == 0 for r in rows.values())
    assert (rows["ingest"]["rows_read"], rows["ingest"]["rows_written"]) == (900, 900)
    assert (rows["score"]["rows_written"], rows["score"]["model_version"]) == (900, "1")
    assert rows["train"]["model_name"] == config.mlflow.registered_model


def test_status_prints_the_latest_run_of_each_stage_and_what_is_pending(spark, missing_class):
    config, _ = missing_class
    summary = status(spark, config)
    assert [r["stage"] for r in summary.runs] == ["ingest", "score", "monitor"]
    # The batch's new images were ingested and scored here, never prepared.
    assert list(summary.pending.values()) == [WITHOUT_THREES, 0]
    text = "\n".join(summary.lines())
    assert "not scored by the champion (v1): 0" in text and "monitor    succeeded" in text


def test_monitor_tables_hold_profiles_and_drift_of_the_window(spark, missing_class):
    config, summary = missing_class
    drift_rows = {r["metric"]: r for r in lakehouse.read_table(spark, config, "monitor_drift").collect()}
    assert drift_rows["label_psi"]["value"] == pytest.approx(summary.latest["label_psi"])
    assert drift_rows["label_psi"]["window_rows"] == WITHOUT_THREES
    profiles = lakehouse.read_table(spark, config, "monitor_profiles").where("metric = 'label_share'")
    shares = {(r["source"], r["key"]): r["value"] for r in profiles.collect()}
    assert sum(v for (source, _), v in shares.items() if source == "batch") == pytest.approx(1.0)
    # No 3 in the batch: only the model's few mistakes, if any, are predicted as 3 (a label never
    # predicted in the window has no share row).
    assert shares.get(("batch", "3"), 0.0) < shares[("baseline", "3")] / 4


def test_the_prometheus_text_file_holds_the_latest_values(missing_class):
    _, summary = missing_class
    text = Path(summary.textfile).read_text()
    assert "# TYPE imageiq_drift gauge" in text
    line = next(x for x in text.splitlines() if x.startswith('imageiq_drift_alert{metric="label_psi"'))
    assert line.endswith(" 1.0")
    line = next(x for x in text.splitlines() if x.startswith('imageiq_drift_alert{metric="width_ks"'))
    assert line.endswith(" 0.0")


def report_text(summary: monitor.MonitorSummary) -> str:
    folder = Path(summary.report_uri.removeprefix("file://")).parent
    assert (folder / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return (folder / "report.md").read_text()


def test_the_drift_report_is_a_picture_and_a_table(missing_class):
    _, summary = missing_class
    text = report_text(summary)
    assert "| label_psi |" in text and "**yes**" in text
    # A label alert is drawn in the label mix panel the picture always has: no panel of its own.
    assert "![predicted label mix, confidence](drift.png)" in text


def _side(brightness: list[float], labels: dict[str, int]) -> Distributions:
    values, counts = np.unique(np.round(brightness, 2), return_counts=True)
    grids = {name: (values, counts) for name in ("brightness", "contrast", "sharpness", "width", "height")}
    return Distributions(categories={"label": labels, "format": {"png": 5}, "correct": {"true": 5}},
                         grids={**grids, "confidence": (np.array([0.5, 0.9]), np.array([2, 3]))})


def test_the_drift_picture_adds_a_panel_per_alerting_variable_up_to_its_cap():

    day = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    metrics = ["accuracy_drop", "brightness_ks", "confidence_ks", "contrast_ks", "format_psi", "height_ks",
               "label_js", "label_psi", "quarantine_rate", "sharpness_ks", "width_ks"]
    severity = {"label_psi": "critical"}
    alerts = [Alert(m, BATCH, day, 0.5 + i / 100, 0.3, severity.get(m, "warning"))
              for i, m in enumerate(metrics)]
    baseline, window = _side([120.0, 130.0, 140.0], {"3": 2, "5": 3}), _side([70.5, 80.0], {"5": 5})

    fig = monitor_report.drift_figure(baseline, window, alerts, "digits v1")

    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "predicted label mix\nlabel_js 0.560 > 0.3 (warning)\nlabel_psi 0.570 > 0.3 (critical)",
        "confidence\nconfidence_ks 0.520 > 0.3 (warning)",
        "prediction correct\naccuracy_drop 0.500 > 0.3 (warning)",
        "brightness\nbrightness_ks 0.510 > 0.3 (warning)",
        "contrast\ncontrast_ks 0.530 > 0.3 (warning)",
        "image format\nformat_psi 0.540 > 0.3 (warning)",
        "height\nheight_ks 0.550 > 0.3 (warning)",
        "sharpness\nsharpness_ks 0.590 > 0.3 (warning)",
    ]
    assert monitor_report.panel_names(fig) == [t.split("\n")[0] for t in titles]
    # Six panels beyond the label mix and confidence; the rest, and what has no distribution, by name.
    assert fig.get_suptitle() == "digits v1\nalso alerting, without a panel: quarantine_rate, width_ks"
    brightness = fig.axes[3]
    gap = brightness.collections[0]  # the dotted line at the largest CDF gap: the KS statistic
    assert gap.get_label() == "largest gap 1.000"
    assert [line.get_label() for line in brightness.get_lines()] == ["baseline (train images)", "window"]
    # A panel's title takes its worst alert's colour.
    assert [ax.title.get_color() for ax in fig.axes[:3]] == ["tab:red", "tab:orange", "tab:orange"]


# --- the statistics against scipy's, through the Spark aggregation ------------------------------


@pytest.fixture(scope="module")
def samples(spark):
    """Two confidence samples on the grid and two label samples, counted by Spark."""
    rng = np.random.default_rng(3)
    base = np.round(rng.beta(8, 2, 3000), 4)
    window = np.round(rng.beta(5, 2, 2000), 4)
    base_labels = rng.choice(list("abcd"), 3000, p=[0.4, 0.3, 0.2, 0.1])
    window_labels = rng.choice(list("abce"), 2000, p=[0.25, 0.25, 0.25, 0.25])
    day = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)  # as collect_sides keys it
    rows = ([("baseline", None, str(label), float(c)) for label, c in zip(base_labels, base)]
            + [("batch", day, str(label), float(c)) for label, c in zip(window_labels, window)])
    df = spark.createDataFrame(rows, "source string, window_start timestamp, label string, confidence double")
    counted = collect_sides([df])
    sides = [counted[("baseline", None)], counted[("batch", day)]]
    return base, window, base_labels, window_labels, drift_metrics(*sides)


def test_each_source_and_window_survive_their_integer_side_code(spark):
    utc = datetime.timezone.utc  # window starts come back as aware UTC
    noon = datetime.datetime(2026, 3, 29, 12, 0, tzinfo=utc)
    sides = [(BASELINE, None), (BATCH, noon), (ONLINE, noon),
             (BATCH, datetime.datetime(1969, 12, 31, 23, 0, tzinfo=utc))]
    rows = spark.createDataFrame(sides, "source STRING, window_start TIMESTAMP")
    codes = [r[0] for r in rows.select(side_code(rows["source"], rows["window_start"])).collect()]
    assert [decode_side(code) for code in codes] == sides


def test_partitions_without_rows_are_counted_as_nothing(spark):
    rows = [("baseline", None, "a", 0.9), ("baseline", None, "b", 0.4)]
    df = spark.createDataFrame(rows, "source string, window_start timestamp, label string, confidence double")

    counted = collect_sides([df.repartition(6)])  # four of the six partitions hold no row

    assert counted.keys() == {("baseline", None)}
    assert counted[("baseline", None)].categories["label"] == {"a": 1, "b": 1}


def test_null_values_are_not_counted_and_other_variables_of_the_row_are(spark):
    rows = [("baseline", "a", 0.9, "true"), ("baseline", "b", None, None), ("baseline", None, 0.5, "false")]
    df = spark.createDataFrame(rows, "source string, label string, confidence double, correct string")

    (side,) = collect_sides([df.withColumn("window_start", F.lit(None).cast("timestamp"))]).values()

    assert side.categories == {"label": {"a": 1, "b": 1}, "correct": {"true": 1, "false": 1}}
    values, counts = side.grids["confidence"]
    assert sorted(zip(values.tolist(), counts.tolist())) == [(0.5, 1), (pytest.approx(0.9), 1)]


def test_ks_statistic_equals_scipys(samples):
    base, window, *_, metrics = samples
    assert metrics["confidence_ks"] == pytest.approx(stats.ks_2samp(base, window).statistic, abs=1e-12)


def test_wasserstein_distance_equals_scipys(samples):
    base, window, *_, metrics = samples
    assert metrics["confidence_wasserstein"] == pytest.approx(stats.wasserstein_distance(base, window),
                                                              rel=1e-9)


def test_psi_follows_its_formula_with_unseen_labels_floored(samples):
    _, _, base_labels, window_labels, metrics = samples
    labels = ["a", "b", "c", "d", "e"]
    b = np.array([np.mean(base_labels == x) for x in labels])
    w = np.array([np.mean(window_labels == x) for x in labels])
    b, w = np.maximum(b, drift.PSI_FLOOR), np.maximum(w, drift.PSI_FLOOR)
    assert metrics["label_psi"] == pytest.approx(float(np.sum((w - b) * np.log(w / b))), rel=1e-12)


def test_js_distance_equals_scipys(samples):
    from scipy.spatial.distance import jensenshannon

    _, _, base_labels, window_labels, metrics = samples
    labels = ["a", "b", "c", "d", "e"]
    b = [np.sum(base_labels == x) for x in labels]
    w = [np.sum(window_labels == x) for x in labels]
    assert metrics["label_js"] == pytest.approx(jensenshannon(b, w, base=2), rel=1e-12)


def test_monitor_exits_3_with_fail_on_alert_when_the_newest_window_breaches(
        spark, missing_class, tmp_path, capsys):
    config, summary = missing_class
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(to_dict(config)))
    assert cli.main(["--conf", str(conf), "monitor"]) == 0
    assert cli.main(["--conf", str(conf), "monitor", "--fail-on-alert"]) == cli.ALERT_EXIT_CODE == 3
    assert f"label_psi = {summary.latest['label_psi']:.4f} > 0.12" in capsys.readouterr().out
    runs = (lakehouse.read_table(spark, config, "job_runs").where("stage = 'monitor'")
            .orderBy("started_at").collect())
    assert [(r["status"], r["exit_code"]) for r in runs[-2:]] == [("succeeded", 0), ("succeeded", 3)]


def test_online_predictions_from_the_serving_log_are_a_second_source(spark, missing_class):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imageiq_spark.serving.request_log import REQUEST_LOG_SCHEMA

    config, batch = missing_class
    now = datetime.datetime.now(datetime.timezone.utc)
    # Confidences like the batch's own, every label a 7: only the label mix drifts online.
    confidences = [r["confidence"] for r in lakehouse.read_table(spark, config, "predictions")
                   .orderBy("image_id").limit(60).collect()]
    rows = [{"image_id": f"{i:064x}", "predicted_label": "7", "confidence": confidences[i], "top_k": [],
             "model_name": batch.model_name, "model_version": batch.model_version, "route": "/predict",
             "size_bytes": 100, "requested_at": now} for i in range(60)]
    folder = Path(config.storage.root) / "request_log" / f"request_date={now:%Y-%m-%d}"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=REQUEST_LOG_SCHEMA), folder / "part-0.parquet")

    summary = cli.run_stage(spark, config, "monitor")

    online = {a.metric for a in summary.alerts if a.source == "online"}
    assert online == {"label_psi"}  # everything online was a 7
    assert {a.metric for a in summary.latest_alerts()} == {"label_psi"}  # the batch window's own
    drift_rows = (lakehouse.read_table(spark, config, "monitor_drift")
                  .where("source = 'online' AND metric = 'label_psi'").collect())
    assert [r["window_rows"] for r in drift_rows] == [60]


def test_a_rerun_with_nothing_new_writes_nothing_and_reports_the_same_alerts(spark, missing_class):
    config, _ = missing_class
    written = ("monitor_profiles", "monitor_drift", "alerts", "image_profiles")

    def versions() -> dict[str, int]:
        return {t: delta_log.latest_version(spark, lakehouse.table_location(config, t)) for t in written}

    last = cli.run_stage(spark, config, "monitor")
    before = versions()
    again = cli.run_stage(spark, config, "monitor")
    assert versions() == before
    assert again.lines()[:-1] == last.lines()[:-1]  # all but the seconds it took
    assert {a.metric for a in again.latest_alerts()} == {"label_psi"}
    assert Path(again.textfile).read_text().count('metric="label_psi"') == 2  # value and alert

    # New predictions in the batch window: profiled, its drift rows counting them.
    predictions = lakehouse.read_table(spark, config, "predictions")
    copies = (predictions.where(F.col("model_version") == again.model_version).limit(20)
              .withColumn("image_id", F.sha2(F.concat(F.col("image_id"), F.lit("copy")), 256))
              .withColumn("scored_at", F.current_timestamp()))
    copies.write.format("delta").mode("append").save(lakehouse.table_location(config, "predictions"))
    grown = cli.run_stage(spark, config, "monitor")
    assert versions()["monitor_drift"] > before["monitor_drift"]
    assert versions()["image_profiles"] == before["image_profiles"]  # no new image to profile
    rows = (lakehouse.read_table(spark, config, "monitor_drift")
            .where(f"source = 'batch' AND metric = 'label_psi' AND model_version = '{grown.model_version}'")
            .collect())
    assert [r["window_rows"] for r in rows] == [WITHOUT_THREES + 20]
    assert grown.latest["label_psi"] != again.latest["label_psi"]


# --- the result writes --------------------------------------------------------------------------


def test_writes_run_together_give_their_results_in_order():
    assert monitor.run_together([lambda: "profiles", lambda: "drift", lambda: "alerts"]) == [
        "profiles", "drift", "alerts"]


def test_no_writes_run_together_is_nothing_to_do():
    assert monitor.run_together([]) == []


def test_a_failed_write_is_raised_once_the_other_writes_have_ended():
    ended = []

    def slow_write() -> None:
        time.sleep(0.2)
        ended.append("drift")

    def failing_write() -> None:
        raise RuntimeError("MERGE into monitor_profiles failed")

    with pytest.raises(RuntimeError, match="monitor_profiles"):
        monitor.run_together([failing_write, slow_write])
    assert ended == ["drift"]
