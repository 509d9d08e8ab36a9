"""The preprocess stage on real Delta tables: tensors, labels, splits, reruns, versions, quarantine.

One small lakehouse is prepared four times (first run, rerun, new images with a new label, a
config change); each test asserts one behaviour of that history.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import images
import numpy as np
import pytest
from cli_process import start_cli, write_conf
from conftest import make_config
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.core import tables
from imageiq_spark.core.config import Config
from imageiq_spark.core.registry import RESIZE_POLICIES
from imageiq_spark.lake import lakehouse
from imageiq_spark.stages import ingest, preprocess
from imageiq_spark.vision.resize import resize_policy
from imageiq_spark.vision.spec import TransformSpec
from imageiq_spark.vision.transform import prepare_image

LABELS = ("3", "5", "7")
PER_LABEL = 8


@dataclass
class History:
    config: Config
    contents: dict[str, bytes]  # image_id -> bytes
    labels: dict[str, str | None]
    broken_id: str
    new_ids: list[str]
    first: Any
    second: Any
    third: Any
    gray: Any
    gray_config: Config
    after_first: list[Any]
    after_second: list[Any]
    vocab_first: list[str]
    vocab_third: list[str]


def image_rows(spark, entries: list[tuple[str, bytes, str | None]]):
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [
        (hashlib.sha256(data).hexdigest(), path, label, "png", 28, 28, 1, 8, 1, len(data), None, data, now)
        for path, data, label in entries
    ]
    return spark.createDataFrame(rows, ingest.IMAGES_SCHEMA)


def add_images(spark, config: Config, entries: list[tuple[str, bytes, str | None]]) -> list[str]:
    ingest.ensure_tables(spark, config)
    lakehouse.merge_new_rows(config, "images", image_rows(spark, entries), ["image_id"])
    return [hashlib.sha256(data).hexdigest() for _, data, _ in entries]


def snapshot(spark, config: Config) -> list[Any]:
    return (
        preprocess.read_prepared(spark, config)
        .select("image_id", "label", "label_index", "split", "tensor", "height", "width", "channels",
                "preprocess_version", "prepared_at")
        .orderBy("image_id")
        .collect()
    )


@pytest.fixture(scope="module")
def history(spark, tmp_path_factory: pytest.TempPathFactory) -> History:
    config = make_config(tmp_path_factory.mktemp("preprocess"), preprocess={"size": [16, 16]})
    digits, digit_labels = load_digits()
    entries: list[tuple[str, bytes, str | None]] = []
    for label in LABELS:
        picks = np.flatnonzero(digit_labels == int(label))[:PER_LABEL]
        entries += [(f"file:/src/{label}/{i}.png", images.gray_png(digits[i]), label) for i in picks]
    entries.append(("file:/src/loose.png", images.gray_png(digits[-1]), None))
    broken = b"\x89PNG\r\n\x1a\n" + b"not really a png"
    entries.append(("file:/src/5/broken.png", broken, "5"))
    add_images(spark, config, entries)
    contents = {hashlib.sha256(d).hexdigest(): d for _, d, _ in entries}
    labels = {hashlib.sha256(d).hexdigest(): label for _, d, label in entries}

    first = preprocess.run(spark, config)
    after_first = snapshot(spark, config)
    vocab_first = preprocess.read_label_vocabulary(spark, config)
    second = preprocess.run(spark, config)
    after_second = snapshot(spark, config)

    ones = np.flatnonzero(digit_labels == 1)[:4]
    new_entries = [(f"file:/src/1/{i}.png", images.gray_png(digits[i]), "1") for i in ones]
    new_ids = add_images(spark, config, new_entries)
    contents.update({hashlib.sha256(d).hexdigest(): d for _, d, _ in new_entries})
    labels.update({hashlib.sha256(d).hexdigest(): label for _, d, label in new_entries})
    third = preprocess.run(spark, config)
    vocab_third = preprocess.read_label_vocabulary(spark, config)

    gray_config = config.with_overrides({"preprocess.color": "gray"})
    gray = preprocess.run(spark, gray_config)
    return History(config, contents, labels, hashlib.sha256(broken).hexdigest(), new_ids, first, second,
                   third, gray, gray_config, after_first, after_second, vocab_first, vocab_third)


def expected_split(image_id: str, train: float = 0.8, val: float = 0.1) -> str:
    u = int(hashlib.sha256(f"imageiq-split:{image_id}".encode()).hexdigest()[:8], 16) / 2**32
    return "train" if u < train else "val" if u < train + val else "test"


def test_prepared_tensors_are_the_transform_of_the_image_bytes(history: History):
    spec = TransformSpec.from_config(history.config)
    assert history.first.prepared == len(history.after_first) == len(LABELS) * PER_LABEL + 1
    for row in history.after_first:
        expected = prepare_image(history.contents[row["image_id"]], spec)
        assert bytes(row["tensor"]) == expected.tobytes()
        assert (row["height"], row["width"], row["channels"]) == (16, 16, 3)
        assert row["preprocess_version"] == spec.version
        assert row["label"] == history.labels[row["image_id"]]


def test_label_index_follows_a_sorted_vocabulary_and_unlabelled_images_have_none(history: History):
    assert history.vocab_first == list(LABELS)
    for row in history.after_first:
        if row["label"] is None:
            assert row["label_index"] is None
        else:
            assert row["label_index"] == LABELS.index(row["label"])


def test_split_comes_from_a_hash_of_the_image_id(history: History):
    splits = {row["image_id"]: row["split"] for row in history.after_first}
    assert splits == {image_id: expected_split(image_id) for image_id in splits}
    counted = {s: sum(1 for v in splits.values() if v == s) for s in ("train", "val", "test")}
    assert {k: v for k, v in history.first.split_counts.items()} == {k: v for k, v in counted.items() if v}


def test_summary_reports_per_class_counts_per_split(history: History):
    train_5 = sum(1 for r in history.after_first if r["split"] == "train" and r["label"] == "5")
    assert history.first.class_counts["train"]["5"] == train_5
    train_line = next(line for line in history.first.lines() if line.startswith("train:"))
    assert f"5={train_5}" in train_line


def test_elapsed_line_shows_the_floor_the_pace_and_the_statistics_after_apart(history: History):
    watch = history.first.watch
    assert watch.started <= watch.working <= watch.finished <= watch.stopped
    (line,) = [line for line in history.first.lines() if line.startswith("elapsed:")]
    assert re.fullmatch(r"elapsed: +[\d.]+ s: [\d.]+ s before the first image, then [\d.]+ "
                        r"(images/s|s per image), [\d.]+ s after the last", line), line


def test_a_rerun_with_nothing_pending_says_so_on_its_elapsed_line(history: History):
    (line,) = [line for line in history.second.lines() if line.startswith("elapsed:")]
    assert re.fullmatch(r"elapsed: +[\d.]+ s, nothing to work on", line), line


def test_rerun_prepares_nothing_and_changes_no_row(spark, history: History):
    assert history.second.prepared == 0
    assert not history.second.quarantined  # the broken image is not decoded again
    assertDataFrameEqual(
        spark.createDataFrame(history.after_second).drop("tensor"),
        spark.createDataFrame(history.after_first).drop("tensor"),
    )


def test_broken_image_goes_to_quarantine_and_the_job_goes_on(spark, history: History):
    assert dict(history.first.quarantined) == {"decode_failed": 1}
    rows = (
        lakehouse.read_table(spark, history.config, "quarantine")
        .filter(F.col("stage") == "preprocess")
        .select("path", "reason", "image_id", "version")
        .collect()
    )
    # One row per version, though the stage ran three times at the first one.
    broken = ("file:/src/5/broken.png", "decode_failed", history.broken_id)
    assert sorted(tuple(r) for r in rows) == sorted([
        (*broken, TransformSpec.from_config(history.config).version), (*broken, history.gray.version)
    ])
    assert history.broken_id not in {r["image_id"] for r in history.after_first}


def _square_only(image: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """A resize policy with a bug: it refuses every image that is not square."""
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"not square: {image.shape[:2]}")
    return cv2.resize(image, spec.size[::-1], interpolation=cv2.INTER_AREA).reshape(*spec.size, -1)


@pytest.fixture
def square_only_policy() -> Iterator[str]:
    from pyspark import cloudpickle

    # By value: the Python workers cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    resize_policy("square_only", covers=True)(_square_only)
    yield "square_only"
    del RESIZE_POLICIES["square_only"]
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_an_image_quarantined_under_one_version_is_prepared_by_a_fixed_transform(
        spark, tmp_path, square_only_policy):
    buggy = make_config(tmp_path, preprocess={"size": [8, 8], "resize": square_only_policy})
    digits, _ = load_digits()
    wide_id, *square_ids = add_images(spark, buggy, [
        ("file:/d/wide.png", images.png(images.quadrants(20, 30)), "wide"),
        *[(f"file:/d/{i}.png", images.gray_png(digits[i]), "digit") for i in range(3)],
    ])
    first = preprocess.run(spark, buggy)

    fixed = buggy.with_overrides({"preprocess.resize": "stretch"})
    second = preprocess.run(spark, fixed)

    quarantined = lakehouse.read_table(spark, buggy, "quarantine").select("image_id", "reason", "version")
    assert [tuple(r) for r in quarantined.collect()] == [(wide_id, "transform_failed", first.version)]
    assert (first.prepared, dict(second.quarantined)) == (3, {})
    prepared = preprocess.read_prepared(spark, fixed).select("image_id").collect()
    assert second.prepared == 4
    assert sorted(r.image_id for r in prepared) == sorted([wide_id, *square_ids])


def test_tables_have_their_declared_column_types_and_nullability(spark, history: History):
    for table, declared in [("prepared", tables.PREPARED_SCHEMA), ("quarantine", tables.QUARANTINE_SCHEMA),
                            (tables.LABELS_TABLE, tables.LABELS_SCHEMA),
                            (tables.VERSIONS_TABLE, tables.VERSIONS_SCHEMA),
                            (tables.STATS_TABLE, tables.RUN_STATS_SCHEMA)]:
        assert lakehouse.read_table(spark, history.config, table).schema == declared


def test_new_images_only_are_prepared_and_new_labels_are_appended(spark, history: History):
    assert history.third.prepared == len(history.new_ids) == 4
    assert history.vocab_third == [*LABELS, "1"]  # "1" sorts first but came last: index 3
    rows = snapshot(spark, history.config)
    old = {r["image_id"]: (r["label_index"], r["split"], r["prepared_at"]) for r in history.after_first}
    now = {r["image_id"]: (r["label_index"], r["split"], r["prepared_at"]) for r in rows}
    assert {k: now[k] for k in old} == old
    assert {now[i][0] for i in history.new_ids} == {3}


def test_config_change_prepares_everything_under_a_new_version(spark, history: History):
    old_version = TransformSpec.from_config(history.config).version
    new_spec = TransformSpec.from_config(history.gray_config)
    assert new_spec.version != old_version and history.gray.version == new_spec.version
    assert history.gray.prepared == len(history.contents) - 1  # all but the broken image
    gray_rows = preprocess.read_prepared(spark, history.gray_config).collect()
    assert {r["channels"] for r in gray_rows} == {1}
    sample = gray_rows[0]
    assert bytes(sample["tensor"]) == prepare_image(history.contents[sample["image_id"]], new_spec).tobytes()
    # The old version stays beside it with the same splits and label indices.
    old = {r["image_id"]: (r["split"], r["label_index"]) for r in
           preprocess.read_prepared(spark, history.config, old_version).collect()}
    assert {r["image_id"]: (r["split"], r["label_index"]) for r in gray_rows} == old


def test_channel_stats_are_the_train_split_mean_and_std(spark, history: History):
    version = TransformSpec.from_config(history.config).version
    train = preprocess.read_prepared(spark, history.config, version, ["train"]).collect()
    pixels = np.stack([np.frombuffer(r["tensor"], np.uint8).reshape(16, 16, 3) for r in train])
    mean, std = preprocess.read_channel_stats(spark, history.config, version)
    np.testing.assert_allclose(mean, pixels.reshape(-1, 3).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.reshape(-1, 3).std(axis=0), rtol=1e-9)
    assert preprocess.read_spec(spark, history.config, version) == TransformSpec.from_config(history.config)


def test_a_png_grid_of_prepared_images_is_written(history: History):
    version = TransformSpec.from_config(history.config).version
    path = Path(history.config.storage.root) / "reports" / "preprocess" / f"samples_{version}.png"
    assert history.first.grid == path.resolve().as_uri()
    grid = cv2.imread(str(path))
    assert grid is not None and grid.shape[0] > 100 and grid.shape[1] > 100
    assert grid.std() > 10  # pictures, not a blank canvas


def test_tensors_are_stored_with_the_configured_parquet_codec(history: History):
    import pyarrow.parquet as pq

    files = sorted((Path(history.config.storage.root) / "warehouse").glob("*.db/prepared/*.parquet"))
    # A write task whose images all failed leaves a file without row groups (Spark keeps one).
    metadata = [m for m in (pq.ParquetFile(f).metadata for f in files) if m.num_row_groups]
    assert metadata
    codecs = {m.row_group(0).column(4).compression for m in metadata}
    assert codecs == {"UNCOMPRESSED"}  # preprocess.compression defaults to none


def test_the_udf_reports_failures_train_sums_and_a_sample_without_spark():
    import pyarrow as pa

    spec = TransformSpec(size=(8, 8))
    digits, _ = load_digits()
    good = [images.gray_png(digits[i]) for i in range(3)]
    batch = pa.RecordBatch.from_pylist(
        [
            {"image_id": f"id{i}", "path": f"file:/{i}.png", "label": "d", "size_bytes": len(data),
             "modified_at": None, "split": split, "content": data}
            for i, (data, split) in enumerate(zip([*good, b"junk"], ["train", "val", "train", "train"]))
        ]
    )
    report = preprocess.RunReport()

    class Local:  # stands in for the accumulator: the same add() a worker calls
        def add(self, value):
            report.add(value)

    out = pa.Table.from_batches(list(preprocess.PrepareBatches(spec, Local())(iter([batch]))))
    assert out.column("image_id").to_pylist() == ["id0", "id1", "id2", "id3"]
    assert out.column("reason").to_pylist() == [None, None, None, "decode_failed"]
    assert out.column("tensor")[0].as_py() == prepare_image(good[0], spec).tobytes()
    assert [f[0] for f in report.failures] == ["id3"]
    train = np.stack([prepare_image(good[i], spec) for i in (0, 2)]).reshape(-1, 3).astype(np.int64)
    assert report.train_images == 2
    assert report.channel_total == train.sum(axis=0).tolist()
    assert report.channel_total_sq == (train * train).sum(axis=0).tolist()
    assert sorted(label for _, label, _ in report.sample) == ["d", "d", "d"]


def test_channel_stats_lost_in_a_crash_are_caught_up_by_the_next_run(spark, tmp_path):
    config = make_config(tmp_path, preprocess={"size": [8, 8]})
    digits, digit_labels = load_digits()
    add_images(spark, config, [(f"file:/d/{i}.png", images.gray_png(digits[i]), str(digit_labels[i]))
                               for i in range(30)])
    preprocess.run(spark, config)
    version = TransformSpec.from_config(config).version
    before = preprocess.read_channel_stats(spark, config, version)
    # A crash between the commit of the tensors and the store of their statistics:
    spark.sql(f"DELETE FROM delta.`{lakehouse.table_location(config, 'prepared_stats')}`")
    with pytest.raises(LookupError, match="no channel statistics"):
        preprocess.read_channel_stats(spark, config, version)
    rerun = preprocess.run(spark, config)
    assert rerun.prepared == 0
    assert preprocess.read_channel_stats(spark, config, version) == before


@pytest.mark.slow  # two CLI processes with a Spark start each; `make test-all`
def test_two_driver_processes_prepare_each_image_exactly_once(spark, tmp_path):
    config = make_config(tmp_path, preprocess={"size": [8, 8]})
    digits, digit_labels = load_digits()
    ids = add_images(spark, config, [(f"file:/d/{i}.png", images.gray_png(digits[i]),
                                      str(digit_labels[i])) for i in range(40)])
    conf = write_conf(config, tmp_path / "conf.yaml")

    drivers = [start_cli(conf, "preprocess", cwd=tmp_path) for _ in range(2)]
    outputs = [driver.communicate(timeout=900) for driver in drivers]

    assert [d.returncode for d in drivers] == [0, 0], [err[-3000:] for _, err in outputs]
    rows = preprocess.read_prepared(spark, config).groupBy("image_id").count().collect()
    assert sorted(r["image_id"] for r in rows) == sorted(ids)
    assert {r["count"] for r in rows} == {1}
    runs = lakehouse.read_table(spark, config, "job_runs").where("stage = 'preprocess'").collect()
    assert sorted(r.status for r in runs) == ["succeeded", "succeeded"]
    assert sum(r.rows_written for r in runs) == len(ids)


def test_two_drivers_with_a_commit_in_between_prepare_each_image_exactly_once(spark, tmp_path, monkeypatch):
    """Driver B (a CLI process) finds every image pending and stops; another preprocess version
    commits to `prepared`; driver A (this process) finds the same images pending, lets B commit,
    then commits itself. Delta's txnVersion took A's later start for a new transaction and added
    every image twice; the MERGE adds none."""
    import paused_driver

    config = make_config(tmp_path, preprocess={"size": [4, 4]})
    digits, digit_labels = load_digits()
    ids = add_images(spark, config, [(f"file:/d/{i}.png", images.gray_png(digits[i]),
                                      str(digit_labels[i])) for i in range(12)])
    ready, go = tmp_path / "ready", tmp_path / "go"
    other = paused_driver.start(write_conf(config, tmp_path / "conf.yaml"), "preprocess",
                                "imageiq_spark.stages.preprocess:prepare_pending", "-", ready, go,
                                cwd=tmp_path)
    paused_driver.wait_for(ready, other)
    # The commit in between: rows of another preprocess version (a relabel or OPTIMIZE is one too).
    other_version = [(ids[0], "0", 0, "train", b"\0" * 12, 2, 2, 3, "other", datetime.datetime(2026, 1, 1))]
    (spark.createDataFrame(other_version, tables.PREPARED_SCHEMA).write.format("delta").mode("append")
     .save(lakehouse.table_location(config, "prepared")))
    prepare_pending = preprocess.prepare_pending
    outputs = []

    def after_the_other_driver(*args, **kwargs):
        go.touch()
        outputs.append(other.communicate(timeout=900))
        return prepare_pending(*args, **kwargs)

    monkeypatch.setattr(preprocess, "prepare_pending", after_the_other_driver)

    summary = preprocess.run(spark, config)

    assert other.returncode == 0, outputs[0][1][-3000:]
    rows = preprocess.read_prepared(spark, config).select("image_id", "split").collect()
    assert sorted(r.image_id for r in rows) == sorted(ids)  # each exactly once
    assert summary.prepared == 0
    runs = lakehouse.read_table(spark, config, "job_runs").where("stage = 'preprocess'").collect()
    assert [(r.status, r.rows_written) for r in runs] == [("succeeded", len(ids))]
    # The channel statistics count each train image once too.
    version = TransformSpec.from_config(config).version
    stats = lakehouse.read_table(spark, config, "prepared_stats").where(
        F.col("preprocess_version") == version)
    assert stats.agg(F.sum("train_images")).first()[0] == sum(r.split == "train" for r in rows)
    assert preprocess.read_prepared(spark, config, "other").count() == 1
