"""One clock: a timestamp written is UTC wall time whatever the machine's time zone. Run here
under America/New_York (the Python side; `make test` also runs them with TZ set for the JVM)."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import pytest

from imageiq_spark import cli
from imageiq_spark.core.clock import UTC, as_utc, utc_from_timestamp, utc_now
from imageiq_spark.lake import lakehouse, runs
from imageiq_spark.stages import duplicates

pytestmark = pytest.mark.tz


@pytest.fixture
def new_york(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    assert time.localtime().tm_gmtoff in (-5 * 3600, -4 * 3600)
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_clock_is_aware_utc_under_new_york(new_york):
    now = utc_now()
    assert now.utcoffset() == datetime.timedelta(0)
    assert abs(now.timestamp() - time.time()) < 1
    assert utc_from_timestamp(0) == datetime.datetime(1970, 1, 1, tzinfo=UTC)
    # What Spark's collect gives (naive local) back as UTC: 07:00 in New York in January is 12:00.
    assert as_utc(datetime.datetime(2026, 1, 5, 7, 0)) == datetime.datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@dataclass
class _Done:
    def counts(self) -> runs.RunCounts:
        return runs.RunCounts(read=1)


def _utc_wall(spark, config, table: str, column: str) -> list[tuple[str, int]]:
    """The column as the session shows it (its time zone, UTC) and as unix seconds."""
    lakehouse.register_tables(spark, config)
    return [(r[0], r[1]) for r in spark.sql(
        f"SELECT date_format({column}, 'yyyy-MM-dd HH:mm:ss'), unix_timestamp({column}) "
        f"FROM {config.catalog.database}.{table}").collect()]


def _between(before: datetime.datetime, after: datetime.datetime, shown: str, seconds: int) -> bool:
    at = datetime.datetime.strptime(shown, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return (before.replace(microsecond=0) <= at <= after
            and int(before.timestamp()) <= seconds <= after.timestamp())


def test_job_runs_timestamps_are_utc_wall_time_under_new_york(spark, config, new_york):
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    before = utc_now()
    runs.record_run(spark, config, "ingest", _Done)
    after = utc_now()

    for column in ("started_at", "ended_at"):
        ((shown, seconds),) = _utc_wall(spark, config, "job_runs", column)
        assert _between(before, after, shown, seconds), (column, shown, before, after)


def test_near_duplicate_clusters_are_stamped_in_utc_under_new_york(spark, config, new_york):
    duplicates.ensure_tables(spark, config)
    before = utc_now()
    duplicates.write_clusters(spark, config, {"a" * 64: "a" * 64, "b" * 64: "a" * 64})
    after = utc_now()

    shown = _utc_wall(spark, config, "near_duplicate_clusters", "clustered_at")
    assert len(shown) == 2 and all(_between(before, after, *s) for s in shown), shown


def test_sql_prints_timestamps_in_utc_under_new_york(spark, new_york, capsys):
    cli.print_rows(spark.sql("SELECT timestamp'2026-01-05 12:00:00' AS t"), "csv")
    assert capsys.readouterr().out == "t\n2026-01-05 12:00:00+00:00\n"
