"""The CLI in a process of its own, as users and schedulers run it: started, killed mid-run, or
run to its end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from imageiq_spark.core.config import Config, to_dict


def write_conf(config: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def start_cli(conf: Path, *command: str, cwd: Path) -> subprocess.Popen:
    """The CLI in its own process group, so the driver Python and its JVM die together."""
    return subprocess.Popen(
        [sys.executable, "-m", "imageiq_spark", "--conf", str(conf), *command],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL the driver's process group as soon as `ready()` holds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before the kill point:\n"
                        + proc.stderr.read()[-3000:])
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the kill point was never reached")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()


def run_cli(conf: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imageiq_spark", "--conf", str(conf), *command],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )
