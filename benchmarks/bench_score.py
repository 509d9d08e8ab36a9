"""Scoring throughput: our inference path against the machine's ceiling (the same compiled forward
pass in one process on all cores, uint8 arrays in memory), bare `model.predict`, `predict_batch_udf`
and `mlflow.pyfunc.spark_udf`, same model, batch size, tensors and cores, in one run.

"Ours, inference part" reads prepared uint8 tensors from a Delta table and writes prediction
rows (label, confidence, top-k) to Parquet; the stock paths read the same tensors as float
arrays (what they take: Spark has no unsigned byte type) and write their probabilities, with
their best settings: one TensorFlow thread per task, as ours. The bare rows run on the tensors
already in memory in the driver, TensorFlow on all cores. "Ours, whole job" starts from PNG
bytes (decode, preprocess, predict). Models have random weights: only speed is measured.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import cv2  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from pyspark.ml.functions import predict_batch_udf  # noqa: E402
from pyspark.sql.types import ArrayType, FloatType  # noqa: E402

from benchmarks.common import bench_config, median, table, timed  # noqa: E402
from imageiq_spark.lake import lakehouse  # noqa: E402
from imageiq_spark.lake.session import get_spark, session_conf, spread  # noqa: E402
from imageiq_spark.ml import inference  # noqa: E402
from imageiq_spark.ml.classifier import ImageClassifier  # noqa: E402
from imageiq_spark.ml.models import ModelSpec, build_model  # noqa: E402
from imageiq_spark.vision.spec import TransformSpec  # noqa: E402
from imageiq_spark.vision.transform import prepare_batch  # noqa: E402
from tests.reference import DirectoryLoader  # noqa: E402

CASES = (  # architecture, side, images, batch
    ("small_cnn", 32, 8192, 256),
    ("mobilenet_v2", 224, 512, 64),
)
REPEATS = 3


class KerasArrays(mlflow.pyfunc.PythonModel):
    """The stock pyfunc: a Keras model over a column of flat float arrays."""

    def load_context(self, context: Any) -> None:
        import tf_keras as keras

        one_thread_per_task()
        self.model = keras.models.load_model(context.artifacts["model"], compile=False)
        self.batch = int(context.model_config["batch"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> Any:
        x = np.stack(model_input.iloc[:, 0].to_numpy()).reshape(-1, *self.model.input_shape[1:])
        return self.model.predict(x, batch_size=self.batch, verbose=0)


def score_tensors(df: Any, loader: inference.ModelLoader, shape: tuple[int, int, int], top_k: int) -> Any:
    """(image_id, tensor) rows of prepared uint8 tensors -> SCORED_SCHEMA rows: score's runner and
    head without the decoding, the inference part alone."""
    threads = inference.task_threads(df.sparkSession)
    scorer = inference.ModelBatches(loader, inference.Predictions(top_k), threads, tuple(shape))
    return spread(df.select("image_id", "tensor")).mapInArrow(scorer, inference.SCORED_SCHEMA)


def one_thread_per_task() -> None:
    """The stock workers' best setting on local[cores]: one TensorFlow thread per task, as ours, so
    the workers do not oversubscribe the cores (a no-op where TensorFlow already started)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # this worker ran TensorFlow before: its threads are already fixed
        pass


def make_predict_fn(path: str, batch: int):
    def make():
        import tf_keras as keras

        one_thread_per_task()

        model = keras.models.load_model(path, compile=False)
        return lambda x: model.predict(x, batch_size=batch, verbose=0)

    return make


