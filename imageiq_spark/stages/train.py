"""Train: `prepared` (train and val splits) -> Keras model -> MLflow run -> registered version.

The data are read at one pinned Delta version of `prepared` (tagged on the run), materialised
once for the configured reader (Petastorm or Arrow, under `<storage.root>/cache/train`, removed
afterwards) and streamed through `tf.data` into `imageiq_spark.ml.training`'s fit, on the driver
or on `train.distributed.workers` Spark barrier tasks (GPUs included).

The chief worker checkpoints every epoch under `<storage.root>/checkpoints/train/<key>`; a crashed
run started again with the same config and data resumes there, in the same MLflow run. A run holds
a lease on that folder (`lease`: an exclusive file beside it, renewed while it runs, taken over
once its holder is dead for two minutes): a second train on the same data waits up to
`train.lease_wait_s`, then exits 1 naming the holder; one that got the lease after a wait skips if
the first registered the same data. The model is logged as a self-contained pyfunc, registered
under `mlflow.registered_model`, and takes alias `champion` only if it beats the current champion
on the same val images (`imageiq_spark.ml.champion`), else `challenger`.

A run whose inputs equal the last registered version's (`training_fingerprint`: the train config,
the preprocess version and the labelled train/val rows of `prepared`) trains nothing: a rerun night
neither registers a new version nor moves an alias. `imageiq train --force` trains anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.config import Config, ConfigError, loggable_params
from imageiq_spark.core.summary import Stopwatch, aligned
from imageiq_spark.lake import delta_log, lakehouse, storage
from imageiq_spark.lake.lease import Lease, hold
from imageiq_spark.lake.runs import RunCounts
from imageiq_spark.lake.session import is_connect
from imageiq_spark.ml import champion, models, prepared, readers
from imageiq_spark.ml.training import (
    BEST_WEIGHTS,
    TrainState,
    TrainTask,
    evaluate_split,
    fit,
    fit_distributed,
    load_weights,
    training_curves_png,
)

log = logging.getLogger(__name__)

#: Model version (and run) tag holding the `training_fingerprint` the version was trained from.
FINGERPRINT_TAG = "imageiq.train_fingerprint"


@dataclass
class TrainSummary:
    model: str
    run_id: str
    version: str
    alias: str
    epochs_run: int
    resumed_from: int
    best_epoch: int
    val_accuracy: float
    val_loss: float
    champion_val_accuracy: float | None
    gate_reason: str
    prepared_version: int
    train_rows: int
    val_rows: int
    workers: int
    reader: str
    #: Its work is the epochs run: training images x epochs, at the pace the fit kept.
    watch: Stopwatch

    def counts(self) -> RunCounts:
        return RunCounts(read=self.train_rows + self.val_rows, model_version=self.version)

    def lines(self) -> list[str]:
        previous = ("none" if self.champion_val_accuracy is None
                    else f"{self.champion_val_accuracy:.4f}")
        resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
        return aligned([
            ("model", f"{self.model}, {self.workers} worker(s), reader {self.reader}"),
            ("data", f"prepared Delta version {self.prepared_version}, {self.train_rows} train / "
                     f"{self.val_rows} val images"),
            ("epochs run", f"{self.epochs_run}{resumed}, best epoch {self.best_epoch + 1}"),
            ("best val accuracy", f"{self.val_accuracy:.4f}, val loss: {self.val_loss:.4f}"),
            ("registered version", f"{self.version}, alias: {self.alias} (champion's val accuracy "
                                   f"on the same images: {previous})"),
            ("gate", self.gate_reason),
            ("mlflow run", self.run_id),
            self.watch.row(self.train_rows * (self.epochs_run - self.resumed_from)),
        ])


@dataclass
class TrainSkipped:
    """`train` found nothing new since the last registered version."""

    model_name: str
    version: str
    fingerprint: str
    prepared_version: int
    reason: str

    def counts(self) -> RunCounts:
        # DESIGN.md's job_runs statuses are succeeded/failed: a skip reads and writes no rows.
        return RunCounts(read=0, written=0, model_version=self.version)

    def lines(self) -> list[str]:
        return aligned([
            ("skipped", self.reason),
            ("data", f"prepared Delta version {self.prepared_version}; "
                     f"training fingerprint {self.fingerprint}"),
            ("registered version", f"{self.version} (unchanged); `imageiq train --force` trains anyway"),
        ])


def prepared_version(spark: SparkSession, config: Config) -> int:
    """The current Delta version of `prepared`; training reads exactly that snapshot."""
    if not lakehouse.table_exists(spark, config, "prepared"):
        raise ConfigError(
            "table 'prepared' does not exist under storage.root "
            f"'{config.storage.root}': run `imageiq preprocess` before `imageiq train`"
        )
    return delta_log.latest_version(spark, lakehouse.table_location(config, "prepared"))


def read_splits(spark: SparkSession, config: Config, version: int, preprocess_version: str
                ) -> dict[str, DataFrame]:
    rows = (
        spark.read.format("delta").option("versionAsOf", version)
        .load(lakehouse.table_location(config, "prepared"))
        .filter((F.col("preprocess_version") == preprocess_version) & F.col("label_index").isNotNull())
    )
    return {split: rows.filter(F.col("split") == split) for split in ("train", "val")}


def training_fingerprint(spark: SparkSession, config: Config, version: int, preprocess_version: str) -> str:
    """A hash of what a trained version depends on: `config.fingerprint("train")`, the preprocess
    version and the labelled train/val rows (image, label, label index, split) of `prepared` at
    Delta `version`. Tensors are a function of the image and the preprocess version, so they need
    no hashing; an order-free sum keeps it independent of file layout (OPTIMIZE leaves it as is)."""
    rows = read_splits(spark, config, version, preprocess_version)
    labelled = rows["train"].unionByName(rows["val"])
    row_hash = F.xxhash64("image_id", "label", "label_index", "split").cast("decimal(38,0)")
    count, total = labelled.agg(F.count("*"), F.coalesce(F.sum(row_hash), F.lit(0))).first()
    payload = f"{config.fingerprint('train')}|{preprocess_version}|{count}|{total}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def unchanged_since(config: Config, fingerprint: str) -> tuple[str, str] | None:
    """(version, reason) when the newest registered version was trained from `fingerprint`."""
    from mlflow.tracking import MlflowClient

    from imageiq_spark.lake.tracking import configure_mlflow

    configure_mlflow(config)
    name = config.mlflow.registered_model
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    if newest.tags.get(FINGERPRINT_TAG) != fingerprint:
        return None
    return str(newest.version), (f"neither prepared's labelled train/val rows nor the training config "
                                 f"changed since {name} version {newest.version}")


def connect_reader(spark: SparkSession, config: Config) -> readers.Reader:
    """`train.reader`, checked against the session: a Spark Connect session has no barrier mode
    for `train.distributed.workers` > 1, and no JVM DataFrame for Petastorm's converter, so it
    reads with the Arrow reader."""
    if not is_connect(spark):
        return config.train.reader
    workers = config.train.distributed.workers
    if workers > 1:
        raise ConfigError(
            f"config key 'train.distributed.workers' is {workers}, but distributed training runs "
            "in Spark barrier tasks, which Spark Connect sessions do not offer; set "
            "train.distributed.workers: 1 (training runs on the driver) or run `imageiq train` "
            "with a classic session (no spark_conf.spark.remote, no SPARK_REMOTE)"
        )
    if config.train.reader == "petastorm":
        log.info("train: Spark Connect session: the arrow reader reads the training cache "
                 "(Petastorm needs a classic session)")
    return "arrow"


def checkpoint_dir(config: Config, version: int) -> str:
    """One folder per (train config, data snapshot): a rerun of the same finds its checkpoint.
    Under storage.root, so a restarted driver (or the chief on another executor) finds it."""
    return lakehouse.lake_path(config, "checkpoints", "train",
                               f"{config.fingerprint('train')}-{config.fingerprint('preprocess')}-v{version}")


def run(spark: SparkSession, config: Config, callbacks: Sequence[Any] = (), force: bool = False
        ) -> TrainSummary | TrainSkipped:
    """Train, track, register. `callbacks` are extra Keras callbacks (single-worker training);
    `force` trains even when nothing changed since the last registered version."""
    watch = Stopwatch()
    train_config = config.train
    models.check_weights(train_config.model, train_config.weights)
    readers.check_reader(config)
    reader = connect_reader(spark, config)
    version = prepared_version(spark, config)
    spec = prepared.read_spec(spark, config, prepared.current_version(config))
    fingerprint = training_fingerprint(spark, config, version, spec.version)
    folder = checkpoint_dir(config, version)
    # Two trains on the same data would share the checkpoint folder (one resuming the other's
    # run, the first to end deleting it): the second waits for the first's lease, then exits 1.
    with hold(f"{folder}.lease", "train", train_config.lease_wait_s, "train.lease_wait_s") as held:
        # Checked under the lease: a run waited for may have just registered this very data.
        unchanged = unchanged_since(config, fingerprint)
        if unchanged and not force:
            log.info("train: skipped, %s", unchanged[1])
            return TrainSkipped(config.mlflow.registered_model, unchanged[0], fingerprint, version,
                                unchanged[1])
        return _train_leased(spark, config, callbacks, watch, reader, version, spec, fingerprint,
                             folder, held)


def _train_leased(spark: SparkSession, config: Config, callbacks: Sequence[Any], watch: Stopwatch,
                  reader: readers.Reader, version: int, spec: Any, fingerprint: str, folder: str,
                  held: Lease) -> TrainSummary:
    """`run`'s training, registration and gate, holding the lease on the checkpoint `folder`."""
    train_config = config.train
    labels = prepared.read_label_vocabulary(spark, config)
    mean, std = prepared.read_channel_stats(spark, config, spec.version)
    splits = read_splits(spark, config, version, spec.version)
    workers = train_config.distributed.workers
    sources = {
        name: readers.materialize(df, config, reader, spec.shape, files=2 * workers)
        for name, df in splits.items()
    }
    try:
        if sources["train"].rows == 0 or sources["val"].rows == 0:
            raise ValueError(
                f"prepared (Delta version {version}, preprocess_version {spec.version}) has "
                f"{sources['train'].rows} labelled train and {sources['val'].rows} val images; "
                "training needs both: ingest labelled images and run `imageiq preprocess`"
            )
        model_spec = models.ModelSpec(
            architecture=train_config.model, height=spec.shape[0], width=spec.shape[1],
            channels=spec.shape[2], num_classes=len(labels), mean=tuple(mean), std=tuple(std),
            weights=train_config.weights,
        )
        task = TrainTask(
            spec=model_spec, train=sources["train"], val=sources["val"],
            batch_size=train_config.batch_size, learning_rate=train_config.learning_rate,
            epochs=train_config.epochs, patience=train_config.patience,
            fine_tune_epochs=train_config.fine_tune_epochs,
            fine_tune_layers=train_config.fine_tune_layers, seed=train_config.seed,
            augment=train_config.augment, reader_workers=train_config.reader_workers,
            shuffle_buffer=train_config.shuffle_buffer,
            checkpoint_dir=folder, workers=workers,
            use_gpu=train_config.distributed.use_gpu,
        )
        summary = _train_and_log(spark, config, task, version, labels, spec, callbacks, watch,
                                 fingerprint, held)
    finally:
        for source in sources.values():
            readers.release(source)
    return summary


