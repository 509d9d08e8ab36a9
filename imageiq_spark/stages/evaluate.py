"""Evaluate: a model version on a split of `prepared` -> `evaluations`, MLflow, a Markdown report.

The split is read at the model's own preprocessing version (the `TransformSpec` inside the
model), so a model is always measured on the tensors it was trained for. Tensors stream to the
driver in Arrow batches and only the probabilities are kept, so memory grows with
images x classes, not with pixels; the few tensors the mistakes grid shows are fetched again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.summary import Row, aligned
from imageiq_spark.core.tables import schema
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.ml import metrics
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


@dataclass
class EvaluateSummary:
    model_name: str
    model_version: str
    split: str
    report: metrics.Report | None = None
    skipped: int = 0
    report_uri: str = ""
    elapsed_s: float = 0.0
    pictures: dict[str, bytes] = field(default_factory=dict)
    #: Images of the split with a near-duplicate in train (None without `imageiq duplicates`).
    leakage: Leakage | None = None

    def counts(self) -> RunCounts:
        return RunCounts(read=(self.report.count if self.report else 0) + self.skipped,
                         model_name=self.model_name, model_version=self.model_version)

    def lines(self) -> list[str]:
        r = self.report
        rows: list[Row] = [("model", f"{self.model_name} version {self.model_version}"),
                           ("split", f"{self.split} ({r.count if r else 0} images)")]
        if r is not None:
            rows += [
                (f"{self.split} accuracy", r.accuracy),
                (f"top-{r.top_k} accuracy", r.top_k_accuracy),
                ("macro F1", r.macro["f1"]),
                ("ROC-AUC (ovr, macro)", r.roc_auc_macro),
                ("ECE", r.ece),
            ]
        if self.skipped:
            rows.append(("skipped", f"{self.skipped} images whose label the model does not know"))
        if self.leakage is not None and self.split != "train":
            rows.append(("leakage", f"{self.leakage.stored} {self.split} images have a near-duplicate in "
                                    f"train ({self.leakage.old_rule} had each image been split alone)"))
        rows += [("report", self.report_uri), ("elapsed", f"{self.elapsed_s:.1f} s")]
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
                      report: metrics.Report) -> None:
    """Upsert one row per (model, version, split, metric, class): a re-evaluation replaces values."""
    now = utc_now()
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


def write_report(config: Config, summary: EvaluateSummary, report: metrics.Report) -> str:
    """The Markdown report and its pictures under <storage.root>/reports/evaluations/..."""
    from imageiq_spark.lake.storage import write_bytes

    folder = lakehouse.lake_path(config, "reports", "evaluations", summary.model_name,
                                 f"v{summary.model_version}", summary.split)
    for name, png in summary.pictures.items():
        write_bytes(f"{folder}/{name}", png)
    write_bytes(f"{folder}/report.md", markdown_report(summary, report, list(summary.pictures)).encode())
    return f"{folder}/report.md"


def run(spark: SparkSession, config: Config, model_uri: str | None = None) -> EvaluateSummary:
    """Evaluate the model behind `model_uri` (default the champion) on `evaluate.split`."""
    import mlflow

    from imageiq_spark.lake import tracking
    from imageiq_spark.ml.classifier import load_classifier
    from imageiq_spark.ml.prepared import read_prepared

    started = time.monotonic()
    uri = model_uri or tracking.default_model_uri(config)
    name, version, run_id = tracking.resolve_model(config, uri)
    split = config.evaluate.split
    summary = EvaluateSummary(name, version, split)
    classifier = load_classifier(f"models:/{name}/{version}")
    if not lakehouse.table_exists(spark, config, "prepared"):
        raise RuntimeError("table 'prepared' does not exist: run `imageiq preprocess` first")
    rows = read_prepared(spark, config, version=classifier.spec.version, splits=[split])
    ids, y_true, probs = predict_split(rows, classifier)
    summary.skipped = rows.count() - len(ids)
    every_split = read_prepared(spark, config, version=classifier.spec.version)
    summary.leakage = leakage(spark, config, every_split.select("image_id", "split"), split)
    if not ids:
        raise RuntimeError(
            f"split '{split}' of prepared holds no images at the model's preprocess_version "
            f"{classifier.spec.version}: run `imageiq preprocess` with the config the model was "
            "trained with, or choose another evaluate.split"
        )
    report = metrics.evaluate(y_true, probs, classifier.labels, k=TOP_K,
                              bins=config.evaluate.calibration_bins)
    summary.report = report

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

    write_evaluations(spark, config, summary, report)
    summary.report_uri = write_report(config, summary, report)
    # Logged into the model version's own training run, under this split's prefix.
    with mlflow.start_run(run_id=run_id), TemporaryDirectory() as tmp:
        mlflow.log_metrics({f"{split}_{k}": v for k, v in report.global_metrics().items()
                            if not math.isnan(v)})
        for picture, png in summary.pictures.items():
            (Path(tmp) / picture).write_bytes(png)
        (Path(tmp) / "report.md").write_text(markdown_report(summary, report, list(summary.pictures)))
        mlflow.log_artifacts(tmp, artifact_path=f"evaluation/{split}")
    lakehouse.register_tables(spark, config)
    summary.elapsed_s = time.monotonic() - started
    return summary
