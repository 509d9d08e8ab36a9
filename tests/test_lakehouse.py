"""The lakehouse's table checks: a folder is a Delta table once its first commit is in its log."""

from __future__ import annotations

from imageiq_spark import lakehouse


def describe_says_delta(spark, location: str) -> bool:
    """Spark's own answer, as Connect sessions get it."""
    rows = spark.sql(f"DESCRIBE DETAIL delta.`{location}`").select("format").collect()
    return rows[0]["format"] == "delta"


def test_a_folder_without_a_log_is_no_delta_table(spark, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "part-0.parquet").write_bytes(b"not a table")

    assert lakehouse.is_delta_table(spark, f"file:{tmp_path / 'plain'}") is False
    assert lakehouse.is_delta_table(spark, f"file:{tmp_path / 'missing'}") is False


def test_a_log_whose_first_commit_is_still_being_written_is_no_delta_table(spark, tmp_path):
    log = tmp_path / "creating" / "_delta_log"
    log.mkdir(parents=True)
    (log / ".00000000000000000000.json.5f0c.tmp").write_text("{}")

    assert lakehouse.is_delta_table(spark, f"file:{tmp_path / 'creating'}") is False


def test_a_written_table_is_a_delta_table_as_spark_says(spark, tmp_path):
    location = f"file:{tmp_path / 'table'}"
    spark.range(3).write.format("delta").save(location)

    assert lakehouse.is_delta_table(spark, location) is True
    assert describe_says_delta(spark, location) is True
