"""The lakehouse's table checks (a folder is a Delta table once its first commit is in its log) and
its pick of the rows a stage has still to process, spread over the cores."""

from __future__ import annotations

import contextlib
import io

from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType
from pyspark.testing import assertDataFrameEqual

from imageiq_spark.lake import delta_log, lakehouse
from imageiq_spark.lake.session import session_conf, spread


def describe_says_delta(spark, location: str) -> bool:
    """Spark's own answer, as Connect sessions get it."""
    rows = spark.sql(f"DESCRIBE DETAIL delta.`{location}`").select("format").collect()
    return rows[0]["format"] == "delta"


def test_a_folder_without_a_log_is_no_delta_table(spark, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "part-0.parquet").write_bytes(b"not a table")

    assert delta_log.is_delta_table(spark, f"file:{tmp_path / 'plain'}") is False
    assert delta_log.is_delta_table(spark, f"file:{tmp_path / 'missing'}") is False


def test_a_log_whose_first_commit_is_still_being_written_is_no_delta_table(spark, tmp_path):
    log = tmp_path / "creating" / "_delta_log"
    log.mkdir(parents=True)
    (log / ".00000000000000000000.json.5f0c.tmp").write_text("{}")

    assert delta_log.is_delta_table(spark, f"file:{tmp_path / 'creating'}") is False


def test_a_written_table_is_a_delta_table_as_spark_says(spark, tmp_path):
    location = f"file:{tmp_path / 'table'}"
    spark.range(3).write.format("delta").save(location)

    assert delta_log.is_delta_table(spark, location) is True
    assert describe_says_delta(spark, location) is True


def test_the_latest_version_is_read_from_the_log_as_delta_history_gives_it(spark, tmp_path):
    location = f"file:{tmp_path / 'table'}"
    for _ in range(3):
        spark.range(3).write.format("delta").mode("append").save(location)
    (tmp_path / "table" / "_delta_log" / ".00000000000000000003.json.5f0c.tmp").write_text("{}")

    assert delta_log.latest_version(spark, location) == 2
    assert delta_log.history(spark, location, 1).first()["version"] == 2


def spark_jobs(spark) -> int:
    return max(spark.sparkContext.statusTracker().getJobIdsForGroup(None) or [-1])


def test_a_session_creates_and_registers_a_table_once(spark, config):
    schema = StructType([StructField("image_id", StringType()), StructField("label", StringType())])
    session = spark.newSession()
    lakehouse.ensure_table(session, config, "images", schema)
    jobs = spark_jobs(spark)

    lakehouse.ensure_table(session, config, "images", schema)
    assert lakehouse.register_table(session, config, "images") is True
    assert spark_jobs(spark) == jobs
    assert session.table(lakehouse.qualified_name(config, "images")).columns == ["image_id", "label"]


def test_a_column_added_to_a_schema_reaches_a_table_the_session_knows(spark, config):
    narrow = StructType([StructField("image_id", StringType())])
    session = spark.newSession()
    lakehouse.ensure_table(session, config, "images", narrow)

    wide = StructType([*narrow.fields, StructField("label", StringType())])
    lakehouse.ensure_table(session, config, "images", wide)
    assert lakehouse.read_table(session, config, "images").columns == ["image_id", "label"]


IMAGES = [("a", b"aaa"), ("b", b"bbb"), ("c", b"ccc"), ("d", b"ddd"), ("e", b"eee")]


def images_table(spark, tmp_path):
    location = f"file:{tmp_path / 'images'}"
    spark.createDataFrame(IMAGES, "image_id string, content binary").write.format("delta").save(location)
    return spark.read.format("delta").load(location)


def ids(spark, *values: str):
    return spark.createDataFrame([(v,) for v in values], "image_id string")


def operators_above(plan: str, marker: str) -> list[str]:
    """The operators from the first plan node whose line holds `marker` up to the root."""
    lines = plan.splitlines()
    at = next(i for i, line in enumerate(lines) if marker in line)

    def depth(line: str) -> int:
        return len(line) - len(line.lstrip(" :+-"))

    above, level = [], depth(lines[at])
    for line in reversed(lines[:at]):
        if depth(line) < level:
            above.append(line.strip())
            level = depth(line)
    return above


def physical_plan(df) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        df.explain()
    return out.getvalue()


