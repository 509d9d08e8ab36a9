"""`imageiq run-all` in the production topology against the embedded default, on the same files.

Three runs of the CLI, each on a fresh lake: `local[2]` with the lake on local disk and MLflow on
SQLite (the baseline); `local[2]` with the lake in S3 (moto's server on 127.0.0.1) and MLflow as a
tracking server whose artifacts live in that S3; and the same on `local-cluster[2,1,1024]`, two
executor JVMs beside the driver. Per-stage seconds come from each stage's own summary line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3

from benchmarks.bench_serve import free_port
from benchmarks.common import median, table
from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.lake.session import local_cluster_home

IMAGES_PER_CLASS = 6  # 60 digits: the data set of tests/test_cluster.py
REPEATS = int(os.environ.get("BENCH_CLUSTER_REPEATS", "2"))  # each repeat is ~20 minutes here
BUCKET = "imageiq-bench"
KEY, SECRET, REGION = "AKIDBENCH", "bench-secret", "us-east-1"
LOCAL_CLUSTER = "local-cluster[2,1,1024]"


def wait_for(url: str, process: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} ended with exit code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within 120 s")


def stage_seconds(stdout: str) -> dict[str, float]:
    """{stage: seconds} from the summaries `== stage` ... `elapsed: 12.3 s` run-all prints."""
    found, stage = {}, None
    for line in stdout.splitlines():
        if line.startswith("== "):
            stage = line[3:].strip()
        match = re.match(r"elapsed:\s+([\d.]+) s", line)
        if stage and match:
            found[stage] = float(match.group(1))
    return found


#: The settings of every run: two epochs of the default CNN on the Arrow reader, small Spark.
COMMON = {"train.reader": "arrow", "train.epochs": 2, "train.batch_size": 16,
          "spark_conf.spark.ui.enabled": "false", "spark_conf.spark.sql.shuffle.partitions": 2,
          "spark_conf.spark.default.parallelism": 2}


def run_all(settings: dict[str, object], env: dict[str, str], source: str, cwd: Path,
            python: str = sys.executable) -> dict[str, float]:
    """{stage: summary seconds, "whole command": wall seconds} of one `run-all` process."""
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run([python, "-m", "imageiq_spark", *sets, "run-all", "--source", source],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"run-all failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {**stage_seconds(done.stdout), "whole command": seconds}


def run(workdir: Path) -> str:
    shutil.rmtree(workdir, ignore_errors=True)
    images = workdir / "images"
    write_sample_data(images, per_class=IMAGES_PER_CLASS)
    s3_port, mlflow_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    aws = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION,
           "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL_S3": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    env = {**os.environ, **aws}
    bin_dir = Path(sys.executable).parent
    logs = (workdir / "servers.log").open("w")
    moto = subprocess.Popen([str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                            env=env, stdout=logs, stderr=subprocess.STDOUT)
    tracking = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
        env=env, stdout=logs, stderr=subprocess.STDOUT)
    try:
        wait_for(endpoint, moto)
        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                              aws_access_key_id=KEY, aws_secret_access_key=SECRET)
        client.create_bucket(Bucket=BUCKET)
        for path in sorted(images.rglob("*.png")):
            client.upload_file(str(path), BUCKET, f"incoming/{path.relative_to(images).as_posix()}")
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", tracking)
        remote = {"mlflow.tracking_uri": f"http://127.0.0.1:{mlflow_port}"}
        layouts = {
            "local[2], lake on local disk, MLflow on SQLite": (
                {"spark_conf.spark.master": "local[2]"}, str(images), env),
            "local[2], lake on S3, MLflow server": (
                {"spark_conf.spark.master": "local[2]", **remote}, f"s3a://{BUCKET}/incoming", env),
            f"{LOCAL_CLUSTER}, lake on S3, MLflow server": (
                {"spark_conf.spark.master": LOCAL_CLUSTER, **remote}, f"s3a://{BUCKET}/incoming",
                {**env, "SPARK_HOME": str(local_cluster_home(workdir / "spark_home"))}),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
        for repeat in range(REPEATS):
            for index, (name, (settings, source, layout_env)) in enumerate(layouts.items()):
                lake = (str(workdir / f"lake-{index}-{repeat}") if "local disk" in name
                        else f"s3a://{BUCKET}/lake-{index}-{repeat}")
                # A registered model of its own per run: train must not skip as "nothing changed".
                run_settings = {**COMMON, **settings, "storage.root": lake,
                                "mlflow.registered_model": f"bench_{index}_{repeat}"}
                cwd = workdir / f"cwd-{index}-{repeat}"
                results[name].append(run_all(run_settings, layout_env, source, cwd))
    finally:
        for process in (tracking, moto):
            process.terminate()
            process.wait(timeout=30)
        logs.close()

    names = list(layouts)
    stages = list(results[names[0]][0])
    rows = []
    for stage in stages:
        medians = [median([r.get(stage, float("nan")) for r in results[name]]) for name in names]
        rows.append([stage, *medians, *(m / medians[0] for m in medians[1:])])
    n = 10 * IMAGES_PER_CLASS
    runs = f"median of {REPEATS} runs" if REPEATS > 1 else "one run per topology"
    return (
        f"## Cluster topology: `run-all` on {n} images\n\n"
        f"Seconds per stage ({runs}, each on a fresh lake), and the ratio to the local "
        "default. `train` is 2 epochs of the small CNN with `train.reader: arrow`.\n\n"
        + table(["stage", *(f"{name} (s)" for name in names), "S3 + server / local",
                 "cluster + S3 + server / local"], rows) + "\n"
    )
