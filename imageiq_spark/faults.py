"""One bad input must not fail a job: isolating inputs that kill the Python worker.

A Python worker that dies on an input (a segfault in a native decoder, an abort, the kernel's OOM
killer) does not raise an exception the UDF could catch: the task fails, Spark retries it
`spark.task.maxFailures` times on the same input, and the job fails. So the stage catches that
failure at the driver (`is_worker_crash`), bisects the failed batch's keys, rerunning a cheap
job over each half (`crashing_keys`), until the single inputs that still crash are known; it
quarantines those with reason `worker_crash` and processes the batch without them. A batch that
does not crash costs nothing extra; one crashing input among n costs about 2*log2(n) small jobs.

Usage in a stage (ingest does this):

    try:
        process(batch)
    except Exception as exc:
        if not faults.is_worker_crash(exc):
            raise
        bad = faults.crashing_keys(keys, lambda subset: probe_job(batch, subset))
        quarantine(bad, reason=faults.WORKER_CRASH); process(batch without bad)

`inject` is the test hook behind the `*.fault_inject_path_contains` config keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

WORKER_CRASH = "worker_crash"
# What the JVM reports when a Python worker's process ends without answering.
_CRASH_MESSAGES = ("Python worker exited unexpectedly", "crashed", "EOFException")


def inject(path: str, pattern: str) -> None:
    """Kill this Python worker, as a native crash would, if `path` contains `pattern` (non-empty)."""
    if pattern and pattern in path:
        os._exit(134)  # no exception, no cleanup: what a segfault or abort looks like to Spark


def is_worker_crash(exc: BaseException) -> bool:
    """True when a Spark job failed because a Python worker process died."""
    text = str(exc)
    return "Python worker" in text and any(m in text for m in _CRASH_MESSAGES)


def crashing_keys(keys: Sequence[str], attempt: Callable[[list[str]], object]) -> list[str]:
    """The keys on which `attempt` (a Spark job over that subset) kills a worker.

    Call it after a job over all `keys` crashed; any failure other than a worker crash propagates.
    """
    keys = list(keys)
    if len(keys) <= 1:
        return keys
    middle = len(keys) // 2
    return _bisect(keys[:middle], attempt) + _bisect(keys[middle:], attempt)


def _bisect(keys: list[str], attempt: Callable[[list[str]], object]) -> list[str]:
    if not keys:
        return []
    try:
        attempt(keys)
        return []
    except Exception as exc:  # a Py4J/Spark error: only worker crashes are ours to isolate
        if not is_worker_crash(exc):
            raise
    log.info("a Python worker crashed on %d input(s); narrowing down", len(keys))
    return crashing_keys(keys, attempt)
