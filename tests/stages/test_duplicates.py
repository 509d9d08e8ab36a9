"""Perceptual hashes and the duplicates stage on real images made here: a photo and its resized,
JPEG-60, 5%-cropped and brightened copies are near-duplicates; unrelated photos are not."""

from __future__ import annotations

import hashlib

import cv2
import images
import numpy as np
import pytest
from conftest import make_config
from image_tables import image_rows, variants
from reference import brute_force_pairs

from imageiq_spark.lake import lakehouse, runs
from imageiq_spark.serving import similar
from imageiq_spark.stages import duplicates, ingest
from imageiq_spark.stages.duplicates import tiers
from imageiq_spark.vision import phash

K = 8  # the default duplicates.max_distance


def photo(seed: int) -> np.ndarray:
    return images.camera_scene(375, 500, seed)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ the hashes


def test_copies_of_a_photo_hash_within_k_bits_and_unrelated_photos_do_not():
    for seed in range(3):
        original = phash.hash_image(images.jpeg(photo(seed), quality=95))
        for name, data in variants(photo(seed)).items():
            copy = phash.hash_image(data)
            assert phash.hamming(original.phash, copy.phash) <= K, (seed, name)
        for other in range(10, 16):
            unrelated = phash.hash_image(images.jpeg(photo(other), quality=95))
            assert phash.hamming(original.phash, unrelated.phash) > 2 * K, (seed, other)


def test_dhash_bits_follow_brightness_left_to_right():
    rising = np.tile(np.arange(0, 180, 20, dtype=np.uint8), (8, 1))  # 8x9, brighter to the right
    assert phash.dhash(rising) == -1  # all 64 bits set
    assert phash.dhash(rising[:, ::-1].copy()) == 0
    first_row_only = rising.copy()
    first_row_only[1:] = 7
    assert phash.dhash(first_row_only) == -(1 << 56)  # the 8 most significant bits


def test_pixel_digest_is_equal_for_the_same_pixels_in_other_bytes():
    picture = photo(1)
    small = images.encode(picture, "PNG", compress_level=9)
    large = images.encode(picture, "PNG", compress_level=1)
    assert small != large
    assert phash.hash_image(small).pixel_digest == phash.hash_image(large).pixel_digest
    changed = picture.copy()
    changed[0, 0, 0] ^= 1
    assert phash.hash_image(images.png(changed)).pixel_digest != phash.hash_image(small).pixel_digest


@pytest.mark.slow  # the stage test covers the join end to end; this one checks it pair by pair
def test_banded_join_equals_brute_force_hamming_on_2000_hashes(spark):
    rng = np.random.default_rng(7)
    base = rng.integers(-(2**63), 2**63 - 1, 1000, dtype=np.int64)
    # Half again as twins: each a base hash with 0..2K random bits flipped, some in reach, some not.
    twins = base.copy()
    for i in range(len(twins)):
        for bit in rng.choice(64, int(rng.integers(0, 2 * K + 1)), replace=False):
            twins[i] ^= np.int64(1) << np.int64(bit)
    hashes = np.concatenate([base, twins])
    ids = [f"{i:05d}" for i in range(len(hashes))]
    df = spark.createDataFrame([(i, int(h)) for i, h in zip(ids, hashes)], "image_id string, phash bigint")
    for k in (3, K):
        joined = tiers.hamming_pairs(df, k).collect()
        expected = brute_force_pairs(ids, hashes, k)
        assert len(expected) > 150
        assert len(joined) == len({(r[0], r[1]) for r in joined})  # each pair once
        assert {(r[0], r[1]) for r in joined} == expected
        assert all(r[2] == phash.hamming(hashes[int(r[0])], hashes[int(r[1])]) for r in joined)


