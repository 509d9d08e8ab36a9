"""Bounded memory: peak RSS of the Python workers and the JVM for ingest + preprocess over 2,000
and 20,000 camera-like 500x375 JPEGs, against a bare Python process holding the same libraries.

Each stage runs as the real CLI in its own process; a sampler walks that process tree every
50 ms with psutil and keeps the peaks of: each Python worker (`pyspark.daemon` and the workers it
forks), all Python workers together, and the JVM (the driver's executor in `local[2]`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from benchmarks.bench_preprocess import image_set
from benchmarks.common import BENCH_SPARK_CONF, median, table

SIZES = (2_000, 20_000)
#: Runs per size: the 20,000-image pipeline takes about ten minutes on 2 cores, so it runs once.
REPEATS = {2_000: 3, 20_000: 1}
STORED = (375, 500)  # height, width of the JPEGs
LABELS = 10
MIB = 1024 * 1024
# What a Python worker imports to probe and preprocess: its floor, whatever the data.
BARE_WORKER = (
    "import pyspark.daemon, pandas, pyarrow, numpy, cv2, os, psutil; "
    "print(psutil.Process(os.getpid()).memory_info().rss)"
)


def write_images(dest: Path, count: int) -> int:
    """`count` distinct 500x375 JPEGs (the preprocess benchmark's photos) in <label>/ folders; their
    bytes in all."""
    total = 0
    for i, data in enumerate(image_set(count, STORED)):
        folder = dest / f"class{i % LABELS}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def is_python_worker(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "pyspark.daemon" in cmdline or "pyspark.worker" in cmdline


def run_sampled(command: list[str], cwd: Path) -> dict[str, float]:
    """Run `command`, sampling its process tree; peaks in MiB."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peaks = {"worker": 0.0, "workers": 0.0, "jvm": 0.0, "driver": 0.0}
    while proc.poll() is None:
        try:
            children = root.children(recursive=True)
            peaks["driver"] = max(peaks["driver"], root.memory_info().rss / MIB)
        except psutil.Error:
            break
        workers = 0.0
        for child in children:
            try:
                rss = child.memory_info().rss / MIB
                if child.name() == "java":
                    peaks["jvm"] = max(peaks["jvm"], rss)
                elif is_python_worker(child):
                    peaks["worker"] = max(peaks["worker"], rss)
                    workers += rss
            except psutil.Error:
                continue
        peaks["workers"] = max(peaks["workers"], workers)
        time.sleep(0.05)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    return peaks


def pipeline_peaks(workdir: Path, source: Path, tag: str) -> dict[str, float]:
    """Ingest then preprocess `source` into a fresh lakehouse; the peak of both stages."""
    lake = workdir / f"lake_{tag}"
    shutil.rmtree(lake, ignore_errors=True)
    conf = workdir / f"{tag}.yaml"
    conf.write_text(yaml.safe_dump({
        "storage": {"root": str(lake)},
        "ingest": {"source": str(source)},
        "spark_conf": dict(BENCH_SPARK_CONF),
    }))
    peaks: dict[str, float] = {}
    for stage in ("ingest", "preprocess"):
        command = [sys.executable, "-m", "imageiq_spark", "--conf", str(conf), stage]
        stage_peaks = run_sampled(command, workdir)
        peaks = {k: max(v, peaks.get(k, 0.0)) for k, v in stage_peaks.items()}
    shutil.rmtree(lake, ignore_errors=True)
    return peaks


def run(workdir: Path) -> str:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    bare = [
        int(subprocess.run([sys.executable, "-c", BARE_WORKER], capture_output=True, text=True,
                           check=True).stdout) / MIB
        for _ in range(3)
    ]
    results: dict[int, list[dict[str, float]]] = {}
    for size in SIZES:
        source = workdir / f"images_{size}"
        mean_kb = write_images(source, size) / size / 1000
        results[size] = [pipeline_peaks(workdir, source, f"{size}_{r}") for r in range(REPEATS[size])]
        shutil.rmtree(source)

    def med(size: int, key: str) -> float:
        return median([r[key] for r in results[size]])

    base = median(bare)
    small, large = SIZES
    rows = [["bare Python process with the worker's libraries", "-", base, "-", "-", "-", 1.0]]
    for size in SIZES:
        rows.append([f"ingest + preprocess, {size:,} images", size, med(size, "worker"),
                     med(size, "workers"), med(size, "jvm"), med(size, "driver"),
                     med(size, "worker") / base])
    growth = [[key, med(small, key), med(large, key), med(large, key) / med(small, key)]
              for key in ("worker", "workers", "jvm", "driver")]
    return f"""## Memory

Peak resident memory (MiB) of the processes of `imageiq ingest` then `imageiq preprocess`
(separate CLI processes, `local[2]`, default batch sizes: Arrow batches of
`spark.sql.execution.arrow.maxRecordsPerBatch` = 1,024 rows, `preprocess.batch_rows`),
distinct 500x375 camera-like JPEGs ({mean_kb:.0f} KB each on average; the preprocess
benchmark's photos) in {LABELS} label folders, each run into a fresh lakehouse, median of
{REPEATS[small]} runs at {small:,} images and {REPEATS[large]} at {large:,}, sampled every 50 ms
with psutil. "worker" is the largest single Python worker, "workers" all of them at once.

{table(["run", "images", "worker peak", "workers peak", "JVM peak", "driver Python peak",
        "worker / bare"], rows)}

Growth from {small:,} to {large:,} images ({large // small}x the images):

{table(["process", f"{small:,} images", f"{large:,} images", "ratio"], growth)}

A Python worker holds one Arrow batch at a time, so its peak is set by the batch size and the
libraries it imports (the bare row), not by the number of images; the JVM's heap is capped by
`spark.driver.memory` and grows towards it lazily, so its RSS says how much of the cap the
collector chose to use rather than what the job needs.
"""

