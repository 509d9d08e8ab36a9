"""Evaluate: a model version on a split of `prepared` -> `evaluations`, MLflow, a Markdown report.

The split is read at the model's own preprocessing version (the `TransformSpec` inside the
model), so a model is always measured on the tensors it was trained for. Tensors stream to the
driver in Arrow batches and only the probabilities are kept, so memory grows with
images x classes, not with pixels; the few tensors the mistakes grid shows are fetched again.

A rerun with nothing new costs no model pass: each evaluation leaves a tag on the model's run
(`record_tag`) naming the `prepared` Delta version it read and the `evaluated_at` of its rows; when
`prepared` is still at that version, the evaluate config is the same and the `evaluations` rows of
(model, version, split) are still those rows, the summary is read back from them.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.clock import UTC, utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Row, Stopwatch, aligned
from imageiq_spark.core.tables import schema
from imageiq_spark.lake import lakehouse, stage_state
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.lake.storage import write_bytes
from imageiq_spark.ml import metrics
from imageiq_spark.ml.prepared import read_prepared
from imageiq_spark.ml.splits import Leakage, leakage

log = logging.getLogger(__name__)

EVALUATIONS_SCHEMA = schema(
    "model_name STRING NOT NULL, model_version STRING NOT NULL, split STRING NOT NULL, "
    "metric STRING NOT NULL, class STRING, value DOUBLE, evaluated_at TIMESTAMP NOT NULL"
)
EVALUATION_KEYS = ["model_name", "model_version", "split", "metric", "class"]
MISTAKES_SHOWN = 16
TOP_K = 3
PICTURES = ("confusion_matrix.png", "reliability_diagram.png", "confident_mistakes.png")
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Record:
    """What an evaluation depended on and what the `evaluations` rows do not hold; a JSON run tag."""

    model: str  # name/version
    prepared_version: int
    config: str  # config.fingerprint("evaluate")
    evaluated_at: int  # microseconds since the epoch, the rows' `evaluated_at`
    preprocess_version: str
    skipped: int
    near_duplicates_version: int | None
    leakage: list[int] | None  # (images, stored, old_rule)


def record_tag(split: str) -> str:
    return f"imageiq.evaluation.{split}"


@dataclass
class EvaluateSummary:
    model_name: str
    model_version: str
    split: str
    report: metrics.Report | None = None
    #: The split's images the model was measured on and `report.global_metrics()`, also when read back.
    count: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    #: Set when nothing changed since the recorded evaluation, which was not run again.
    reused: Record | None = None
    report_uri: str = ""
    watch: Stopwatch = field(default_factory=Stopwatch)
    pictures: dict[str, bytes] = field(default_factory=dict)
    #: Images of the split with a near-duplicate in train (None without `imageiq duplicates`).
    leakage: Leakage | None = None

    def counts(self) -> RunCounts:
        # A reused evaluation read no images.
        return RunCounts(read=0 if self.reused else self.count + self.skipped,
                         model_name=self.model_name, model_version=self.model_version)

    def lines(self) -> list[str]:
        m = self.metrics
        rows: list[Row] = [("model", f"{self.model_name} version {self.model_version}"),
                           ("split", f"{self.split} ({self.count} images)")]
        if m:
            rows += [
                (f"{self.split} accuracy", m["accuracy"]),
                (f"top-{TOP_K} accuracy", m[f"top_{TOP_K}_accuracy"]),
                ("macro F1", m["f1_macro"]),
                ("ROC-AUC (ovr, macro)", m["roc_auc_ovr_macro"]),
                ("ECE", m["expected_calibration_error"]),
            ]
        if self.skipped:
            rows.append(("skipped", f"{self.skipped} images whose label the model does not know"))
        if self.leakage is not None and self.split != "train":
            rows.append(("leakage", f"{self.leakage.stored} {self.split} images have a near-duplicate in "
                                    f"train ({self.leakage.old_rule} had each image been split alone)"))
        if self.reused:
            at = EPOCH + datetime.timedelta(microseconds=self.reused.evaluated_at)
            rows.append(("evaluated", f"{at:%Y-%m-%d %H:%M:%S} UTC at prepared Delta version "
                                      f"{self.reused.prepared_version}; unchanged since, not run again"))
        rows += [("report", self.report_uri), self.watch.row(0 if self.reused else self.count + self.skipped)]
        return aligned(rows)


def predict_split(rows: DataFrame, classifier, batch: int = 512) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image_ids, true class indices, probabilities) of the rows whose label the model knows."""
    index = {label: i for i, label in enumerate(classifier.labels)}
    shape = tuple(classifier.model.input_shape[1:])
    ids: list[str] = []
    truth: list[int] = []
    probs: list[np.ndarray] = []
    pending: list[tuple[str, int, bytes]] = []

    def flush() -> None:
        tensors = np.frombuffer(b"".join(t for _, _, t in pending), np.uint8).reshape(-1, *shape)
        probs.append(classifier.predict_tensors(tensors))
        ids.extend(i for i, _, _ in pending)
        truth.extend(y for _, y, _ in pending)
        pending.clear()

    for row in rows.select("image_id", "label", "tensor").toLocalIterator(prefetchPartitions=True):
        if row.label in index:
            pending.append((row.image_id, index[row.label], bytes(row.tensor)))
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    classes = len(classifier.labels)
    return ids, np.asarray(truth, np.int64), (np.concatenate(probs) if probs
                                              else np.zeros((0, classes), np.float32))


