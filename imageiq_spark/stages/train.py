"""Train: `prepared` (train and val splits) -> Keras model -> MLflow run -> registered version.

The data are read at one pinned Delta version of `prepared` (tagged on the run), materialised
once for the configured reader (Petastorm or Arrow, under `<storage.root>/cache/train`, removed
afterwards) and streamed through `tf.data`. `train.distributed.workers: N > 1` runs N Spark
barrier tasks, each a `MultiWorkerMirroredStrategy` worker with TF_CONFIG built from the barrier
context, reading its own shard; every worker steps the same fixed number of batches per epoch
from an endlessly repeated shard, because uneven shards hang collective training.

GPUs (`train.distributed.use_gpu: true`): each barrier task takes one GPU from Spark's resource
scheduling and sees only it (CUDA_VISIBLE_DEVICES). The cluster must offer them, e.g.
`spark.executor.resource.gpu.amount=1`, `spark.task.resource.gpu.amount=1` and
`spark.executor.resource.gpu.discoveryScript=/opt/spark/examples/src/main/scripts/getGpusResources.sh`
(EMR and Databricks GPU clusters set these).

Each epoch the chief worker writes a checkpoint (weights, best weights, early-stopping state and
history) under `<storage.root>/checkpoints/train/<key>`; a crashed run started again with the
same config and data resumes there, in the same MLflow run. A run holds a lease on that folder
(`lease`: an exclusive file beside it, renewed while it runs, taken over once its holder is dead
for two minutes): a second train on the same data waits up to `train.lease_wait_s`, then exits 1
naming the holder; one that got the lease after a wait skips if the first registered the same
data. Early stopping on validation loss
restores the best weights. The model is logged as a self-contained pyfunc, registered under
`mlflow.registered_model`, and takes alias `champion` only if it beats the current champion on
the same val images (`imageiq_spark.ml.champion`), else `challenger`.

A run whose inputs equal the last registered version's (`training_fingerprint`: the train config,
the preprocess version and the labelled train/val rows of `prepared`) trains nothing: a rerun night
neither registers a new version nor moves an alias. `imageiq train --force` trains anyway.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from pyspark import BarrierTaskContext  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from imageiq_spark.core.quiet import native_stderr_muted  # noqa: E402

# A barrier task's Python worker imports this module first: TensorFlow's C++ start-up lines stay
# out of the job's log there too (quiet.py).
with native_stderr_muted():
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

from imageiq_spark.core.config import AugmentConfig, Config, ConfigError, loggable_params  # noqa: E402
from imageiq_spark.lake import delta_log, lakehouse, storage  # noqa: E402
from imageiq_spark.lake.lease import Lease, hold  # noqa: E402
from imageiq_spark.lake.runs import RunCounts  # noqa: E402
from imageiq_spark.lake.session import is_connect  # noqa: E402
from imageiq_spark.ml import champion, models, readers  # noqa: E402

log = logging.getLogger(__name__)

#: Model version (and run) tag holding the `training_fingerprint` the version was trained from.
FINGERPRINT_TAG = "imageiq.train_fingerprint"
STATE_FILE = "state.json"
LAST_WEIGHTS = "last.weights.h5"
BEST_WEIGHTS = "best.weights.h5"


@dataclass(frozen=True)
class TrainTask:
    """Everything a worker needs to train; picklable, so it travels into barrier tasks."""

    spec: models.ModelSpec
    train: readers.SplitSource
    val: readers.SplitSource
    batch_size: int
    learning_rate: float
    epochs: int
    patience: int
    fine_tune_epochs: int
    fine_tune_layers: int
    seed: int | None
    augment: AugmentConfig
    reader_workers: int
    shuffle_buffer: int
    checkpoint_dir: str
    workers: int = 1
    use_gpu: bool = False

    def steps(self, rows: int) -> int:
        """Batches per epoch for every worker: all rows once across the workers, rounded up."""
        return max(1, math.ceil(rows / (self.batch_size * self.workers)))


@dataclass
class TrainState:
    """What survives a crash: written by the chief after every epoch."""

    epochs_done: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    wait: int = 0
    stopped: bool = False
    history: dict[str, list[float]] = field(default_factory=dict)
    run_id: str | None = None

    @classmethod
    def load(cls, directory: str) -> TrainState | None:
        data = storage.read_bytes(f"{directory}/{STATE_FILE}")
        return cls(**json.loads(data)) if data is not None else None

    def save(self, directory: str) -> None:
        # Whole-file writes: a crash never leaves half a state.
        storage.write_bytes(f"{directory}/{STATE_FILE}", json.dumps(self.__dict__).encode())


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
    elapsed_s: float

    def counts(self) -> RunCounts:
        return RunCounts(read=self.train_rows + self.val_rows, model_version=self.version)

    def lines(self) -> list[str]:
        previous = ("none" if self.champion_val_accuracy is None
                    else f"{self.champion_val_accuracy:.4f}")
        resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
        return [
            f"model: {self.model}, {self.workers} worker(s), reader {self.reader}",
            f"data: prepared Delta version {self.prepared_version}, {self.train_rows} train / "
            f"{self.val_rows} val images",
            f"epochs run: {self.epochs_run}{resumed}, best epoch {self.best_epoch + 1}",
            f"best val accuracy: {self.val_accuracy:.4f}, val loss: {self.val_loss:.4f}",
            f"registered version: {self.version}, alias: {self.alias} (champion's val accuracy "
            f"on the same images: {previous})",
            f"gate: {self.gate_reason}",
            f"mlflow run: {self.run_id}",
            f"elapsed: {self.elapsed_s:.1f} s",
        ]


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
        return [
            f"skipped: {self.reason}",
            f"data: prepared Delta version {self.prepared_version}; training fingerprint {self.fingerprint}",
            f"registered version: {self.version} (unchanged); `imageiq train --force` trains anyway",
        ]


# ----------------------------------------------------------------------------------- the worker


class EpochCheckpoint(keras.callbacks.Callback):
    """Early stopping on val_loss with best-weight restore, resumable from the chief's files.

    Built on every worker: all see the same aggregated val_loss and so stop together. Saving
    weights is a collective operation under MultiWorkerMirroredStrategy, so every worker saves;
    only the chief's files land in the checkpoint folder, the others' in a scratch folder.
    """

    def __init__(self, state: TrainState, task: TrainTask, directory: str) -> None:
        super().__init__()
        self.state, self.task, self.directory = state, task, directory
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        state = self.state
        for name, value in logs.items():
            state.history.setdefault(name, []).append(float(value))
        state.epochs_done = epoch + 1
        val_loss = float(logs.get("val_loss", math.inf))
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_epoch, state.wait = val_loss, epoch, 0
            self.best_weights = self.model.get_weights()
            _save_weights(self.model, self.directory, BEST_WEIGHTS)
        else:
            state.wait += 1
        if state.wait >= self.task.patience:
            state.stopped = True
            self.model.stop_training = True
        _save_weights(self.model, self.directory, LAST_WEIGHTS)
        state.save(self.directory)


class EpochProgress(keras.callbacks.Callback):
    """One line on standard error per epoch, so a long training run shows where it is."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
        log.info("train: epoch %d/%d: %s (%.1f s)", epoch + 1, self.epochs, metrics,
                 time.monotonic() - self.started)