def run_case(spark: Any, workdir: Path, arch: str, side: int, n: int, batch: int) -> dict[str, Any]:
    spec = ModelSpec(arch, side, side, 3, 10, (127.5,) * 3, (64.0,) * 3)
    model = build_model(spec)
    classifier = ImageClassifier(model, [str(i) for i in range(10)], TransformSpec(size=(side, side)))
    directory = workdir / arch / "classifier"
    classifier.save(directory)
    keras_file = str(directory / "model.keras")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    ids = [f"{i:08d}" for i in range(n)]

    tensors_path = str(workdir / arch / "tensors")
    floats_path = str(workdir / arch / "floats")
    pngs_path = str(workdir / arch / "pngs")
    pngs = [cv2.imencode(".png", image)[1].tobytes() for image in x]
    pd_tensors = pd.DataFrame({"image_id": ids, "tensor": [image.tobytes() for image in x]})
    floats = pd.DataFrame({"image_id": ids, "x": list(x.reshape(n, -1).astype(np.float32))})
    # Written as ingest and preprocess write `images` and `prepared`: 8 MB row groups.
    with session_conf(spark, lakehouse.ROW_GROUP_SETTINGS):
        spark.createDataFrame(pd_tensors).write.format("delta").mode("overwrite").save(tensors_path)
        spark.createDataFrame(pd.DataFrame({"image_id": ids, "content": pngs})).write.format(
            "delta").mode("overwrite").save(pngs_path)
        spark.createDataFrame(floats, "image_id string, x array<float>").write.format("delta").mode(
            "overwrite").save(floats_path)
    del floats, pd_tensors
    out = str(workdir / arch / "out")

    def write(df: Any) -> None:
        df.write.mode("overwrite").parquet(out)

    loader = DirectoryLoader(str(directory), key=f"bench-{arch}-{time.time()}")

    def ours() -> None:
        write(score_tensors(spark.read.format("delta").load(tensors_path), loader, (side, side, 3), 3))

    def count_rows(batches: Any) -> Any:  # a closure: pickled by value, the workers import nothing
        import pyarrow as pa

        for batch in batches:
            yield pa.RecordBatch.from_pydict({"rows": [batch.num_rows]})

    def moved() -> None:  # ours without the model: the scan and the Arrow trip to the workers
        write(spark.read.format("delta").load(tensors_path).select("image_id", "tensor")
              .mapInArrow(count_rows, "rows long"))

    def ours_job() -> None:
        write(inference.score_contents(spark.read.format("delta").load(pngs_path), loader, 3))

    stock_batch = predict_batch_udf(make_predict_fn(keras_file, batch), return_type=ArrayType(FloatType()),
                                    batch_size=batch, input_tensor_shapes=[[side, side, 3]])

    def batch_udf() -> None:
        df = spark.read.format("delta").load(floats_path)
        write(df.select("image_id", stock_batch("x").alias("probs")))

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="m", python_model=KerasArrays(),
                                       artifacts={"model": keras_file}, model_config={"batch": batch})
    pyfunc = mlflow.pyfunc.spark_udf(spark, info.model_uri, result_type=ArrayType(FloatType()),
                                     env_manager="local")

    def spark_udf() -> None:
        df = spark.read.format("delta").load(floats_path)
        write(df.select("image_id", pyfunc("x").alias("probs")))

    def compiled() -> None:
        classifier.predict_tensors(x)

    def bare() -> None:
        model.predict(x, batch_size=batch, verbose=0)

    results: dict[str, Any] = {"arch": arch, "side": side, "n": n, "batch": batch}
    for name, action in (("compiled", compiled), ("bare", bare), ("ours", ours), ("moved", moved),
                         ("ours_job", ours_job),
                         ("predict_batch_udf", batch_udf), ("spark_udf", spark_udf)):
        action()  # warm-up: workers start, import TensorFlow and load the model once
        results[name] = median(timed(action, REPEATS))
    # Decoding + preprocessing alone, one process: its share of the whole job's core-seconds.
    started = time.perf_counter()
    prepare_batch(pngs, TransformSpec(size=(side, side)))
    results["decode_core_s"] = time.perf_counter() - started
    # Where the inference part's time goes, per batch, inside one worker-like process.
    started = time.perf_counter()
    probs = classifier.predict_tensors(x)
    results["predict_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(0, n, 1024):
        inference.predictions_batch(inference.pa.array(ids[i:i + 1024]), probs[i:i + 1024],
                                    classifier.labels, 3)
    results["rows_s"] = time.perf_counter() - started
    shutil.rmtree(workdir / arch, ignore_errors=True)
    return results


def run(workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    config = bench_config(workdir / "lake")
    spark = get_spark(config, app_name="bench-score")
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("bench-score")
    cores = spark.sparkContext.defaultParallelism
    rows = []
    notes = []
    for case in CASES:
        r = run_case(spark, workdir, *case)
        ceiling, bare = r["compiled"], r["bare"]
        label = f"{r['arch']} {r['side']}x{r['side']}, batch {r['batch']}, {r['n']} images"
        for key, name in (("compiled", "bare compiled forward pass (uint8 arrays in memory, all cores)"),
                          ("bare", "bare model.predict (float arrays in memory, all cores)"),
                          ("ours", "ours, inference part (Delta tensors -> prediction rows)"),
                          ("predict_batch_udf", "predict_batch_udf (float arrays)"),
                          ("spark_udf", "mlflow.pyfunc.spark_udf (float arrays)"),
                          ("ours_job", "ours, whole job (PNG bytes -> prediction rows)")):
            rows.append([label, name, round(r["n"] / r[key]), ceiling / r[key], bare / r[key]])
        share = r["decode_core_s"] / (r["ours_job"] * cores)
        notes.append(
            f"- {r['arch']}: in one process, `predict_tensors` on all {r['n']} tensors took "
            f"{r['predict_s']:.2f} s and building the Arrow prediction rows {r['rows_s']:.3f} s "
            f"({100 * r['rows_s'] / r['predict_s']:.1f}% of it); the same Spark job without the model "
            f"(scan, Arrow to the workers, a row count back) took {r['moved']:.2f} s of the inference "
            f"part's {r['ours']:.2f} s; decoding and preprocessing the PNGs "
            f"took {r['decode_core_s']:.2f} core-seconds, {100 * share:.0f}% of the whole job's "
            f"{cores} cores x {r['ours_job']:.2f} s."
        )
    return "\n".join([
        "## Score",
        "",
        f"local[{cores}], median of {REPEATS} runs after one warm-up each (workers keep the model "
        "loaded, as in a long job). The ceiling is the best this machine does: the same compiled "
        "forward pass ours runs (`ImageClassifier.predict_tensors`: the model called on uint8 chunks "
        "of 256), in one process, TensorFlow on all cores, on arrays already in memory. Ratios are "
        "throughput over the ceiling's and over stock `model.predict`'s, measured in the same run; "
        "the stock Spark paths run with one TensorFlow thread per task, their best setting here. "
        "Target (the product contract, DESIGN.md): inference part >= 0.9x bare `model.predict` on the "
        "same tensors; issue 16 asks the stricter 0.9x the ceiling.",
        "",
        table(["model, input", "path", "images/s", "ratio to ceiling", "ratio to model.predict"], rows),
        "",
        "Where the time goes:",
        "",
        *notes,
        "- Ours calls the model directly on 256-row chunks per Arrow batch (no `model.predict` "
        "per-call set-up), gets uint8 bytes through Arrow (4x fewer bytes than float32, viewed as "
        "NHWC without a copy), builds the output columns from numpy arrays (no per-row Python) and "
        "runs TensorFlow with one thread per task, so the two workers do not oversubscribe two cores. "
        "The stock paths ship float32 arrays through Arrow, convert them row by row to numpy, and "
        "run two TensorFlow processes that each start a thread pool per core.",
        "- The tables are written as ingest and preprocess write `images` and `prepared` (8 MB row "
        "groups), so a whole table splits evenly into one scan task per core and ours reads it without "
        "a shuffle (dealing the tensors round-robin first cost a sixth of the small CNN's time).",
        "- What remains between ours and ideal is the Spark job without the model (each model's first "
        "note: planning, task start, the Delta scan, the Arrow trip, the Parquet write), on the same two "
        "cores as the model; it matters most for the small CNN, where the model is cheap.",
        "",
    ])