def _train_and_log(spark: SparkSession, config: Config, task: TrainTask, version: int,
                   labels: list[str], spec: Any, callbacks: Sequence[Any], watch: Stopwatch,
                   fingerprint: str, held: Lease) -> TrainSummary:
    import mlflow
    from mlflow.tracking import MlflowClient

    from imageiq_spark.lake.tracking import configure_mlflow, record_alias, redact_run_tags
    from imageiq_spark.ml.classifier import ImageClassifier, log_classifier

    configure_mlflow(config)
    previous = TrainState.load(task.checkpoint_dir)
    resumed_from = previous.epochs_done if previous else 0
    with mlflow.start_run(run_id=previous.run_id if previous and previous.run_id else None) as active:
        run_id = active.info.run_id
        if previous is None:
            mlflow.log_params(loggable_params(config))
            mlflow.set_tags({
                "prepared_delta_version": str(version),
                "preprocess_version": spec.version,
                "imageiq.stage": "train",
                FINGERPRINT_TAG: fingerprint,
            })
            redact_run_tags(run_id)
            TrainState(run_id=run_id).save(task.checkpoint_dir)
        else:
            log.info("train: resuming run %s after epoch %d", run_id, resumed_from)

        watch.work()
        if task.workers > 1:
            results = fit_distributed(spark, task)
            # Evidence that the workers trained in lockstep, as each measured it: the optimizer
            # steps it ran and its final weights.
            mlflow.log_params({
                "optimizer_steps_per_worker": json.dumps([r["done"]["optimizer_steps"] for r in results]),
                "weights_sha256_per_worker": json.dumps([r["done"]["weights_sha256"] for r in results]),
            })
            state = TrainState(**{k: v for k, v in results[0].items() if k not in ("rank", "done")})
        else:
            state = TrainState(**fit(task, 0, callbacks)[0])
        watch.done()

        for name, values in state.history.items():
            for step, value in enumerate(values):
                mlflow.log_metric(name, value, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(training_curves_png(state.history, Path(tmp) / "training_curves.png")))

            model = models.build_model(task.spec)
            load_weights(model, task.checkpoint_dir, BEST_WEIGHTS)
            classifier = ImageClassifier(model, labels, spec)
            val_accuracy, val_loss = evaluate_split(classifier, task.val)
            mlflow.log_metrics({"best_val_accuracy": val_accuracy, "best_val_loss": val_loss,
                                "epochs_run": state.epochs_done, "best_epoch": state.best_epoch})
            held.check()  # a driver that stalled past its lease must not register over another's run
            info = log_classifier(classifier, tmp, config.mlflow.registered_model)
        registered = str(info.registered_model_version)
        client = MlflowClient()
        name = config.mlflow.registered_model
        # `decide` reads the champion again as its last step: the alias moves right after it.
        decision = champion.decide(spark, config, name, registered, run_id, version, spec.version)
        alias = decision.alias
        client.set_registered_model_alias(name, alias, registered)
        champion.record(spark, config, name, registered, decision)
        champion_accuracy = None if decision.champion is None else decision.champion.get("val", (None, 0))[0]
        mlflow.set_tag("registered_model_version", registered)
        mlflow.set_tag("alias", alias)
    record_alias(spark, config, name, alias, registered, reason=f"gate: {decision.reason}")
    # Tagged last: a run that dies before its alias is recorded is not taken as done by the next.
    client.set_model_version_tag(name, registered, FINGERPRINT_TAG, fingerprint)
    storage.delete_dir(task.checkpoint_dir)
    watch.stop()
    return TrainSummary(
        model=task.spec.architecture, run_id=run_id, version=registered, alias=alias,
        epochs_run=state.epochs_done, resumed_from=resumed_from, best_epoch=state.best_epoch,
        val_accuracy=val_accuracy, val_loss=val_loss, champion_val_accuracy=champion_accuracy,
        gate_reason=decision.reason,
        prepared_version=version, train_rows=task.train.rows, val_rows=task.val.rows,
        workers=task.workers, reader=task.train.reader, watch=watch,
    )
