"""The Arrow training reader: each shard reads its own row groups, every row once per epoch, in a
new order each epoch; the Petastorm reader asks for its extra by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config

from imageiq_spark.core.config import ConfigError
from imageiq_spark.core.config_sections import TrainConfig
from imageiq_spark.ml import readers

ROW_SIZE = 4


@pytest.fixture
def split_folder(tmp_path: Path) -> str:
    """Three Parquet files of 40 rows in row groups of 10: 12 row groups, labels 0..119."""
    folder = tmp_path / "split"
    folder.mkdir()
    for f in range(3):
        labels = np.arange(f * 40, (f + 1) * 40, dtype="int32")
        table = pa.table({"tensor": [bytes([i % 256] * ROW_SIZE) for i in labels],
                          "label_index": labels})
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=10)
    return str(folder)


def labels_of(batches) -> list[int]:
    return [int(label) for _, labels in batches for label in labels]


def test_shards_read_disjoint_row_groups_that_together_are_the_split(split_folder):
    shards = [readers.shard_row_groups(split_folder, i, 4) for i in range(4)]
    shard_labels = [labels_of(readers.arrow_batches(split_folder, ROW_SIZE, i, 4)) for i in range(4)]

    assert [len(groups) for groups, _, _ in shards] == [3, 3, 3, 3]
    assert [(index, count) for _, index, count in shards] == [(0, 1)] * 4
    assert sorted(label for labels in shard_labels for label in labels) == list(range(120))
    # A shard reads whole row groups of ten consecutive rows, not every fourth row.
    assert shard_labels[0][:10] == list(range(10))


def test_a_split_of_fewer_row_groups_than_shards_is_dealt_by_row(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    pq.write_table(pa.table({"tensor": [b"\0" * ROW_SIZE] * 5, "label_index": np.arange(5, dtype="int32")}),
                   folder / "part-0.parquet")

    shard_labels = [labels_of(readers.arrow_batches(str(folder), ROW_SIZE, i, 2)) for i in range(2)]

    assert shard_labels == [[0, 2, 4], [1, 3]]


def test_each_epoch_visits_every_row_once_in_a_new_row_group_order(split_folder):
    batches = readers.arrow_batches(split_folder, ROW_SIZE, epochs=2, seed=7)
    labels = labels_of(batches)
    first, second = labels[:120], labels[120:]

    assert sorted(first) == sorted(second) == list(range(120))
    assert first != second
    assert first != list(range(120))


def test_unseeded_reading_keeps_the_file_order(split_folder):
    assert labels_of(readers.arrow_batches(split_folder, ROW_SIZE)) == list(range(120))


def test_a_tensor_of_the_wrong_size_is_named_with_the_fix(split_folder):
    with pytest.raises(ValueError, match="rerun `imageiq preprocess`"):
        list(readers.arrow_batches(split_folder, ROW_SIZE + 1))


@pytest.mark.skipif(importlib.util.find_spec("petastorm") is not None,
                    reason="the [petastorm] extra is installed here")
def test_petastorm_reader_without_its_extra_is_a_config_error_naming_the_extra(tmp_path):
    config = make_config(tmp_path, train={"reader": "petastorm"})

    with pytest.raises(ConfigError, match=r"'train.reader'.*imageiq-spark\[petastorm\]"):
        readers.check_reader(config)


def test_the_default_reader_is_arrow_and_needs_no_extra(tmp_path):
    assert TrainConfig().reader == "arrow"
    readers.check_reader(make_config(tmp_path, train={"reader": "arrow"}))
