"""A second driver for two-driver tests: the `imageiq` CLI in a process (and Spark session) of its
own that stops at one function until the test lets it go, so the test can place its own driver's
commit, or any other commit, exactly inside this driver's run.

    python tests/paused_driver.py MODULE:FUNCTION TABLE READY GO -- CLI ARGS...

Before the first call of MODULE.FUNCTION whose arguments include TABLE (`-`: any call) it creates
the file READY, then waits for the file GO.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
WAIT_S = 900


def pause_at(target: str, table: str, ready: Path, go: Path) -> None:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original: Callable[..., Any] = getattr(module, name)

    @functools.wraps(original)
    def paused(*args: Any, **kwargs: Any) -> Any:
        if table == "-" or any(isinstance(arg, str) and arg == table for arg in args):
            ready.touch()
            deadline = time.monotonic() + WAIT_S
            while not go.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"paused_driver: {go} never appeared")
                time.sleep(0.05)
        return original(*args, **kwargs)

    setattr(module, name, paused)


def start(conf: Path, command: str, target: str, table: str, ready: Path, go: Path,
          cwd: Path) -> subprocess.Popen:
    """The paused CLI `command` in its own process group (as `test_faults.start_cli`)."""
    return subprocess.Popen(
        [sys.executable, str(HERE), target, table, str(ready), str(go), "--", "--conf", str(conf), command],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for(path: Path, driver: subprocess.Popen, timeout: float = WAIT_S) -> None:
    """Until `path` exists; fails with the driver's stderr if it ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended (exit {driver.returncode}) before {path.name}:\n"
                                 + driver.stderr.read()[-3000:])
        if time.monotonic() > deadline:
            driver.kill()
            raise AssertionError(f"{path.name} never appeared")
        time.sleep(0.1)


if __name__ == "__main__":
    target_, table_, ready_, go_, separator, *cli = sys.argv[1:]
    assert separator == "--", sys.argv
    pause_at(target_, table_, Path(ready_), Path(go_))
    from imageiq_spark.cli import main

    sys.exit(main(cli))
