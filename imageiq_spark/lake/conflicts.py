"""Delta commits that lose to a concurrent writer: how they are recognised and retried.

Two drivers may run the same stage at once; Delta's optimistic concurrency lets one commit win
and fails the other with a conflict, which is retried against the new table state.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from delta.exceptions import (
    ConcurrentAppendException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    MetadataChangedException,
    ProtocolChangedException,
)
from pyspark.errors import PySparkException

log = logging.getLogger(__name__)

CONFLICTS = (
    ConcurrentAppendException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    MetadataChangedException,
    ProtocolChangedException,
)
#: The same conflicts by error condition: a Spark Connect client gets no `delta.exceptions` classes.
CONFLICT_CONDITIONS = frozenset({
    "DELTA_CONCURRENT_APPEND", "DELTA_CONCURRENT_DELETE_READ", "DELTA_CONCURRENT_TRANSACTION",
    "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED",
})
T = TypeVar("T")


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is a Delta commit that lost to a concurrent writer (classic or Connect)."""
    if isinstance(exc, CONFLICTS):
        return True
    condition = error_condition(exc)
    return bool(condition) and condition.split(".")[0] in CONFLICT_CONDITIONS


def error_condition(exc: BaseException) -> str | None:
    """Spark's error condition (`PATH_NOT_FOUND`, ...): `getCondition` from Spark 4, before it
    `getErrorClass`."""
    if not isinstance(exc, PySparkException):
        return None
    return exc.getCondition() if hasattr(exc, "getCondition") else exc.getErrorClass()


def with_conflict_retry(action: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Run a Delta write, retrying when a concurrent writer committed first."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except PySparkException as exc:
            if not is_conflict(exc) or attempt == attempts:
                raise
            delay = min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s: concurrent write (%s); retry %d in %.1fs", what,
                        type(exc).__name__, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