def test_cosine_pairs_equal_every_pair_above_the_threshold(spark):
    rng = np.random.default_rng(3)
    vectors = np.abs(rng.normal(size=(300, 16))).astype(np.float32)
    vectors[150:] = vectors[:150] + rng.normal(0, 0.08, (150, 16)).astype(np.float32)  # twins
    vectors[7] = 0.0  # a zero vector is similar to nothing
    ids = [f"{i:03d}" for i in range(len(vectors))]
    df = spark.createDataFrame([(i, v.tolist()) for i, v in zip(ids, vectors)],
                               "image_id string, vector array<float>")
    found = {(r[0], r[1]): r[2] for r in tiers.cosine_pairs(spark, df, 0.97).collect()}
    unit = vectors.astype(np.float64) / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    expected = {(ids[i], ids[j]) for i, j in pairs if sims[i, j] >= 0.97}
    # Float32 rounding may decide pairs within a hair of the threshold either way.
    undecided = {(ids[i], ids[j]) for i, j in pairs if abs(sims[i, j] - 0.97) < 1e-5}
    assert 100 < len(expected) < 2000
    assert set(found) - undecided == expected - undecided
    assert all(found[(a, b)] == pytest.approx(sims[int(a), int(b)], abs=1e-5) for a, b in found)


def test_components_label_each_image_with_the_smallest_id_of_its_cluster():
    assert tiers.components([("c", "d"), ("b", "c"), ("x", "y"), ("a", "y")]) == {
        "a": "a", "x": "a", "y": "a", "b": "b", "c": "b", "d": "b"}


# ------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("duplicates"))
    contents = {"photo/0": images.jpeg(photo(0), quality=95)}
    contents.update({f"photo/{name}": data for name, data in variants(photo(0)).items()})
    # Same pixels in two files: the exact tier.
    contents["same/small"] = images.encode(photo(1), "PNG", compress_level=9)
    contents["same/large"] = images.encode(photo(1), "PNG", compress_level=1)
    contents.update({f"other/{seed}": images.jpeg(photo(seed), quality=95) for seed in range(10, 14)})
    contents["broken/x"] = b"\x89PNG\r\n\x1a\n" + b"not really a png"
    # A thumbnail and its brightened copy: under duplicates.min_side, no phash pair.
    digit = cv2.resize(photo(2), (28, 28), interpolation=cv2.INTER_AREA)
    contents["small/digit"] = images.png(digit)
    contents["small/brightened"] = images.png(cv2.add(digit, np.full_like(digit, 40)))
    ingest.ensure_tables(spark, config)
    lakehouse.merge_new_rows(config, "images", image_rows(spark, contents), ["image_id"])
    first = duplicates.run(spark, config)
    second = duplicates.run(spark, config)
    pairs = lakehouse.read_table(spark, config, "near_duplicates").collect()
    clusters = {r["image_id"]: r
                for r in lakehouse.read_table(spark, config, "near_duplicate_clusters").collect()}
    return config, contents, first, second, pairs, clusters


def test_duplicates_finds_each_copy_of_a_photo_and_nothing_unrelated(lake):
    _, contents, first, _, pairs, clusters = lake
    ids = {name: sha(data) for name, data in contents.items()}
    family = {ids[n] for n in ids if n.startswith("photo/")}
    phash_pairs = {(r["image_id_a"], r["image_id_b"]) for r in pairs if r["tier"] == "phash"}
    for name in ("resized", "jpeg60", "cropped", "brightened"):
        pair = tuple(sorted((ids["photo/0"], ids[f"photo/{name}"])))
        assert pair in phash_pairs, name
    assert {(r["image_id_a"], r["image_id_b"]) for r in pairs if r["tier"] == "exact"} == {
        tuple(sorted((ids["same/small"], ids["same/large"])))}
    unrelated = {ids[n] for n in ids if n.startswith(("other/", "broken/", "small/"))}
    assert not unrelated & {i for r in pairs for i in (r["image_id_a"], r["image_id_b"])}
    assert all(r["image_id_a"] < r["image_id_b"] for r in pairs)
    assert all(r["distance"] <= K for r in pairs)
    # The family is one cluster named by its smallest id; the exact pair another.
    assert {i: clusters[i]["cluster_id"] for i in family} == {i: min(family) for i in family}
    assert {r["cluster_size"] for i, r in clusters.items() if i in family} == {len(family)}
    assert len(clusters) == len(family) + 2
    assert first.hashed == len(contents) and first.unreadable == 1
    assert first.clusters == 2


def test_duplicates_rerun_adds_nothing(lake):
    _, _, first, second, pairs, _ = lake
    assert second.hashed == 0
    assert second.new_pairs == 0 and first.new_pairs == len(pairs)
    assert second.pairs == first.pairs == {
        tier: sum(r["tier"] == tier for r in pairs) for tier in ("exact", "phash")}


