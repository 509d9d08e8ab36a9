"""Splits decided once per image (first assignment wins) and shared by near-duplicate clusters."""

from __future__ import annotations

import hashlib

import images
import pytest
from conftest import make_config
from image_tables import image_rows, variants

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.lake import lakehouse
from imageiq_spark.ml import splits
from imageiq_spark.stages import duplicates, ingest, preprocess


def add_images(spark, config, contents: dict[str, bytes]) -> list[str]:
    ingest.ensure_tables(spark, config)
    lakehouse.merge_new_rows(config, "images", image_rows(spark, contents), ["image_id"])
    return [hashlib.sha256(data).hexdigest() for data in contents.values()]


def prepared_splits(spark, config) -> dict[str, str]:
    return {r["image_id"]: r["split"] for r in preprocess.read_prepared(spark, config).collect()}


def hash_split(image_id: str, train: float, val: float) -> str:
    u = int(hashlib.sha256(f"imageiq-split:{image_id}".encode()).hexdigest()[:8], 16) / 2**32
    return "train" if u < train else "val" if u < train + val else "test"


def test_old_images_keep_their_split_when_the_fractions_change(spark, tmp_path):
    config = make_config(tmp_path, preprocess={"size": [8, 8],
                                               "split": {"train": 1.0, "val": 0.0, "test": 0.0}})
    digits, labels = load_digits()

    def digit_files(indices: range) -> dict[str, bytes]:
        return {f"{labels[i]}/{i}.png": images.gray_png(digits[i]) for i in indices}

    old = add_images(spark, config, digit_files(range(12)))
    preprocess.run(spark, config)
    # New fractions and a new preprocess version (gray tensors): every image is prepared again.
    changed = config.with_overrides({"preprocess.split": {"train": 0.0, "val": 0.0, "test": 1.0},
                                     "preprocess.color": "gray"})
    new = add_images(spark, changed, digit_files(range(12, 20)))
    preprocess.run(spark, changed)
    before, after = prepared_splits(spark, config), prepared_splits(spark, changed)
    assert before == {image_id: "train" for image_id in old}
    assert after == {**{image_id: "train" for image_id in old}, **{image_id: "test" for image_id in new}}
    stored = lakehouse.read_table(spark, config, "image_splits").collect()
    assert {r["image_id"]: (r["split"], r["rule"]) for r in stored} == {
        **{i: ("train", "hash") for i in old}, **{i: ("test", "hash") for i in new}}


@pytest.fixture(scope="module")
def clustered(spark, tmp_path_factory):
    fractions = {"train": 0.5, "val": 0.0, "test": 0.5}
    config = make_config(tmp_path_factory.mktemp("splits"), preprocess={"size": [8, 8], "split": fractions})
    contents: dict[str, bytes] = {}
    for seed in range(4):
        photo = images.camera_scene(240, 320, seed)
        contents[f"p{seed}/original"] = images.jpeg(photo, quality=95)
        contents.update({f"p{seed}/{name}": data for name, data in variants(photo).items()})
    contents.update({f"other/{s}": images.jpeg(images.camera_scene(240, 320, s), quality=95)
                     for s in range(10, 14)})
    add_images(spark, config, contents)
    duplicates.run(spark, config)
    preprocess.run(spark, config)
    clusters = {r["image_id"]: r["cluster_id"] for r in splits.read_clusters(spark, config).collect()}
    prepared = preprocess.read_prepared(spark, config).select("image_id", "split")
    leak = splits.leakage(spark, config, prepared)
    return config, contents, clusters, {r["image_id"]: r["split"] for r in prepared.collect()}, leak


def test_a_near_duplicate_cluster_never_straddles_splits(clustered):
    config, contents, clusters, split_of, _ = clustered
    families = {name.split("/")[0] for name in contents if name.startswith("p")}
    assert len(set(clusters.values())) == len(families)
    for cluster in set(clusters.values()):
        members = [i for i, c in clusters.items() if c == cluster]
        # The whole cluster goes where its smallest image_id hashes; under the old rule most
        # clusters of five would have been cut in two.
        assert {split_of[i] for i in members} == {hash_split(min(members), 0.5, 0.0)}
    old_rule = [{hash_split(i, 0.5, 0.0) for i, c in clusters.items() if c == cluster}
                for cluster in set(clusters.values())]
    assert sum(len(s) > 1 for s in old_rule) >= 1
    unclustered = set(split_of) - set(clusters)
    assert {i: split_of[i] for i in unclustered} == {i: hash_split(i, 0.5, 0.0) for i in unclustered}


def test_leakage_counts_test_images_with_a_twin_in_train_under_the_old_rule(clustered):
    _, _, clusters, split_of, leak = clustered
    old = {i: hash_split(i, 0.5, 0.0) for i in split_of}
    leaked = {i for i, c in clusters.items() if old[i] == "test"
              and any(old[j] == "train" for j, d in clusters.items() if d == c)}
    assert leak == splits.Leakage("test", sum(s == "test" for s in split_of.values()), 0, len(leaked))
    assert leak.old_rule > 0


def test_new_splits_follow_the_cluster_member_already_assigned(spark):
    stored = spark.createDataFrame([("b", "test"), ("d", "train")], "image_id string, split string")
    clusters = spark.createDataFrame([("a", "a"), ("b", "a"), ("c", "a"), ("d", "a")],
                                     "image_id string, cluster_id string")
    ids = spark.createDataFrame([("a",), ("c",), ("e",)], "image_id string")
    rows = splits.new_splits(ids, stored, None, clusters, 1.0, 0.0).orderBy("image_id").collect()
    # b is the smallest assigned member: its split wins over d's; e has no cluster, hashes alone.
    assert [tuple(r) for r in rows] == [("a", "test", "cluster"), ("c", "test", "cluster"),
                                        ("e", "train", "hash")]


def test_new_splits_keep_the_split_of_images_prepared_before_splits_were_stored(spark):
    stored = spark.createDataFrame([("s", "val")], "image_id string, split string")
    earlier = spark.createDataFrame([("a", "val"), ("s", "test")], "image_id string, split string")
    ids = spark.createDataFrame([("a",), ("e",), ("s",)], "image_id string")
    rows = splits.new_splits(ids, stored, earlier, None, 1.0, 0.0).orderBy("image_id").collect()
    # a keeps its earlier split; s already has a stored one, so it is not assigned again.
    assert [tuple(r) for r in rows] == [("a", "val", "prepared"), ("e", "train", "hash")]


def test_new_splits_let_a_cluster_follow_a_member_prepared_before_splits_were_stored(spark):
    stored = spark.createDataFrame([], "image_id string, split string")
    earlier = spark.createDataFrame([("b", "test")], "image_id string, split string")
    clusters = spark.createDataFrame([("a", "a"), ("b", "a")], "image_id string, cluster_id string")
    ids = spark.createDataFrame([("a",), ("b",)], "image_id string")
    rows = splits.new_splits(ids, stored, earlier, clusters, 1.0, 0.0).orderBy("image_id").collect()
    assert [tuple(r) for r in rows] == [("a", "test", "cluster"), ("b", "test", "prepared")]
