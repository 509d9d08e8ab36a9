"""What users see: a stage run from the CLI writes our progress lines to stderr, not the start-up
noise of TensorFlow in the driver and the Python workers; `--verbose` brings that back."""

from __future__ import annotations

import uuid
from pathlib import Path

import images
import pytest
from cli_process import run_cli, write_conf
from conftest import make_config
from image_tables import image_rows
from registered import register

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.core import quiet
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.session import JVM_OPTIONS, session_settings
from imageiq_spark.stages import ingest

#: Lines TensorFlow's C++ core and its CUDA probe print in every process that loads it, Python
#: warnings as the warnings module prints them, the notices Spark's JVM prints on every local run,
#: and petastorm's advice to its caller.
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "cuInit", "Warning:",
         "Using Spark's default log4j profile", "NativeCodeLoader", "resolves to a loopback address",
         "Truncated the string representation", "not supported in streaming", "locally checkpointed",
         "Converting floating-point columns", "of the parquet files is too small")


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six digits in `images` and a champion model in the registry; (folder, config file)."""
    root = tmp_path_factory.mktemp("quiet")
    config = make_config(root, mlflow={"registered_model": f"m_{uuid.uuid4().hex[:8]}"})
    digits, labels = load_digits()
    ingest.ensure_tables(spark, config)
    contents = {f"{labels[i]}/{i}.png": images.gray_png(digits[i]) for i in range(6)}
    lakehouse.merge_new_rows(config, "images", image_rows(spark, contents), ["image_id"])
    register(spark, config, seed=4)
    return root, write_conf(config, root / "conf.yaml")


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(marker in line for marker in NOISE)]


def test_a_stage_shows_our_progress_and_none_of_the_libraries_start_up_lines(lake):
    root, conf = lake

    scored = run_cli(conf, "score", cwd=root)

    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "score: starting" in scored.stderr and "score: done" in scored.stderr
    assert "predictions:  6 new" in scored.stdout  # the model ran in the Python workers
    assert noise(scored.stderr) == []


def test_an_ingest_that_finds_no_new_file_prints_no_stack_trace(lake, tmp_path):
    root, conf = lake
    nothing_new = tmp_path / "nothing_new"
    nothing_new.mkdir()

    ingested = run_cli(conf, "ingest", "--source", str(nothing_new), cwd=root)

    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert "files seen:   0" in ingested.stdout
    assert "ingest: done" in ingested.stderr
    assert [line for line in ingested.stderr.splitlines()
            if "Exception" in line or line.lstrip().startswith("at ")] == []
    assert noise(ingested.stderr) == []


def test_a_users_own_jvm_options_follow_the_quiet_logging_option_instead_of_replacing_it(tmp_path):
    heap_dumps = "-XX:+HeapDumpOnOutOfMemoryError"
    config = make_config(tmp_path, spark_conf={JVM_OPTIONS: heap_dumps})

    settings = session_settings(config, local=True)

    ours = quiet.jvm_settings()[JVM_OPTIONS]
    assert ours.startswith("-Dlog4j2.configurationFile=")
    assert settings[JVM_OPTIONS] == f"{ours} {heap_dumps}"


def test_under_verbose_a_users_jvm_options_are_kept_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    config = make_config(tmp_path, spark_conf={JVM_OPTIONS: "-XX:+HeapDumpOnOutOfMemoryError"})

    assert session_settings(config, local=True)[JVM_OPTIONS] == "-XX:+HeapDumpOnOutOfMemoryError"


@pytest.mark.slow  # a second CLI run with its own Spark start; `make test-all`
def test_verbose_brings_back_the_start_up_lines_of_the_python_workers(lake):
    root, conf = lake

    embedded = run_cli(conf, "--verbose", "embed", cwd=root)

    assert embedded.returncode == 0, embedded.stderr[-3000:]
    assert "embed: done" in embedded.stderr
    assert any("absl::InitializeLog" in line for line in noise(embedded.stderr))


@pytest.mark.slow  # a CLI run that trains on two barrier tasks; `make test-all`
def test_distributed_training_workers_print_none_of_the_start_up_lines(spark, tmp_path):
    from imageiq_spark.cli.sample_data import write_sample_data
    from imageiq_spark.stages import preprocess

    write_sample_data(tmp_path / "src", per_class=6)
    config = make_config(tmp_path, ingest={"source": str(tmp_path / "src")},
                         train={"epochs": 2, "batch_size": 8, "distributed": {"workers": 2}})
    ingest.run(spark, config)
    preprocess.run(spark, config)

    trained = run_cli(write_conf(config, tmp_path / "conf.yaml"), "train", cwd=tmp_path)

    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "train: done" in trained.stderr
    assert noise(trained.stderr) == []