def test_similar_without_embeddings_ranks_by_phash_the_image_itself_first(spark, lake):
    config, contents, _, _, _, _ = lake
    ids = {name: sha(data) for name, data in contents.items()}
    result = similar.find_similar(spark, config, ids["photo/0"], k=5)
    assert result.method == "phash"
    assert result.neighbours[0].image_id == ids["photo/0"] and result.neighbours[0].similarity == 1.0
    # The four copies follow, each at most K bits away.
    assert {n.image_id for n in result.neighbours[1:]} == {ids[f"photo/{name}"] for name in
                                                           ("resized", "jpeg60", "cropped", "brightened")}
    assert all(n.similarity >= 1 - K / 64 for n in result.neighbours)


def test_thumbnails_pair_with_their_photo_and_smaller_ones_are_reported_and_counted(spark, tmp_path):
    config = make_config(tmp_path)
    original = photo(3)
    contents = {"photo/original": images.jpeg(original, quality=95)}
    for side in (60, 32, 28):
        thumbnail = cv2.resize(original, (side, side), interpolation=cv2.INTER_AREA)
        contents[f"photo/thumb{side}"] = images.png(thumbnail)
    ids = {name: sha(data) for name, data in contents.items()}
    ingest.ensure_tables(spark, config)
    lakehouse.merge_new_rows(config, "images", image_rows(spark, contents), ["image_id"])

    summary = runs.record_run(spark, config, "duplicates", lambda: duplicates.run(spark, config))

    phash_pairs = {(r["image_id_a"], r["image_id_b"]) for r in
                   lakehouse.read_table(spark, config, "near_duplicates").where("tier = 'phash'").collect()}
    for name in ("thumb60", "thumb32"):
        assert tuple(sorted((ids["photo/original"], ids[f"photo/{name}"]))) in phash_pairs, name
    assert not any(ids["photo/thumb28"] in p for p in phash_pairs)
    assert summary.small == 1 and summary.counts().skipped == 1
    (line,) = [line for line in summary.lines() if line.startswith("phash")]
    assert line.endswith("pairs (1 images under 32 px a side left out)")
    (row,) = lakehouse.read_table(spark, config, "job_runs").collect()
    assert row["rows_skipped"] == 1 and row["stage"] == "duplicates"


def test_a_rerun_with_nothing_new_runs_no_job_nor_commit_and_reports_the_same_and_a_new_image_is_searched(
        spark, tmp_path):
    from imageiq_spark.lake import stage_state

    config = make_config(tmp_path)
    copies = variants(photo(4))
    contents = {"photo/original": images.jpeg(photo(4), quality=95), "photo/resized": copies["resized"]}
    ingest.ensure_tables(spark, config)
    lakehouse.merge_new_rows(config, "images", image_rows(spark, contents), ["image_id"])
    first = duplicates.run(spark, config)
    versions = stage_state.table_versions(spark, config, duplicates.WATCHED)
    jobs = last_job(spark)

    again = duplicates.run(spark, config)

    assert last_job(spark) == jobs
    assert stage_state.table_versions(spark, config, duplicates.WATCHED) == versions
    assert (first.hashed, first.new_pairs, again.hashed, again.new_pairs) == (2, 1, 0, 0)
    assert (again.pairs, again.clusters, again.clustered_images) == ({"phash": 1}, 1, 2)
    assert again.counts() == runs.RunCounts(read=0, written=0, quarantined=0, skipped=0)
    assert [line for line in again.lines() if not line.startswith(("hashed", "new pairs", "elapsed"))] == [
        line for line in first.lines() if not line.startswith(("hashed", "new pairs", "elapsed"))]
    assert next(line for line in again.lines() if line.startswith("elapsed")).endswith(", nothing to work on")
    assert next(line for line in first.lines() if line.startswith("elapsed")).endswith(" s after the last")

    lakehouse.merge_new_rows(config, "images", image_rows(spark, {"photo/jpeg60": copies["jpeg60"]}),
                             ["image_id"])
    more = duplicates.run(spark, config)

    # The new copy pairs with the original at least; the resized copy may be further than K bits.
    assert more.hashed == 1 and more.new_pairs >= 1 and more.pairs == {"phash": 1 + more.new_pairs}
    assert (more.clusters, more.clustered_images) == (1, 3)


def last_job(spark) -> int:
    return max(spark.sparkContext.statusTracker().getJobIdsForGroup(None) or [-1])
