"""`imageiq maintain`: OPTIMIZE compacts every table, VACUUM deletes the files the retention no
longer needs, and a retention under Delta's 7 days needs Delta's check turned off on purpose."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_config
from images import halves, png, quadrants

from imageiq_spark.core.config import ConfigError
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.session import session_conf
from imageiq_spark.stages import ingest, maintain


def test_a_retention_under_seven_days_is_refused_while_deltas_check_is_on(spark, tmp_path):
    config = make_config(tmp_path, maintain={"retention_hours": 24})

    with pytest.raises(ConfigError, match=r"'maintain.retention_hours' is 24, under Delta's safe minimum "
                       r"of 168 hours.*retentionDurationCheck.enabled=false"):
        maintain.run(spark, config)


def test_maintain_compacts_each_table_to_one_file_and_vacuums_the_replaced_ones(spark, tmp_path):
    source = tmp_path / "source"
    for i, image in enumerate([quadrants(20, 30), halves(20, 30), quadrants(24, 24)]):
        path = Path(source, "x", f"{i}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(image))
    # One file per micro-batch: three MERGE commits, three data files in `images`.
    config = make_config(tmp_path, ingest={"source": str(source), "files_per_batch": 1},
                         maintain={"retention_hours": 0})
    ingest.run(spark, config)
    folder = Path(lakehouse.table_location(config, "images").removeprefix("file://"))
    before = sorted(folder.glob("*.parquet"))

    with session_conf(spark, {maintain.RETENTION_CHECK: "false"}):
        summary = maintain.run(spark, config)

    images = {t.table: t for t in summary.tables}["images"]
    after = sorted(folder.glob("*.parquet"))
    assert (images.files_before, images.files_after) == (3, 1)
    # Every file there was before (the three commits', and any a retried write left) is gone.
    assert len(after) == 1 and not set(after) & set(before)
    assert images.files_vacuumed == len(before)
    assert lakehouse.read_table(spark, config, "images").count() == 3
    assert {t.table for t in summary.tables} == {"images", "quarantine"}
