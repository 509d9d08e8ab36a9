"""The one clock: every timestamp the project writes is a timezone-aware UTC `datetime`.

Spark's TIMESTAMP is an instant. PySpark turns a naive Python `datetime` into one by reading it
as the process's local time (`time.mktime`), and `collect` gives instants back as naive local
times; an aware `datetime` is converted exactly. So naive UTC (`utcnow()`) written from a machine
in New York lands five hours late, and naive local time depends on the machine: aware UTC is
right everywhere. `current_timestamp()` in Spark SQL is the same instant (the session's time zone,
UTC by default here, only changes how it is shown).
"""

from __future__ import annotations

import datetime

UTC = datetime.timezone.utc


def utc_now() -> datetime.datetime:
    """Now, aware, in UTC."""
    return datetime.datetime.now(UTC)


def utc_from_timestamp(seconds: float) -> datetime.datetime:
    """Unix seconds (MLflow's start_time / 1000, Spark's `unix_seconds`) -> aware UTC."""
    return datetime.datetime.fromtimestamp(seconds, UTC)


def as_utc(value: datetime.datetime) -> datetime.datetime:
    """A timestamp from Spark's `collect` (naive local time) or an aware one -> aware UTC."""
    return value.astimezone(UTC)  # a naive value is taken as local time, as PySpark made it
