"""A multi-process Spark and an MLflow tracking server for the tests, both on 127.0.0.1.

`local-cluster[N,C,M]` runs a master, N workers and N executor JVMs beside the driver, with the pip
pyspark and nothing else (`session.local_cluster_home` gives it a Spark home of its own).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
MASTER_ENV = "IMAGEIQ_TEST_MASTER"
#: Two executor JVMs of one core and 1 GiB each.
LOCAL_CLUSTER = "local-cluster[2,1,1024]"
EXECUTOR_MAIN = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


def test_master() -> str:
    """The master the suite runs on: $IMAGEIQ_TEST_MASTER (`make test-cluster`), else local[2]."""
    return os.environ.get(MASTER_ENV) or "local[2]"


def executor_processes(driver_pid: int) -> list[psutil.Process]:
    """The executor JVMs started for the driver process `driver_pid` (its descendants)."""
    found = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            if EXECUTOR_MAIN in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # ended meanwhile
            continue
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, artifacts: str, env: dict[str, str]) -> Iterator[str]:
    """`mlflow server` with a SQLite backend under `folder`, proxying artifacts to `artifacts`
    (an s3:// URI: clients upload and download through the server, with no S3 keys of their own).
    Yields its http:// tracking URI."""
    port = free_port()
    log = (folder / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", artifacts],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n"
                                       + (folder / "mlflow-server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def wait_for_busy_executor(driver: subprocess.Popen, timeout: float) -> psutil.Process:
    """The first executor JVM seen running a Python worker, i.e. in the middle of a Python task."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise RuntimeError(f"the job ended (exit {driver.returncode}) before any executor was busy")
        for executor in executor_processes(driver.pid):
            try:
                workers = executor.children(recursive=True)
                if any("pyspark.daemon" in " ".join(w.cmdline()) for w in workers):
                    return executor
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise RuntimeError("no executor ran a Python task in time")
