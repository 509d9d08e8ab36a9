"""Prepared tensors -> `tf.data`: the Arrow reader (default) and Petastorm (extra), one interface.

`materialize(...)` writes a split's `tensor` and `label_index` columns once as Parquet under
`<storage.root>/cache/train/` (or `train.cache_uri`) and returns a picklable `SplitSource`;
`SplitSource.open(...)` gives a `tf.data.Dataset` of (uint8 [n, h, w, c], int32 [n]) batches for
one shard, so Spark barrier tasks each read their own. The Arrow reader (`train.reader: arrow`)
reads the files with `pyarrow.dataset` from any file system or object store pyarrow reaches
(s3a:// directly); each shard reads only its own row groups, in a new order every epoch, through a
shuffle buffer of `train.shuffle_buffer` rows. Petastorm (`petastorm`, the `[petastorm]` extra)
reads through `make_spark_converter`; it needs pyarrow <= 14 and is inactive upstream.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Literal  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from pyspark.sql import DataFrame  # noqa: E402

from imageiq_spark.core.config import Config, ConfigError  # noqa: E402
from imageiq_spark.core.config_sections import AugmentConfig  # noqa: E402
from imageiq_spark.lake import storage  # noqa: E402
from imageiq_spark.lake.lakehouse import lake_path  # noqa: E402

Reader = Literal["petastorm", "arrow"]
COLUMNS = ["tensor", "label_index"]


@dataclass(frozen=True)
class SplitSource:
    """One split materialised for a reader; picklable, so it travels into Spark tasks."""

    reader: Reader
    rows: int
    shape: tuple[int, int, int]
    #: Petastorm's converter (reader `petastorm`) or the Parquet folder URI (reader `arrow`).
    handle: Any

    def open(
        self,
        stack: contextlib.ExitStack,
        batch_size: int,
        *,
        shard_index: int = 0,
        shard_count: int = 1,
        repeat: bool = False,
        shuffle_buffer: int = 0,
        seed: int | None = None,
        workers: int = 2,
        augment: AugmentConfig | None = None,
    ) -> tf.data.Dataset:
        """Batches of this split's shard; readers stay open until `stack` closes.

        `repeat` streams the shard forever: with a fixed number of steps per epoch every worker
        then steps the same number of batches whatever its shard's size.
        """
        if self.reader == "petastorm":
            batches = self._petastorm_batches(stack, batch_size, shard_index, shard_count, repeat,
                                              shuffle_buffer, seed, workers)
        else:
            rows = self._arrow_rows(shard_index, shard_count, repeat, shuffle_buffer, seed)
            batches = rows.batch(batch_size)
        height, width, channels = self.shape

        def decode(tensor: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            images = tf.reshape(tf.io.decode_raw(tensor, tf.uint8), [-1, height, width, channels])
            return images, tf.cast(label, tf.int32)

        dataset = batches.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        if augment is not None and _augments(augment):
            dataset = dataset.map(augmenter(augment, self.shape, seed),
                                  num_parallel_calls=tf.data.AUTOTUNE)
        options = tf.data.Options()
        # Each worker reads its own shard: TensorFlow must not shard it again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)

    def _petastorm_batches(self, stack: contextlib.ExitStack, batch_size: int, shard_index: int,
                           shard_count: int, repeat: bool, shuffle_buffer: int, seed: int | None,
                           workers: int) -> tf.data.Dataset:
        sharding = {"cur_shard": shard_index, "shard_count": shard_count} if shard_count > 1 else {}
        batches = stack.enter_context(
            self.handle.make_tf_dataset(
                batch_size=batch_size, num_epochs=None if repeat else 1, workers_count=workers,
                shuffling_queue_capacity=shuffle_buffer or None,
                shuffle_row_groups=shuffle_buffer > 0, seed=seed, **sharding,
            )
        )
        return batches.map(lambda batch: (batch.tensor, batch.label_index))

    def _arrow_rows(self, shard_index: int, shard_count: int, repeat: bool, shuffle_buffer: int,
                    seed: int | None) -> tf.data.Dataset:
        uri = self.handle
        size = int(np.prod(self.shape))

        def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            yield from arrow_batches(uri, size, shard_index, shard_count,
                                     epochs=None if repeat else 1,
                                     seed=seed if shuffle_buffer else None)

        signature = (
            tf.TensorSpec(shape=(None,), dtype=tf.string),
            tf.TensorSpec(shape=(None,), dtype=tf.int32),
        )
        rows = tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch()
        return rows.shuffle(shuffle_buffer, seed=seed) if shuffle_buffer else rows


def shard_row_groups(uri: str, shard_index: int = 0, shard_count: int = 1
                     ) -> tuple[list[Any], int, int]:
    """This shard's Parquet row groups of the split, every shard-th one counted over all files,
    with (row index, row count) 0, 1. A split of fewer row groups than shards (a tiny val split)
    is read whole by every shard, which keeps rows i % row count == row index instead."""
    import pyarrow.dataset as ds

    filesystem, path = storage.filesystem(uri)
    dataset = ds.dataset(path, format="parquet", filesystem=filesystem)
    groups = [group for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path)
              for group in fragment.split_by_row_group()]
    if len(groups) < shard_count:
        return groups, shard_index, shard_count
    return groups[shard_index::shard_count], 0, 1


def arrow_batches(uri: str, row_size: int, shard_index: int = 0, shard_count: int = 1, *,
                  epochs: int | None = 1, seed: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tensor bytes [n], label_index [n]) record batches of one shard, reading only its own row
    groups; `epochs` None repeats forever; a `seed` visits the row groups in a new order each
    epoch (the rows within are mixed by the caller's bounded shuffle buffer)."""
    import pyarrow.compute as pc

    groups, row_index, row_count = shard_row_groups(uri, shard_index, shard_count)
    rng = np.random.default_rng(seed)
    for _ in itertools.count() if epochs is None else range(epochs):
        shuffled = seed is not None and row_count == 1
        order = rng.permutation(len(groups)) if shuffled else range(len(groups))
        offset = 0
        for i in order:
            for batch in groups[i].to_batches(columns=COLUMNS, batch_size=1024):
                tensors, labels = batch.column(0), batch.column(1)
                wrong = pc.invert(pc.equal(pc.binary_length(tensors), row_size))
                if tensors.null_count or pc.any(wrong).as_py():
                    raise ValueError(
                        "prepared tensor of another size than the configured "
                        f"{row_size} bytes; rerun `imageiq preprocess` so every tensor has it"
                    )
                keep = np.arange(offset, offset + batch.num_rows) % row_count == row_index
                offset += batch.num_rows
                yield (tensors.to_numpy(zero_copy_only=False)[keep],
                       labels.to_numpy(zero_copy_only=False).astype("int32")[keep])


