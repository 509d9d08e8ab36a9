"""Ingest: images in folders -> `images` (one row per content) and `quarantine`, incrementally."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import image_files
import pandas as pd
import pytest
from conftest import make_config
from images import bmp, camera_scene, gray_png, jpeg, png, quadrants
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from imageiq_spark.core.config import ConfigError
from imageiq_spark.core.tables import IMAGES_SCHEMA, QUARANTINE_SCHEMA
from imageiq_spark.lake import lakehouse
from imageiq_spark.stages import ingest
from imageiq_spark.vision.probe import TOO_MANY_PIXELS, ProbeError, probe


def write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def images(spark, config):
    return lakehouse.read_table(spark, config, "images")


def quarantine(spark, config):
    return lakehouse.read_table(spark, config, "quarantine")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    return folder


UPRIGHT = jpeg(quadrants(26, 32))
DUPLICATE = png(quadrants(20, 30))
BROKEN = {
    "empty.png": b"",
    "text.png": b"this is not an image at all",
    "bad_crc.png": image_files.png_bad_crc(),
    "cut.jpg": image_files.jpeg_truncated(),
    "huge_header.png": image_files.png_header_only(20_000, 20_000),
    "big_file.jpg": jpeg(camera_scene(200, 200)),  # ~12 kB > max_bytes
}


@pytest.fixture(scope="module")
def mixed(spark, tmp_path_factory):
    """One ingest of a folder holding every odd-but-good format, every kind of broken file and a
    duplicate; the tests below each check one behaviour of its outcome."""
    root = tmp_path_factory.mktemp("mixed")
    source = root / "source"
    write(
        source, {f"cats/nested/deeper/{name}": make() for name, (make, *_) in image_files.GOOD_FILES.items()}
    )
    write(source, {f"broken/{name}": data for name, data in BROKEN.items()})
    write(source, {"x/upright.jpg": UPRIGHT, "b/copy.png": DUPLICATE, "a/original.png": DUPLICATE})
    config = make_config(root, ingest={"source": str(source), "max_pixels": 10_000_000, "max_bytes": 10_000})
    summary = ingest.run(spark, config)
    return config, summary


def names_of(df):
    return df.selectExpr(
        "element_at(split(path, '/'), -2) AS folder", "element_at(split(path, '/'), -1) AS name"
    )


def test_odd_but_good_formats_are_ingested_with_their_probed_layout(spark, mixed):
    config, _ = mixed
    expected = [
        Row(name=name, label="deeper", format=fmt, width=w, height=h, channels=c, bit_depth=b)
        for name, (_make, fmt, w, h, c, b) in image_files.GOOD_FILES.items()
    ]

    actual = (
        images(spark, config)
        .filter("label = 'deeper'")
        .selectExpr(
            "element_at(split(path, '/'), -1) AS name",
            "label",
            "format",
            "width",
            "height",
            "channels",
            "bit_depth",
        )
    )

    assertDataFrameEqual(actual, expected)


def test_image_id_is_the_sha256_of_the_bytes_and_content_is_kept(spark, mixed):
    config, _ = mixed

    row = images(spark, config).filter(F.col("path").endswith("/x/upright.jpg")).first()

    assert row.image_id == hashlib.sha256(UPRIGHT).hexdigest()
    assert bytes(row.content) == UPRIGHT
    assert (row.size_bytes, row.label) == (len(UPRIGHT), "x")


def test_exif_orientation_is_recorded(spark, mixed):
    config, _ = mixed

    rows = images(spark, config).filter(F.col("path").rlike("/(rotated|upright)\\.jpg$"))

    assertDataFrameEqual(
        rows.selectExpr("element_at(split(path, '/'), -1) AS name", "orientation"),
        [Row(name="rotated.jpg", orientation=6), Row(name="upright.jpg", orientation=1)],
    )


def test_tables_have_their_declared_column_types_and_nullability(spark, mixed):
    config, _ = mixed
    assert images(spark, config).schema == IMAGES_SCHEMA
    assert quarantine(spark, config).schema == QUARANTINE_SCHEMA


def test_each_broken_file_is_quarantined_with_its_reason(spark, mixed):
    config, _ = mixed

    reasons = quarantine(spark, config).selectExpr(
        "element_at(split(path, '/'), -1) AS name", "reason", "stage", "size_bytes"
    )

    assertDataFrameEqual(
        reasons,
        [
            Row(name="empty.png", reason="empty", stage="ingest", size_bytes=0),
            Row(name="text.png", reason="not_image", stage="ingest", size_bytes=len(BROKEN["text.png"])),
            Row(name="bad_crc.png", reason="corrupt", stage="ingest", size_bytes=len(BROKEN["bad_crc.png"])),
            Row(name="cut.jpg", reason="truncated", stage="ingest", size_bytes=len(BROKEN["cut.jpg"])),
            Row(
                name="huge_header.png",
                reason="too_many_pixels",
                stage="ingest",
                size_bytes=len(BROKEN["huge_header.png"]),
            ),
            Row(
                name="big_file.jpg",
                reason="too_large",
                stage="ingest",
                size_bytes=len(BROKEN["big_file.jpg"]),
            ),
        ],
    )


def test_quarantine_details_say_what_was_wrong(spark, mixed):
    config, _ = mixed

    details = dict(quarantine(spark, config).select("reason", "detail").collect())

    assert details["too_large"] == f"{len(BROKEN['big_file.jpg'])} bytes > ingest.max_bytes 10000"
    assert details["too_many_pixels"] == "20000x20000 = 400000000 pixels > 10000000"
    assert "fails its CRC" in details["corrupt"]
    assert details["empty"] == "file has 0 bytes"


def test_duplicate_content_is_one_image_whose_path_is_the_first(spark, mixed):
    config, _ = mixed

    rows = names_of(images(spark, config).filter(F.col("image_id") == hashlib.sha256(DUPLICATE).hexdigest()))

    assertDataFrameEqual(rows, [Row(folder="a", name="original.png")])


def test_the_summary_counts_every_file_once(mixed):
    _, summary = mixed
    good = len(image_files.GOOD_FILES) + 2  # + upright.jpg + original.png

    assert (summary.files_seen, summary.new_images, summary.duplicates) == (good + 1 + len(BROKEN), good, 1)
    assert dict(summary.quarantined) == {
        "empty": 1,
        "not_image": 1,
        "corrupt": 1,
        "truncated": 1,
        "too_many_pixels": 1,
        "too_large": 1,
    }
    assert summary.lines()[0] == f"files seen:   {good + 1 + len(BROKEN)}"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return image_files.png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_a_30000_square_png_bomb_is_rejected_from_its_header_in_well_under_a_second(bomb):
    data = bomb.read_bytes()
    assert len(data) < 1_500_000  # about 1 MB on disk, 900 MB of pixels

    started = time.perf_counter()
    with pytest.raises(ProbeError) as error:
        probe(data, max_pixels=100_000_000)
    elapsed = time.perf_counter() - started

    assert error.value.reason == TOO_MANY_PIXELS
    assert "30000x30000" in error.value.detail
    assert elapsed < 0.5


def test_the_png_bomb_lands_in_quarantine_during_ingest(spark, tmp_path, source, bomb):
    shutil.copy(bomb, source / "bomb.png")
    config = make_config(tmp_path, ingest={"source": str(source)})

    ingest.run(spark, config)

    assert [(r.reason, r.size_bytes < 1_500_000) for r in quarantine(spark, config).collect()] == [
        ("too_many_pixels", True)
    ]


def test_a_rerun_adds_nothing_and_new_files_add_exactly_themselves(spark, tmp_path, source):
    write(source, {f"{i % 2}/img_{i}.png": image_files.distinct_png(i) for i in range(6)})
    config = make_config(tmp_path, ingest={"source": str(source)})
    ingest.run(spark, config)
    before = images(spark, config).count()

    again = ingest.run(spark, config)
    assert (again.files_seen, again.new_images, images(spark, config).count()) == (0, 0, before)

    write(source, {f"new/img_{i}.png": image_files.distinct_png(20 + i) for i in range(10)})
    write(source, {"new/copy_of_img_0.png": image_files.distinct_png(0)})
    more = ingest.run(spark, config)

    assert (more.files_seen, more.new_images, more.duplicates) == (11, 10, 1)
    new_rows = images(spark, config).filter("label = 'new'").select("path").collect()
    assert sorted(r.path.rsplit("/", 1)[-1] for r in new_rows) == sorted(f"img_{i}.png" for i in range(10))


@pytest.mark.parametrize("manifest_format", ["csv", "parquet"])
def test_labels_come_from_a_manifest(spark, tmp_path, source, manifest_format):
    write(
        source,
        {
            "flat/one.png": gray_png(quadrants(20, 30)[:, :, 0]),
            "flat/two.jpg": jpeg(quadrants(24, 32)),
            "flat/three.bmp": bmp(quadrants(20, 30)),
        },
    )
    manifest = pd.DataFrame(
        {"path": ["flat/one.png", str(source / "flat" / "two.jpg")], "label": ["cat", "dog"]}
    )
    manifest_path = tmp_path / f"labels.{manifest_format}"
    if manifest_format == "csv":
        manifest.to_csv(manifest_path, index=False)
    else:
        manifest.to_parquet(manifest_path)
    config = make_config(tmp_path, ingest={"source": str(source), "labels": str(manifest_path)})

    ingest.run(spark, config)

    rows = images(spark, config).selectExpr("element_at(split(path, '/'), -1) AS name", "label")
    assertDataFrameEqual(
        rows,
        [
            Row(name="one.png", label="cat"),
            Row(name="two.jpg", label="dog"),
            Row(name="three.bmp", label=None),
        ],
    )


def test_labels_none_leaves_every_image_unlabelled(spark, tmp_path, source):
    write(source, {"cats/one.png": gray_png(quadrants(20, 30)[:, :, 0])})
    config = make_config(tmp_path, ingest={"source": str(source), "labels": "none"})

    ingest.run(spark, config)

    assert [r.label for r in images(spark, config).collect()] == [None]


def test_a_manifest_without_a_label_column_is_a_config_error(spark, tmp_path, source):
    write(source, {"a/one.png": gray_png(quadrants(20, 30)[:, :, 0])})
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\na/one.png,cat\n")
    config = make_config(tmp_path, ingest={"source": str(source), "labels": str(bad)})

    with pytest.raises(ConfigError, match=r"ingest.labels.*lacks column\(s\) \['label'\]"):
        ingest.run(spark, config)


def test_ingest_without_a_source_is_a_config_error(spark, config):
    with pytest.raises(ConfigError, match="'ingest.source' is required"):
        ingest.run(spark, config)


def test_extension_glob_matches_any_case():
    assert ingest.extension_glob(["jpg", "png"]) == "*.{[jJ][pP][gG],[pP][nN][gG]}"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imageiq_spark", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "ingest.max_pixels=many", "ingest"], "'ingest.max_pixels' expects an integer, got 'many'"),
        (["--set", "ingest.colour=red", "ingest"], "unknown config key 'ingest.colour'"),
        (
            ["--set", "preprocess.resize=squash", "ingest"],
            "'preprocess.resize' expects one of 'stretch', 'letterbox', 'center_crop', got 'squash'",
        ),
        (["--conf", "missing.yaml", "ingest"], "--conf: file 'missing.yaml' does not exist"),
        (["--set", "noequals", "ingest"], "--set expects KEY=VALUE"),
        (["ingest", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_config_and_argument_errors_exit_2_naming_the_key(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)

    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
