"""One bad input must not fail a job: isolating inputs that kill the Python worker.

A Python worker that dies on an input (a segfault in a native decoder, an abort, the kernel's OOM
killer) does not raise an exception the UDF could catch: the task fails, Spark retries it
`spark.task.maxFailures` times on the same input, and the job fails. So the stage catches that
failure at the driver (`is_worker_crash`), bisects the failed batch's keys, rerunning a cheap
job over each half (`crashing_keys`), until the single inputs that still crash are known; it
quarantines those with reason `worker_crash` and processes the batch without them. A batch that
does not crash costs nothing extra; one crashing input among n costs about 2*log2(n) jobs over
shrinking subsets (about twice the batch's work in all: in score and embed that is model time)
and the rerun without it.

Every stage that runs Python on images goes through `survive_worker_crashes` (ingest per
micro-batch; preprocess, score and embed per run):

    result, crashed = faults.survive_worker_crashes(
        lambda crashed: process(batch without crashed),   # rerun without them after a crash
        lambda: keys of batch,
        lambda subset: probe_job(batch restricted to subset),
        "stage")
    quarantine(crashed, reason=faults.WORKER_CRASH)

A test makes a worker die on purpose with the environment variable `INJECT_FAULT`
(`IMAGEIQ_TEST_INJECT_FAULT=<stage>:<substring>`), never a config key: the stage reads it on the
driver (`injected`) and hands it to its UDF, whose workers die in `inject` and `inject_any`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

log = logging.getLogger(__name__)

WORKER_CRASH = "worker_crash"
# What the JVM reports when a Python worker's process ends without answering.
_CRASH_MESSAGES = ("Python worker exited unexpectedly", "crashed", "EOFException")
T = TypeVar("T")
#: Test-only switch, `<stage>:<substring>`: the Python worker of `<stage>` (ingest, preprocess,
#: score, embed) dies on each input whose key (ingest: the file's path; else its image_id) contains
#: `<substring>`.
INJECT_FAULT = "IMAGEIQ_TEST_INJECT_FAULT"


def injected(stage: str) -> str:
    """The substring `INJECT_FAULT` names for `stage`; empty (inject nothing) when it names none.

    Read on the driver: executors need not share its environment, so the stage passes the value
    to its UDF."""
    named, sep, pattern = os.environ.get(INJECT_FAULT, "").partition(":")
    return pattern if sep and named == stage else ""


def inject(path: str, pattern: str) -> None:
    """Kill this Python worker, as a native crash would, if `path` contains `pattern` (non-empty)."""
    if pattern and pattern in path:
        os._exit(134)  # no exception, no cleanup: what a segfault or abort looks like to Spark


def inject_any(keys: Iterable[str | None], pattern: str) -> None:
    """Kill this Python worker if one of `keys` contains `pattern` (non-empty)."""
    if pattern:
        for key in keys:
            inject(key or "", pattern)


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


def survive_worker_crashes(
    job: Callable[[list[str]], T],
    keys: Callable[[], Sequence[str]],
    attempt: Callable[[list[str]], object],
    what: str,
) -> tuple[T, list[str]]:
    """`job([])`; if a Python worker died in it, the keys it dies on and `job(crashed)`.

    `job(crashed)` must leave the `crashed` keys out; `keys()` lists the job's inputs and
    `attempt(subset)` runs a cheap job over some of them (`crashing_keys`). Returns the job's
    result and the crashed keys, for the stage to quarantine with reason WORKER_CRASH. A crash
    that no single input reproduces (a worker killed from outside) fails the job as before.
    """
    try:
        return job([]), []
    except Exception as exc:  # a Py4J/Spark error: only worker crashes are ours to isolate
        if not is_worker_crash(exc):
            raise
        crashed = crashing_keys(keys(), attempt)
        if not crashed:
            raise
    log.warning("%s: a Python worker died on %d input(s); quarantined: %s", what, len(crashed),
                ", ".join(crashed))
    return job(crashed), crashed


def restrict(rows: DataFrame, column: str, keys: Sequence[str], keep: bool) -> DataFrame:
    """`rows` whose string `column` is among `keys` (keep) or not among them (not keep).

    A broadcast semi/anti join: a bisection's first halves can hold many thousand keys, too many
    for an `isin` literal in the plan."""
    listed = rows.sparkSession.createDataFrame([(key,) for key in keys], f"`{column}` string")
    return rows.join(F.broadcast(listed), column, "left_semi" if keep else "left_anti")