def augmenter(augment: AugmentConfig, shape: tuple[int, int, int], seed: int | None):
    """A tf.data map applying the configured random changes to uint8 batches (training only)."""
    from tf_keras import layers

    steps = []
    if augment.flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if augment.rotation:
        steps.append(layers.RandomRotation(augment.rotation, fill_mode="constant", seed=seed))
    if augment.zoom:
        steps.append(layers.RandomZoom(augment.zoom, fill_mode="constant", seed=seed))
    if augment.brightness:
        steps.append(layers.RandomBrightness(augment.brightness, value_range=(0, 255), seed=seed))
    if augment.contrast:
        steps.append(layers.RandomContrast(augment.contrast, seed=seed))

    def apply(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(images, tf.float32)
        for step in steps:
            x = step(x, training=True)
        x = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
        return tf.ensure_shape(x, [None, *shape]), labels

    return apply


def _augments(augment: AugmentConfig) -> bool:
    return bool(augment.flip or augment.rotation or augment.zoom or augment.brightness
                or augment.contrast)


def cache_root(config: Config) -> str:
    return config.train.cache_uri.rstrip("/") or lake_path(config, "cache", "train")


def check_reader(config: Config) -> None:
    """`train.reader: petastorm` needs the `[petastorm]` extra, and Petastorm 0.13 reads object
    storage only through s3fs, with which pyarrow 14 fails ("Keyword 'validate_schema' is not yet
    supported"): catch both before any work is done."""
    if config.train.reader != "petastorm":
        return
    if importlib.util.find_spec("petastorm") is None:
        raise ConfigError(
            "config key 'train.reader' is 'petastorm', but the petastorm package is not installed; "
            "set train.reader: arrow (the default), or install the extra: "
            "pip install 'imageiq-spark[petastorm]' (it needs pyarrow <= 14, so Spark <= 4.0)"
        )
    root = cache_root(config)
    if urlparse(root).scheme in storage.OBJECT_STORE_SCHEMES:
        raise ConfigError(
            f"config key 'train.reader' is 'petastorm', which cannot read its training cache from "
            f"object storage ('{root}'); set train.reader: arrow (reads s3a:// directly), or "
            "train.cache_uri to a file system every training worker reaches (hdfs://, NFS, /dbfs)"
        )


def materialize(split: DataFrame, config: Config, reader: Reader, shape: tuple[int, int, int],
                files: int = 2) -> SplitSource:
    """Write one split's tensors as Parquet for `reader` (at least `files` files, for sharding)."""
    rows = split.select(*COLUMNS).repartition(max(files, 1))
    count = split.count()
    if reader == "petastorm":
        from petastorm.spark import SparkDatasetConverter, make_spark_converter

        spark = split.sparkSession
        spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF,
                       f"{cache_root(config)}/petastorm")
        # Small row groups let `files` shards each get row groups of their own.
        return SplitSource("petastorm", count, shape,
                           make_spark_converter(rows, parquet_row_group_size_bytes=8 * 2**20))
    uri = f"{cache_root(config)}/arrow/{uuid.uuid4().hex}"
    rows.write.parquet(uri)
    return SplitSource("arrow", count, shape, uri)


def release(source: SplitSource) -> None:
    """Delete a split's cache files."""
    if source.reader == "petastorm":
        source.handle.delete()
    else:
        storage.delete_dir(source.handle)
