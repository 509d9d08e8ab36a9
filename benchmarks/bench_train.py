"""One training epoch fed by the Arrow reader, by Petastorm and from in-memory numpy arrays.

Same model (small CNN, 32x32x3, 10 classes), same rows, same batch and steps, one process; the
readers' Parquet caches are written before timing (that one-off cost is reported beside). The
epoch is timed with `model.fit(..., epochs=1)` after one warm-up epoch, median of 3. Petastorm
installs only beside pyarrow <= 14: where this venv lacks it, the same measurement also runs in
`make test-compat`'s Spark 3.5 venv (`.venv-compat-3.5`), which has it, and reports both stacks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

REPEATS = 3
BATCH = 64
ROOT = Path(__file__).resolve().parents[1]
COMPAT_PYTHON = ROOT / ".venv-compat-3.5" / "bin" / "python"


def _epoch(model, dataset, steps: int) -> float:
    started = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - started


def measure(workdir: Path) -> dict:
    """Epoch times per feed (median of REPEATS) and the readers' one-off cache writes."""
    import numpy as np
    import pyarrow
    import tensorflow as tf

    from imageiq_spark.cli.sample_data import load_digits
    from imageiq_spark.core.config import from_dict
    from imageiq_spark.lake.session import get_spark
    from imageiq_spark.ml import models, readers

    workdir.mkdir(parents=True, exist_ok=True)
    config = from_dict({"storage": {"root": str(workdir / "lake")},
                        "spark_conf": {"spark.master": "local[2]", "spark.ui.enabled": "false"}})
    spark = get_spark(config, app_name="bench_train")
    digits, labels = load_digits()
    images = np.repeat(digits[:, :, :, None], 3, axis=3)
    images = np.stack([np.pad(i, ((2, 2), (2, 2), (0, 0))) for i in images])  # 32x32x3 like prepared
    rows = [(bytearray(i.tobytes()), int(lab)) for i, lab in zip(images, labels)]
    frame = spark.createDataFrame(rows, "tensor binary, label_index int")
    shape = (32, 32, 3)
    steps = len(rows) // BATCH

    spec = models.ModelSpec("small_cnn", 32, 32, 3, 10, (33.0,) * 3, (78.0,) * 3)
    model = models.build_model(spec)
    models.compile_model(model, 1e-3)

    in_memory = (tf.data.Dataset.from_tensor_slices((images, labels.astype("int32")))
                 .repeat().shuffle(2048, seed=1).batch(BATCH).prefetch(tf.data.AUTOTUNE))
    kinds = ["arrow"] + (["petastorm"] if importlib.util.find_spec("petastorm") else [])
    times: dict[str, list[float]] = {"in-memory numpy": [], **{kind: [] for kind in kinds}}
    setup: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        datasets = {"in-memory numpy": in_memory}
        for kind in kinds:
            started = time.perf_counter()
            source = readers.materialize(frame, config, kind, shape, files=2)
            setup[kind] = time.perf_counter() - started
            stack.callback(readers.release, source)
            datasets[kind] = source.open(stack, BATCH, repeat=True, shuffle_buffer=2048, seed=1)
        for dataset in datasets.values():
            _epoch(model, dataset, steps)  # warm-up: graph tracing, reader start
        for _ in range(REPEATS):
            for name, dataset in datasets.items():
                times[name].append(_epoch(model, dataset, steps))
    spark.stop()
    stack_versions = (f"pyspark {spark.version}, pyarrow {pyarrow.__version__}, numpy {np.__version__}, "
                      f"TensorFlow {tf.__version__}")
    return {"rows": len(rows), "steps": steps, "stack": stack_versions,
            "epochs": {name: statistics.median(values) for name, values in times.items()},
            "setup": setup}


def compat_measure(workdir: Path) -> dict | None:
    """The same measurement in the Spark 3.5 venv, where Petastorm installs; None without it."""
    if importlib.util.find_spec("petastorm") or not COMPAT_PYTHON.exists():
        return None
    env = {**os.environ, "IMAGEIQ_JARS_DIR": str(ROOT / "jars" / "compat-3.5"),
           "PYSPARK_PYTHON": str(COMPAT_PYTHON), "PYSPARK_DRIVER_PYTHON": str(COMPAT_PYTHON)}
    done = subprocess.run([str(COMPAT_PYTHON), "-m", "benchmarks.bench_train", str(workdir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def table(result: dict) -> list[str]:
    epochs, base = result["epochs"], result["epochs"]["in-memory numpy"]
    lines = [f"{result['stack']}:", "",
             "| feed | epoch (s), median | time vs in-memory | speed vs Petastorm | cache write (s) |",
             "|---|---|---|---|---|"]
    for name, median in epochs.items():
        cache = f"{result['setup'][name]:.1f}" if name in result["setup"] else "-"
        # Speed relative to Petastorm: its epoch time over this feed's (>= 1.0: as fast or faster).
        petastorm = f"{epochs['petastorm'] / median:.2f}" if "petastorm" in epochs else "-"
        lines.append(f"| {name} | {median:.2f} | {median / base:.2f} | {petastorm} | {cache} |")
    return lines + [""]


def run(workdir: Path) -> str:
    result = measure(workdir / "current")
    compat = compat_measure(workdir / "compat")
    lines = [
        "## Training epoch: Arrow and Petastorm readers vs in-memory arrays",
        "",
        f"Small CNN, {result['rows']} rows of 32x32x3 uint8, batch {BATCH}, {result['steps']} steps, "
        f"local[2], median of {REPEATS} epochs after a warm-up epoch. Targets (DESIGN.md): the Arrow "
        "reader's epoch <= 1.1x the in-memory epoch, and as fast as Petastorm's or faster "
        "(speed vs Petastorm >= 1.0) where Petastorm installs (the Spark 3.5 / pyarrow 14 venv).",
        "",
        *table(result),
        *(table(compat) if compat else []),
        "Where the time goes: the readers decode uint8 bytes with `tf.io.decode_raw` on batches "
        "and prefetch, so the epoch is dominated by the model's own steps; the Parquet cache "
        "write (once per training run) is the readers' real extra cost.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    # The compat venv's half of the measurement: one JSON line on standard output.
    print(json.dumps(measure(Path(sys.argv[1]))))
