"""The Keras side of training: the task a worker runs, its resumable state and callbacks, and
the fit itself, on the driver or on Spark barrier tasks; then the curves and an exact evaluation.

`train.distributed.workers: N > 1` runs N Spark barrier tasks, each a `MultiWorkerMirroredStrategy`
worker with TF_CONFIG built from the barrier context, reading its own shard; every worker steps the
same fixed number of batches per epoch from an endlessly repeated shard, because uneven shards hang
collective training.

GPUs (`train.distributed.use_gpu: true`): each barrier task takes one GPU from Spark's resource
scheduling and sees only it (CUDA_VISIBLE_DEVICES). The cluster must offer them, e.g.
`spark.executor.resource.gpu.amount=1`, `spark.task.resource.gpu.amount=1` and
`spark.executor.resource.gpu.discoveryScript=/opt/spark/examples/src/main/scripts/getGpusResources.sh`
(EMR and Databricks GPU clusters set these).

Each epoch the chief worker writes a checkpoint (weights, best weights, early-stopping state and
history) into the task's checkpoint folder; a crashed run started again resumes there. Early
stopping on validation loss restores the best weights.
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
from pyspark.sql import SparkSession  # noqa: E402

from imageiq_spark.core.quiet import native_stderr_muted  # noqa: E402

# A barrier task's Python worker imports this module first: TensorFlow's C++ start-up lines stay
# out of the job's log there too (quiet.py).
with native_stderr_muted():
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

from imageiq_spark.core.config import ConfigError  # noqa: E402
from imageiq_spark.core.config_sections import AugmentConfig  # noqa: E402
from imageiq_spark.lake import storage  # noqa: E402
from imageiq_spark.ml import models, readers  # noqa: E402

log = logging.getLogger(__name__)

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


def load_weights(model: Any, directory: str, name: str) -> None:
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
            load_weights(model, task.checkpoint_dir, LAST_WEIGHTS)
    checkpoint = EpochCheckpoint(state, task, directory)
    if state.epochs_done and storage.exists(f"{task.checkpoint_dir}/{BEST_WEIGHTS}"):
        best = models.build_model(task.spec)
        load_weights(best, task.checkpoint_dir, BEST_WEIGHTS)
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