def test_pending_rows_are_those_no_done_table_holds(spark, tmp_path):
    images = images_table(spark, tmp_path)

    with lakehouse.pending_rows(images, [ids(spark, "b", "d"), ids(spark, "e", "z")]) as pending:
        assert pending.count == 2
        assert sorted(pending.ids.collect()) == [("a",), ("c",)]
        assertDataFrameEqual(pending.rows, [("a", bytearray(b"aaa")), ("c", bytearray(b"ccc"))],
                             checkRowOrder=False)


def test_pending_rows_are_picked_without_shuffling_their_bytes(spark, tmp_path):
    images = images_table(spark, tmp_path)
    # No automatic broadcast: what a done table of a million ids gets. An anti-join of the image
    # rows themselves then sort-merges, and shuffles every image's bytes.
    with session_conf(spark, {"spark.sql.autoBroadcastJoinThreshold": "-1"}):
        with lakehouse.pending_rows(images, [ids(spark, "b", "d")]) as pending:
            plan = physical_plan(pending.rows)

    above_scan = operators_above(plan, "ReadSchema: struct<image_id:string,content:binary>")
    first_join = next(i for i, op in enumerate(above_scan) if "Join" in op)
    assert "BroadcastHashJoin" in above_scan[first_join] and "LeftSemi" in above_scan[first_join]
    assert [op for op in above_scan[:first_join] if "Exchange" in op] == []  # filtered, then dealt


def test_when_every_row_is_pending_the_rows_are_read_as_they_are(spark, tmp_path):
    images = images_table(spark, tmp_path)

    with lakehouse.pending_rows(images, [ids(spark, "z")]) as pending:
        assert pending.count == 5
        assert "Join" not in physical_plan(pending.rows)
        assertDataFrameEqual(pending.rows, [(i, bytearray(c)) for i, c in IMAGES], checkRowOrder=False)


def test_when_no_row_is_pending_no_row_is_read(spark, tmp_path):
    images = images_table(spark, tmp_path)

    with lakehouse.pending_rows(images, [ids(spark, "a", "b", "c"), ids(spark, "d", "e")]) as pending:
        assert pending.count == 0
        assert "FileScan" not in physical_plan(pending.rows)
        assert pending.rows.collect() == []


def rows_per_partition(df) -> list[int]:
    counts = df.select(F.spark_partition_id().alias("p")).groupBy("p").count().collect()
    return sorted(row["count"] for row in counts)


def test_a_whole_table_split_by_its_scan_is_not_shuffled(spark, tmp_path):
    location = f"file:{tmp_path / 'two_files'}"
    spark.range(100).repartition(2).write.format("delta").save(location)
    table = spark.read.format("delta").load(location)
    assert table.rdd.getNumPartitions() == 2  # one scan task per core, on local[2]

    spread_rows = spread(table)

    assert "Exchange" not in physical_plan(spread_rows)
    assert rows_per_partition(spread_rows) == rows_per_partition(table)


def test_a_table_too_small_to_split_is_dealt_over_the_cores(spark, tmp_path):
    location = f"file:{tmp_path / 'one_file'}"
    spark.range(100).coalesce(1).write.format("delta").save(location)

    assert rows_per_partition(spread(spark.read.format("delta").load(location))) == [50, 50]


def test_pending_rows_of_part_of_a_table_are_dealt_over_the_cores(spark, tmp_path):
    location = f"file:{tmp_path / 'images'}"
    ids = spark.range(100).selectExpr("cast(id as string) as image_id")
    ids.coalesce(1).write.format("delta").save(location)
    done = spark.range(20).selectExpr("cast(id as string) as image_id")

    with lakehouse.pending_rows(spark.read.format("delta").load(location), [done]) as pending:
        assert rows_per_partition(pending.rows) == [20, 20, 20, 20]  # two per core, round-robin


def test_pending_rows_the_scan_already_spreads_are_not_shuffled(spark, tmp_path):
    location = f"file:{tmp_path / 'images'}"
    ids = spark.range(100).selectExpr("cast(id as string) as image_id")
    ids.repartition(2).write.format("delta").save(location)  # two files, their ids dealt between them
    done = spark.range(20).selectExpr("cast(id as string) as image_id")

    with lakehouse.pending_rows(spark.read.format("delta").load(location), [done]) as pending:
        assert "RoundRobinPartitioning" not in physical_plan(pending.rows)
        per_task = rows_per_partition(pending.rows)
        assert sum(per_task) == 80 and len(per_task) == 2 and max(per_task) <= 50
