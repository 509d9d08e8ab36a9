"""No credential in any output: one redaction rule (imageiq_spark/core/redact.py) for MLflow params and
tags, logs, the CLI's messages and `job_runs`, shown on a real run against a real MLflow server
(SQLite store) whose URI carries a password."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TEST_SPARK_CONF, make_config

from imageiq_spark import cli
from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.core.config import loggable_params, to_dict
from imageiq_spark.core.redact import RedactingFormatter, redact, redact_settings
from imageiq_spark.lake import lakehouse, session

# One secret of each kind; each string must never appear in any output.
PASSWORD = "Pw9uriUserinfo"
QUERY_TOKEN = "Qt7securityToken"
CONNECT_TOKEN = "Ct5connectToken"
AZURE_KEY = "Az3accountKey+/=="
S3_SECRET = "S3k5secretKey"
SECRETS = (PASSWORD, QUERY_TOKEN, CONNECT_TOKEN, AZURE_KEY, S3_SECRET)
AZURE_KEY_NAME = "spark.hadoop.fs.azure.account.key.acct.dfs.core.windows.net"


@pytest.mark.parametrize(("text", "expected"), [
    (f"postgresql://mlflow:{PASSWORD}@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    (f"http://127.0.0.1:9000/?X-Amz-Security-Token={QUERY_TOKEN}&x=1",
     "http://127.0.0.1:9000/?X-Amz-Security-Token=***&x=1"),
    (f"https://acct.blob.core.windows.net/c/a.png?sv=2022&sig={QUERY_TOKEN}",
     "https://acct.blob.core.windows.net/c/a.png?sv=2022&sig=***"),
    (f"sc://connect.example:15002/;user_id=me;token={CONNECT_TOKEN}",
     "sc://connect.example:15002/;user_id=me;token=***"),
    (f"--set spark_conf.{AZURE_KEY_NAME}={AZURE_KEY} failed",
     f"--set spark_conf.{AZURE_KEY_NAME}=*** failed"),
    (json.dumps({"spark.hadoop.fs.s3a.secret.key": S3_SECRET}), '{"spark.hadoop.fs.s3a.secret.key": "***"}'),
    # Not credentials: a container in a wasbs URI, a user name without a password, a plain path.
    ("wasbs://images@acct.blob.core.windows.net/in", "wasbs://images@acct.blob.core.windows.net/in"),
    ("http://mlflow@tracking:5000", "http://mlflow@tracking:5000"),
    ("s3a://bucket/lake/images", "s3a://bucket/lake/images"),
])
def test_one_rule_hides_every_kind_of_secret_in_text(text, expected):
    assert redact(text) == expected


def test_settings_named_like_credentials_are_hidden_whole():
    settings = {
        "spark.hadoop.fs.s3a.secret.key": S3_SECRET,
        "spark.hadoop.fs.s3a.access.key": "AKIAEXAMPLE",
        AZURE_KEY_NAME: AZURE_KEY,
        "spark.hadoop.fs.azure.sas.c.acct.blob.core.windows.net": f"sv=1&sig={QUERY_TOKEN}",
        "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9000",
    }
    assert redact_settings(settings) == {**{key: "***" for key in settings},
                                         "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9000"}


def test_logged_params_redact_uris_of_the_mlflow_keys(tmp_path):
    config = make_config(tmp_path, mlflow={"tracking_uri": f"http://mlflow:{PASSWORD}@tracking:5000",
                                           "registry_uri": f"postgresql://reg:{PASSWORD}@db/mlflow"})
    params = loggable_params(config)
    assert params["mlflow.tracking_uri"] == "http://mlflow:***@tracking:5000"
    assert params["mlflow.registry_uri"] == "postgresql://reg:***@db/mlflow"


def test_the_spark_connect_log_line_hides_its_token(tmp_path, monkeypatch, caplog):
    class Builder:  # stands in for a Connect server: only the log line is under test
        def remote(self, *_: str) -> Builder:
            return self

        appName = config = remote  # noqa: N815

        def getOrCreate(self) -> None:  # noqa: N802
            return None

    monkeypatch.setattr(session.SparkSession, "builder", Builder())
    with caplog.at_level(logging.INFO, logger="imageiq_spark.lake.session"):
        session.connect_session(make_config(tmp_path), f"sc://connect.example:15002/;token={CONNECT_TOKEN}",
                                "imageiq")
    assert "sc://connect.example:15002/;token=***" in caplog.text and CONNECT_TOKEN not in caplog.text


def test_the_log_formatter_redacts_messages_arguments_and_tracebacks():
    try:
        raise RuntimeError(f"cannot reach http://u:{PASSWORD}@host")
    except RuntimeError:
        record = logging.LogRecord("imageiq_spark", logging.ERROR, __file__, 1, "store %s failed",
                                   (f"sqlite://u:{PASSWORD}@/x",), sys.exc_info())
    text = RedactingFormatter("%(message)s").format(record)
    assert PASSWORD not in text and "sqlite://u:***@/x" in text and "http://u:***@host" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store, proxied artifacts) on loopback; its clients'
    URI carries `user:password@`, which requests sends as basic auth and the server ignores."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the MLflow server did not start")
            time.sleep(1)
    yield f"http://mlflow:{PASSWORD}@127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


def test_no_secret_reaches_params_tags_job_runs_or_stderr_of_a_real_run(
        spark, mlflow_server, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    write_sample_data(tmp_path / "src", per_class=3)
    config = make_config(
        tmp_path, ingest={"source": str(tmp_path / "src")},
        train={"epochs": 1, "batch_size": 16, "shuffle_buffer": 64, "reader": "arrow"},
        mlflow={"tracking_uri": mlflow_server, "registered_model": "redacted"},
        # Not applied to the test session (the stages get it as config only): logged as params.
        spark_conf={**TEST_SPARK_CONF,
                    "spark.hadoop.fs.s3a.secret.key": S3_SECRET,
                    AZURE_KEY_NAME: AZURE_KEY,
                    "spark.hadoop.fs.s3a.endpoint": f"http://127.0.0.1:9/?X-Amz-Security-Token={QUERY_TOKEN}",
                    "spark.imageiq.test.connect_url": f"sc://connect.example:15002/;token={CONNECT_TOKEN}"})
    cli.configure_logging()
    for stage in ("ingest", "preprocess", "train"):
        cli.run_stage(spark, config, stage)
    # A failing command: the registry's URI is in the cause the CLI prints and job_runs keeps.
    conf = tmp_path / "failing.yaml"
    conf.write_text(yaml.safe_dump({**to_dict(config), "spark_conf": TEST_SPARK_CONF}))
    assert cli.main(["--conf", str(conf), "evaluate", "--model", "models:/redacted/99"]) == 2
    out, err = capfd.readouterr()

    client = MlflowClient(mlflow_server)
    version = client.get_model_version("redacted", "1")
    run = client.get_run(version.run_id)
    params, tags = run.data.params, run.data.tags
    job_runs = [row.asDict() for row in lakehouse.read_table(spark, config, "job_runs").collect()]
    for secret in SECRETS:
        for where, text in (("params", json.dumps(params)), ("tags", json.dumps(tags)),
                            ("job_runs", json.dumps(job_runs, default=str)), ("stderr", err),
                            ("stdout", out)):
            assert secret not in text, f"{secret} in {where}"
    # Present, redacted.
    assert params["mlflow.tracking_uri"] == mlflow_server.replace(PASSWORD, "***")
    assert json.loads(params["spark_conf"]) == {
        **TEST_SPARK_CONF, "spark.hadoop.fs.s3a.secret.key": "***", AZURE_KEY_NAME: "***",
        "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9/?X-Amz-Security-Token=***",
        "spark.imageiq.test.connect_url": "sc://connect.example:15002/;token=***"}
    (failed,) = [r for r in job_runs if r["status"] == "failed"]
    assert failed["stage"] == "evaluate" and failed["exit_code"] == 2
    assert mlflow_server.replace(PASSWORD, "***") in failed["error"]
    assert f"{mlflow_server.replace(PASSWORD, '***')}: " in err
    succeeded = sorted(r["stage"] for r in job_runs if r["status"] == "succeeded")
    assert succeeded == ["ingest", "preprocess", "train"]
    assert "View run" not in out  # MLflow's own URL line stays off stdout


def test_the_k8s_readme_puts_no_key_on_a_command_line():
    text = (Path(__file__).parents[2] / "deploy" / "k8s" / "README.md").read_text()
    assert "--from-literal" not in text
    assert "create secret generic imageiq-aws --from-env-file=" in text


def test_the_clis_own_usage_words_are_not_taken_for_a_secret():
    message = "--set expects KEY=VALUE (for example train.epochs=3), got 'noequals'"

    assert redact(message) == message