def markdown_report(summary: EvaluateSummary, r: metrics.Report, picture_names: list[str]) -> str:
    lines = [
        f"# Evaluation of {summary.model_name} version {summary.model_version} on {summary.split}",
        "",
        f"{r.count} images. Evaluated {utc_now():%Y-%m-%d %H:%M} UTC.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in r.global_metrics().items()),
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support | ROC-AUC |",
        "|---|---|---|---|---|---|",
    ]
    for i, label in enumerate(r.labels):
        auc = r.roc_auc[i]
        lines.append(
            f"| {label} | {r.per_class.precision[i]:.4f} | {r.per_class.recall[i]:.4f} | "
            f"{r.per_class.f1[i]:.4f} | {int(r.per_class.support[i])} | "
            f"{'n/a' if math.isnan(auc) else f'{auc:.4f}'} |"
        )
    lines += ["", "## Confusion matrix (rows true, columns predicted)", "",
              "| | " + " | ".join(r.labels) + " |", "|---" * (len(r.labels) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(v) for v in r.confusion[i]) + " |"
              for i, label in enumerate(r.labels)]
    lines += ["", *(f"![{name}]({name})" for name in picture_names), ""]
    return "\n".join(lines)


def write_evaluations(spark: SparkSession, config: Config, summary: EvaluateSummary,
                      report: metrics.Report, now: datetime.datetime) -> None:
    """Upsert one row per (model, version, split, metric, class): a re-evaluation replaces values."""
    rows = spark.createDataFrame(
        [(summary.model_name, summary.model_version, summary.split, metric, label,
          None if math.isnan(value) else float(value), now)
         for metric, label, value in report.rows()],
        EVALUATIONS_SCHEMA,
    )
    lakehouse.ensure_table(spark, config, "evaluations", EVALUATIONS_SCHEMA)
    same_key = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in EVALUATION_KEYS)
    lakehouse.merge(config, "evaluations", rows, same_key,
                    "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *")


def report_folder(config: Config, summary: EvaluateSummary) -> str:
    return lakehouse.lake_path(config, "reports", "evaluations", summary.model_name,
                               f"v{summary.model_version}", summary.split)


def write_report(config: Config, summary: EvaluateSummary, report: metrics.Report) -> str:
    """The Markdown report and its pictures under <storage.root>/reports/evaluations/..."""
    folder = report_folder(config, summary)
    for name, png in summary.pictures.items():
        write_bytes(f"{folder}/{name}", png)
    write_bytes(f"{folder}/report.md", markdown_report(summary, report, list(summary.pictures)).encode())
    return f"{folder}/report.md"


def table_version(spark: SparkSession, config: Config, table: str) -> int | None:
    return stage_state.table_versions(spark, config, [table])[table]


def split_leakage(spark: SparkSession, config: Config, preprocess_version: str, split: str) -> Leakage | None:
    every_split = read_prepared(spark, config, version=preprocess_version)
    return leakage(spark, config, every_split.select("image_id", "split"), split)


def read_record(run_id: str, split: str) -> Record | None:
    from mlflow.tracking import MlflowClient

    raw = MlflowClient().get_run(run_id).data.tags.get(record_tag(split))
    try:
        return Record(**json.loads(raw)) if raw else None
    except (ValueError, TypeError):  # a tag this code did not write: evaluate again
        return None


def reuse_recorded(spark: SparkSession, config: Config, summary: EvaluateSummary, run_id: str,
                   prepared_version: int) -> bool:
    """Fill `summary` from the recorded evaluation when nothing it depends on changed since."""
    record = read_record(run_id, summary.split)
    if (record is None or record.model != f"{summary.model_name}/{summary.model_version}"
            or record.prepared_version != prepared_version or record.config != config.fingerprint("evaluate")
            or not lakehouse.table_exists(spark, config, "evaluations")):
        return False
    key = ((F.col("model_name") == summary.model_name) & (F.col("model_version") == summary.model_version)
           & (F.col("split") == summary.split))
    rows = (lakehouse.read_table(spark, config, "evaluations").where(key)
            .select("metric", "class", "value", F.unix_micros("evaluated_at").alias("at")).collect())
    # Rows another evaluation wrote since (or none left) are not the ones the record describes.
    if not rows or any(r["at"] != record.evaluated_at for r in rows):
        return False
    summary.metrics = {r["metric"]: math.nan if r["value"] is None else r["value"]
                       for r in rows if r["class"] is None}
    summary.count, summary.skipped, summary.reused = int(summary.metrics["count"]), record.skipped, record
    # Leakage also depends on `near_duplicates`, which `imageiq duplicates` may have changed since.
    if table_version(spark, config, "near_duplicates") == record.near_duplicates_version:
        summary.leakage = Leakage(summary.split, *record.leakage) if record.leakage else None
    else:
        summary.leakage = split_leakage(spark, config, record.preprocess_version, summary.split)
    summary.report_uri = f"{report_folder(config, summary)}/report.md"
    return True