def _save_weights(model: Any, directory: str, name: str) -> None:
    """Keras writes weights to a local file only; `directory` may be in object storage."""
    with tempfile.TemporaryDirectory(prefix="imageiq-weights-") as tmp:
        local = Path(tmp) / name
        model.save_weights(str(local))
        storage.put_file(local, f"{directory}/{name}")


def _load_weights(model: Any, directory: str, name: str) -> None:
    with storage.local_copy(f"{directory}/{name}") as local:
        model.load_weights(local)


def fit(task: TrainTask, rank: int = 0, callbacks: Sequence[Any] = ()
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train on this worker (rank 0 is the chief) from the last checkpoint; returns the state and
    what this worker did: the optimizer steps it ran and a SHA-256 of its final weights.

    Runs on the driver for one worker, or inside each Spark barrier task for several, with
    TF_CONFIG already set.
    """
    if task.seed is not None:
        keras.utils.set_random_seed(task.seed + rank)
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if task.workers > 1
                else tf.distribute.get_strategy())
    state = TrainState.load(task.checkpoint_dir) or TrainState()
    chief = rank == 0
    scratch = None if chief else tempfile.mkdtemp(prefix=f"imageiq-worker{rank}-")
    directory = task.checkpoint_dir if chief else scratch
    with strategy.scope():
        model = models.build_model(task.spec)
        if state.epochs_done:
            _load_weights(model, task.checkpoint_dir, LAST_WEIGHTS)
    checkpoint = EpochCheckpoint(state, task, directory)
    if state.epochs_done and storage.exists(f"{task.checkpoint_dir}/{BEST_WEIGHTS}"):
        best = models.build_model(task.spec)
        _load_weights(best, task.checkpoint_dir, BEST_WEIGHTS)
        checkpoint.best_weights = best.get_weights()

    steps_run = 0
    phases = [(task.epochs, False)]
    if task.spec.pretrained:
        # Transfer learning: the head learns on a frozen base, then the base's top layers tune.
        frozen = min(task.fine_tune_epochs, task.epochs)
        phases = [(frozen, False), (task.epochs, True)]
    with contextlib.ExitStack() as stack:
        train = task.train.open(
            stack, task.batch_size, shard_index=rank, shard_count=task.workers, repeat=True,
            shuffle_buffer=task.shuffle_buffer, seed=task.seed, workers=task.reader_workers,
            augment=task.augment,
        )
        # One worker validates on the whole split once; several validate on repeated shards
        # for a fixed number of steps (the exact figure is computed after training).
        val = task.val.open(stack, task.batch_size, shard_index=rank, shard_count=task.workers,
                            repeat=task.workers > 1, workers=task.reader_workers)
        for end, fine_tune in phases:
            if state.stopped or state.epochs_done >= end:
                continue
            with strategy.scope():
                rate = task.learning_rate
                if fine_tune:
                    models.unfreeze_top(model, task.fine_tune_layers)
                    rate /= 10
                models.compile_model(model, rate)
            steps_before = int(model.optimizer.iterations.numpy())
            model.fit(
                train,
                epochs=end,
                initial_epoch=state.epochs_done,
                steps_per_epoch=task.steps(task.train.rows),
                validation_data=val,
                validation_steps=task.steps(task.val.rows) if task.workers > 1 else None,
                callbacks=[checkpoint, *([EpochProgress(task.epochs)] if chief else []),
                           *callbacks],
                verbose=0,
            )
            steps_run += int(model.optimizer.iterations.numpy()) - steps_before
    if checkpoint.best_weights is not None:
        model.set_weights(checkpoint.best_weights)
    _save_weights(model, directory, BEST_WEIGHTS)
    state.save(directory)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    weights = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights()))
    return state.__dict__, {"optimizer_steps": steps_run, "weights_sha256": weights.hexdigest()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def barrier_fit(task: TrainTask):
    """mapPartitions function of the barrier stage: one MultiWorkerMirroredStrategy worker."""

    def run(_: Iterator[Any]) -> Iterator[str]:
        context = BarrierTaskContext.get()
        rank = context.partitionId()
        if task.use_gpu:
            gpus = context.resources().get("gpu")
            if gpus is None or not gpus.addresses:
                raise RuntimeError(
                    "train.distributed.use_gpu is true but Spark gave this task no GPU; set "
                    "spark.executor.resource.gpu.amount, spark.task.resource.gpu.amount=1 and a GPU "
                    "discovery script, or set train.distributed.use_gpu to false"
                )
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus.addresses[0]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        host = context.getTaskInfos()[rank].address.split(":")[0]
        addresses = context.allGather(f"{host}:{_free_port()}")
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": rank}}
        )
        # Workers sharing a machine split its cores rather than each starting one per core.
        threads = max(1, (os.cpu_count() or 1) // task.workers)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        with native_stderr_muted():  # the CUDA probe's lines, on machines without a GPU
            tf.config.list_physical_devices()
        state, done = fit(task, rank)
        context.barrier()
        yield json.dumps({"rank": rank, "done": done, **state})

    return run


def fit_distributed(spark: SparkSession, task: TrainTask) -> list[dict[str, Any]]:
    """Run `task` on `task.workers` Spark barrier tasks; returns each worker's final state."""
    slots = spark.sparkContext.defaultParallelism
    if task.workers > slots:
        raise ConfigError(
            f"config key 'train.distributed.workers' is {task.workers} but the cluster runs at most "
            f"{slots} tasks at once; barrier mode needs one slot per worker: lower it or add executors"
        )
    rdd = spark.sparkContext.parallelize(range(task.workers), task.workers)
    results = rdd.barrier().mapPartitions(barrier_fit(task)).collect()
    return sorted((json.loads(r) for r in results), key=lambda r: r["rank"])


# ----------------------------------------------------------------------------------- the driver


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


def training_curves_png(history: dict[str, list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=prefix + metric)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate_split(classifier: Any, source: readers.SplitSource) -> tuple[float, float]:
    """Exact (accuracy, loss) of a classifier over a whole split, on this process."""
    correct, loss, rows = 0, 0.0, 0
    with contextlib.ExitStack() as stack:
        for images, labels in source.open(stack, 256).as_numpy_iterator():
            probabilities = classifier.predict_tensors(images)
            picked = probabilities[np.arange(len(labels)), labels]
            loss += float(-np.log(np.clip(picked, 1e-7, 1.0)).sum())
            correct += int((probabilities.argmax(axis=1) == labels).sum())
            rows += len(labels)
    if rows == 0:
        return 0.0, math.inf
    return correct / rows, loss / rows


def run(spark: SparkSession, config: Config, callbacks: Sequence[Any] = (), force: bool = False
        ) -> TrainSummary | TrainSkipped:
    """Train, track, register. `callbacks` are extra Keras callbacks (single-worker training);
    `force` trains even when nothing changed since the last registered version."""
    from imageiq_spark.ml import prepared

    started = time.monotonic()
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
        return _train_leased(spark, config, callbacks, started, reader, version, spec, fingerprint,
                             folder, held)


def _train_leased(spark: SparkSession, config: Config, callbacks: Sequence[Any], started: float,
                  reader: readers.Reader, version: int, spec: Any, fingerprint: str, folder: str,
                  held: Lease) -> TrainSummary:
    """`run`'s training, registration and gate, holding the lease on the checkpoint `folder`."""
    from imageiq_spark.ml import prepared

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
        summary = _train_and_log(spark, config, task, version, labels, spec, callbacks, started,
                                 fingerprint, held)
    finally:
        for source in sources.values():
            readers.release(source)
    return summary


def _train_and_log(spark: SparkSession, config: Config, task: TrainTask, version: int,
                   labels: list[str], spec: Any, callbacks: Sequence[Any], started: float,
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

        for name, values in state.history.items():
            for step, value in enumerate(values):
                mlflow.log_metric(name, value, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(training_curves_png(state.history, Path(tmp) / "training_curves.png")))

            model = models.build_model(task.spec)
            _load_weights(model, task.checkpoint_dir, BEST_WEIGHTS)
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
    return TrainSummary(
        model=task.spec.architecture, run_id=run_id, version=registered, alias=alias,
        epochs_run=state.epochs_done, resumed_from=resumed_from, best_epoch=state.best_epoch,
        val_accuracy=val_accuracy, val_loss=val_loss, champion_val_accuracy=champion_accuracy,
        gate_reason=decision.reason,
        prepared_version=version, train_rows=task.train.rows, val_rows=task.val.rows,
        workers=task.workers, reader=task.train.reader, elapsed_s=time.monotonic() - started,
    )
