"""Shared pieces of the stage benchmarks: timing, the bench Spark session, a Markdown table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imageiq_spark.core.config import Config, from_dict

BENCH_SPARK_CONF = {
    "spark.master": "local[2]",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "2",
}


def bench_config(root: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {"storage": {"root": str(root)}, "spark_conf": dict(BENCH_SPARK_CONF)}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data)


def timed(action: Callable[[], Any], repeats: int = 3,
          setup: Callable[[], Any] | None = None) -> list[float]:
    """Wall-clock seconds of `action` for each repeat; `setup` runs untimed before each."""
    seconds = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def process_cpu() -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds (user + system) so far of each of this process's living descendants, keyed by
    (pid, start time), with its kind: `jvm` (the Spark JVM) or `python` (Spark's Python workers,
    multiprocessing pool workers)."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            kind = "jvm" if proc.name() == "java" else "python" if "python" in proc.name() else None
            if kind:
                times = proc.cpu_times()
                found[(proc.pid, proc.create_time())] = (kind, times.user + times.system)
        except psutil.Error:
            continue
    return found


def cpu_used(action: Callable[[], Any], into: list[dict[str, float]]) -> Callable[[], None]:
    """`action`, recording the CPU seconds each call costs the JVM and the Python processes.

    Per process: one that exits meanwhile (Spark retires idle Python workers) drops out of both
    samples instead of taking its whole past off the sum; one started meanwhile counts in full."""

    def measured() -> None:
        before = process_cpu()
        action()
        used = {"jvm": 0.0, "python": 0.0}
        for key, (kind, seconds) in process_cpu().items():
            used[kind] += seconds - before.get(key, (kind, 0.0))[1]
        into.append(used)

    return measured