def run(spark: SparkSession, config: Config, model_uri: str | None = None) -> EvaluateSummary:
    """Evaluate the model behind `model_uri` (default the champion) on `evaluate.split`."""
    import mlflow

    from imageiq_spark.lake import tracking
    from imageiq_spark.ml.classifier import load_classifier

    watch = Stopwatch()
    uri = model_uri or tracking.default_model_uri(config)
    name, version, run_id = tracking.resolve_model(config, uri)
    split = config.evaluate.split
    summary = EvaluateSummary(name, version, split, watch=watch)
    if not lakehouse.table_exists(spark, config, "prepared"):
        raise RuntimeError("table 'prepared' does not exist: run `imageiq preprocess` first")
    # Taken before the rows are read: a commit in between leaves the record older than the rows.
    prepared_version = table_version(spark, config, "prepared")
    if reuse_recorded(spark, config, summary, run_id, prepared_version):
        watch.stop()
        return summary
    classifier = load_classifier(f"models:/{name}/{version}")
    rows = read_prepared(spark, config, version=classifier.spec.version, splits=[split])
    watch.work()
    ids, y_true, probs = predict_split(rows, classifier)
    watch.done()
    summary.skipped = rows.count() - len(ids)
    near_version = table_version(spark, config, "near_duplicates")
    summary.leakage = split_leakage(spark, config, classifier.spec.version, split)
    if not ids:
        raise RuntimeError(
            f"split '{split}' of prepared holds no images at the model's preprocess_version "
            f"{classifier.spec.version}: run `imageiq preprocess` with the config the model was "
            "trained with, or choose another evaluate.split"
        )
    report = metrics.evaluate(y_true, probs, classifier.labels, k=TOP_K,
                              bins=config.evaluate.calibration_bins)
    summary.report, summary.count, summary.metrics = report, report.count, report.global_metrics()

    mistakes = metrics.confident_mistakes(y_true, probs, MISTAKES_SHOWN)
    wanted = [ids[i] for i in mistakes]
    tensors = {r.image_id: bytes(r.tensor) for r in
               rows.where(F.col("image_id").isin(wanted)).select("image_id", "tensor").collect()}
    shape = tuple(classifier.model.input_shape[1:])
    images = np.zeros((len(ids), *shape), np.uint8)
    for i in mistakes:
        images[i] = np.frombuffer(tensors[ids[i]], np.uint8).reshape(shape)
    summary.pictures = {
        PICTURES[0]: metrics.figure_png(metrics.plot_confusion_matrix(report.confusion, report.labels)),
        PICTURES[1]: metrics.figure_png(
            metrics.plot_reliability_diagram(y_true, probs, config.evaluate.calibration_bins)),
        PICTURES[2]: metrics.figure_png(
            metrics.plot_confident_mistakes(images, y_true, probs, report.labels, MISTAKES_SHOWN)),
    }

    now = utc_now()
    write_evaluations(spark, config, summary, report, now)
    summary.report_uri = write_report(config, summary, report)
    leaked = summary.leakage
    record = Record(f"{name}/{version}", prepared_version, config.fingerprint("evaluate"),
                    (now - EPOCH) // datetime.timedelta(microseconds=1), classifier.spec.version,
                    summary.skipped, near_version,
                    [leaked.images, leaked.stored, leaked.old_rule] if leaked else None)
    # Logged into the model version's own training run, under this split's prefix.
    with mlflow.start_run(run_id=run_id), TemporaryDirectory() as tmp:
        mlflow.log_metrics({f"{split}_{k}": v for k, v in report.global_metrics().items()
                            if not math.isnan(v)})
        for picture, png in summary.pictures.items():
            (Path(tmp) / picture).write_bytes(png)
        (Path(tmp) / "report.md").write_text(markdown_report(summary, report, list(summary.pictures)))
        mlflow.log_artifacts(tmp, artifact_path=f"evaluation/{split}")
        mlflow.set_tag(record_tag(split), json.dumps(asdict(record)))  # last: vouches for the above
    lakehouse.register_tables(spark, config)
    watch.stop()
    return summary
