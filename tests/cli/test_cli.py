"""The `imageiq` command line: output formats, exit codes, and the README's first commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pyspark.sql import Row

from imageiq_spark.cli import print_rows
from imageiq_spark.core.config import load_config, loggable_params


@pytest.fixture
def rows(spark):
    return spark.createDataFrame(
        [Row(label="3", n=2, tags=["a", "b"]), Row(label=None, n=1, tags=[])],
        "label string, n long, tags array<string>",
    )


def test_csv_prints_a_header_then_one_line_per_row(rows, capsys):
    print_rows(rows, "csv")

    assert capsys.readouterr().out == 'label,n,tags\n3,2,"[""a"", ""b""]"\n,1,[]\n'


def test_json_prints_one_object_per_row(rows, capsys):
    print_rows(rows, "json")

    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"label": "3", "n": 2, "tags": ["a", "b"]},
        {"label": None, "n": 1, "tags": []},
    ]


def test_table_aligns_columns_and_counts_rows(rows, capsys):
    print_rows(rows, "table")

    assert capsys.readouterr().out.splitlines() == [
        "label  n  tags",
        "-----  -  ----------",
        '3      2  ["a", "b"]',
        "       1  []",
        "(2 rows)",
    ]


def test_set_overrides_win_over_the_file(tmp_path):
    conf = tmp_path / "conf.yaml"
    conf.write_text("train:\n  epochs: 7\n  batch_size: 16\n")

    config = load_config(conf, ["train.epochs=3", "spark_conf.spark.sql.shuffle.partitions=8"])

    assert (config.train.epochs, config.train.batch_size) == (3, 16)
    assert config.spark_conf["spark.sql.shuffle.partitions"] == "8"


@pytest.mark.slow  # `make test` runs the CLI end to end in test_cluster.py and test_connect.py
def test_readme_commands_ingest_the_sample_and_sql_prints_the_counts(tmp_path):
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"storage:\n  root: {tmp_path / 'lake'}\n"
        "spark_conf:\n  spark.master: local[2]\n  spark.ui.enabled: 'false'\n"
    )

    def imageiq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imageiq_spark", "--conf", str(conf), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    written = imageiq("sample-data", str(tmp_path / "digits"), "--per-class", "3")
    ingested = imageiq("ingest", "--source", str(tmp_path / "digits"))
    query = imageiq("sql", "SELECT label, count(*) AS n FROM imageiq.images GROUP BY label ORDER BY label",
                    "--format", "csv")

    assert (written.returncode, ingested.returncode, query.returncode) == (0, 0, 0), query.stderr
    assert "new images:   30" in ingested.stdout
    assert query.stdout == "label,n\n" + "".join(f"{d},3\n" for d in range(10))


def test_a_query_error_exits_1_with_its_cause_on_stderr(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "imageiq_spark", "--set", f"storage.root={tmp_path / 'lake'}",
         "--set", "spark_conf.spark.master=local[1]", "sql", "SELECT * FROM imageiq.nope"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 1
    assert "sql failed" in result.stderr and "TABLE_OR_VIEW_NOT_FOUND" in result.stderr
    assert result.stdout == ""


def test_logged_params_hold_every_key_but_never_a_credential():
    config = load_config(None, [
        "train.epochs=3",
        "spark_conf.spark.hadoop.fs.s3a.secret.key=SECRETVALUE",
        "spark_conf.spark.hadoop.fs.s3a.access.key=ACCESSVALUE",
        "spark_conf.spark.hadoop.fs.s3a.endpoint=http://127.0.0.1:9000",
    ])

    params = loggable_params(config)

    assert params["train.epochs"] == "3"
    assert json.loads(params["spark_conf"]) == {
        "spark.hadoop.fs.s3a.secret.key": "***",
        "spark.hadoop.fs.s3a.access.key": "***",
        "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9000",
    }
    assert "SECRETVALUE" not in json.dumps(params) and "ACCESSVALUE" not in json.dumps(params)


@pytest.mark.parametrize(("key", "value"), [
    ("catalog.database", "imageiq`; DROP TABLE images; --"),
    ("catalog.database", "main.imageiq"),
    ("catalog.database", "9lives"),
    ("catalog.name", "my catalog"),
])
def test_a_name_that_goes_into_sql_must_be_an_identifier_or_the_cli_exits_2(key, value, capsys):
    from imageiq_spark import cli

    assert cli.main(["--set", f"{key}={value}", "status"]) == 2
    err = capsys.readouterr().err
    assert f"config key '{key}' expects" in err and "^[A-Za-z_][A-Za-z0-9_]*$" in err
