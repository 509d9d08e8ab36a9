"""One build's side of `python -m benchmarks.ab score-job`: score's whole job (PNG bytes ->
prediction rows, `score_contents`) on 8,192 random 32x32 images with the small CNN, as
bench_score's `ours_job` runs it, after one warm-up; prints {"seconds": [...]} as JSON.

Run by path with the build's checkout first on PYTHONPATH, so `imageiq_spark` is the build's;
it knows the package before and after the layout of issue 36 (2a055e6 and later)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.common import bench_config  # noqa: E402

try:  # the layered package
    from imageiq_spark.lake import lakehouse
    from imageiq_spark.lake.session import get_spark, session_conf
    from imageiq_spark.ml import inference as scoring
    from imageiq_spark.ml.classifier import ImageClassifier
    from imageiq_spark.ml.models import ModelSpec, build_model
    from imageiq_spark.vision.spec import TransformSpec
    from tests.reference import DirectoryLoader
except ImportError:  # the flat package before issue 36
    from imageiq_spark.classifier import ImageClassifier
    from imageiq_spark.models import ModelSpec, build_model
    from imageiq_spark.session import get_spark, session_conf
    from imageiq_spark.transform import TransformSpec

    from imageiq_spark import lakehouse
    from imageiq_spark import score as scoring

    DirectoryLoader = scoring.DirectoryLoader

IMAGES, SIDE = 8192, 32


def main(workdir: Path, repeats: int) -> None:
    spark = get_spark(bench_config(workdir / "lake"), app_name="ab-score-job")
    spec = ModelSpec("small_cnn", SIDE, SIDE, 3, 10, (127.5,) * 3, (64.0,) * 3)
    ImageClassifier(build_model(spec), [str(i) for i in range(10)],
                    TransformSpec(size=(SIDE, SIDE))).save(workdir / "classifier")
    x = np.random.default_rng(0).integers(0, 256, (IMAGES, SIDE, SIDE, 3), dtype=np.uint8)
    rows = pd.DataFrame({"image_id": [f"{i:08d}" for i in range(IMAGES)],
                         "content": [cv2.imencode(".png", image)[1].tobytes() for image in x]})
    pngs = str(workdir / "pngs")
    with session_conf(spark, lakehouse.ROW_GROUP_SETTINGS):
        spark.createDataFrame(rows).write.format("delta").save(pngs)
    loader = DirectoryLoader(str(workdir / "classifier"), key=f"ab-{time.time()}")

    def job() -> None:
        scored = scoring.score_contents(spark.read.format("delta").load(pngs), loader, 3)
        scored.write.mode("overwrite").parquet(str(workdir / "out"))

    job()  # warm-up: workers start, import TensorFlow and load the model once
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        job()
        seconds.append(time.perf_counter() - started)
    spark.stop()
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
