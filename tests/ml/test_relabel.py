"""Relabelling: a file moved to another label folder, or a changed manifest label, gives the image a
new label version in `image_labels`, the new label in `images`, in its `prepared` rows and in its
predictions."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_config
from images import halves, png, quadrants
from pyspark.sql import functions as F

from imageiq_spark.lake import lakehouse
from imageiq_spark.stages import ingest, preprocess, score

FILES = {"cat/one.png": png(quadrants(20, 30)), "cat/two.png": png(halves(20, 30)),
         "dog/three.png": png(quadrants(24, 24))}


def write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def image_id(name: str) -> str:
    import hashlib

    return hashlib.sha256(FILES[name]).hexdigest()


def history(spark, config, image: str) -> list[tuple]:
    rows = (lakehouse.read_table(spark, config, "image_labels").where(F.col("image_id") == image)
            .orderBy("label_version").collect())
    return [(r.label_version, r.label, r.source, Path(r.path).name) for r in rows]


def labels_of(spark, config, table: str, image: str) -> list[tuple]:
    columns = ["label", "label_index"] if table == "prepared" else ["label"]
    return [tuple(r) for r in lakehouse.read_table(spark, config, table)
            .where(F.col("image_id") == image).select(*columns).collect()]


def write_predictions(spark, config) -> None:
    """Predictions of two model versions for every image, with the image's label as score writes it."""
    now = datetime.datetime.now()
    rows = [(image_id(name), "cat", 0.9, [("cat", 0.9)], "m", version, None, now, now.date(),
             name.split("/")[0]) for name in FILES for version in ("1", "2")]
    lakehouse.ensure_table(spark, config, "predictions", score.PREDICTIONS_SCHEMA)
    lakehouse.merge_new_rows(config, "predictions", spark.createDataFrame(rows, score.PREDICTIONS_SCHEMA),
                             score.PREDICTION_KEYS)


def test_a_file_moved_to_another_label_folder_relabels_the_image_and_its_prepared_rows(spark, tmp_path):
    source = tmp_path / "source"
    write(source, FILES)
    config = make_config(tmp_path, ingest={"source": str(source)})
    ingest.run(spark, config)
    preprocess.run(spark, config)
    moved = image_id("cat/one.png")
    write_predictions(spark, config)

    (source / "dog").mkdir(exist_ok=True)
    shutil.move(source / "cat" / "one.png", source / "dog" / "one.png")
    summary = ingest.run(spark, config)
    again = ingest.run(spark, config)

    vocabulary = preprocess.read_label_vocabulary(spark, config)
    assert (summary.new_images, summary.relabelled, again.relabelled) == (0, 1, 0)
    assert labels_of(spark, config, "images", moved) == [("dog",)]
    assert history(spark, config, moved) == [(1, "cat", "ingest", "one.png"), (2, "dog", "folder", "one.png")]
    assert labels_of(spark, config, "prepared", moved) == [("dog", vocabulary.index("dog"))]
    assert labels_of(spark, config, "predictions", moved) == [("dog",), ("dog",)]  # both model versions
    # The other images keep their labels and no history.
    assert labels_of(spark, config, "images", image_id("cat/two.png")) == [("cat",)]
    assert labels_of(spark, config, "predictions", image_id("cat/two.png")) == [("cat",), ("cat",)]
    assert history(spark, config, image_id("cat/two.png")) == []


@pytest.mark.slow
def test_a_changed_manifest_label_relabels_the_image_once(spark, tmp_path):
    source = tmp_path / "source"
    write(source, FILES)
    manifest = tmp_path / "labels.csv"
    pd.DataFrame({"path": list(FILES), "label": ["cat", "cat", "dog"]}).to_csv(manifest, index=False)
    config = make_config(tmp_path, ingest={"source": str(source), "labels": str(manifest)})
    ingest.run(spark, config)
    preprocess.run(spark, config)

    pd.DataFrame({"path": list(FILES), "label": ["cat", "bird", "dog"]}).to_csv(manifest, index=False)
    summary = ingest.run(spark, config)
    again = ingest.run(spark, config)

    changed = image_id("cat/two.png")
    vocabulary = preprocess.read_label_vocabulary(spark, config)
    assert (summary.relabelled, again.relabelled) == (1, 0)
    assert labels_of(spark, config, "images", changed) == [("bird",)]
    assert history(spark, config, changed) == [(1, "cat", "ingest", "two.png"),
                                               (2, "bird", str(manifest), "two.png")]
    assert vocabulary == ["cat", "dog", "bird"]  # a new label is appended, indices never move
    assert labels_of(spark, config, "prepared", changed) == [("bird", 2)]
