"""Jobs that survive faults: a driver killed mid-run (SIGKILL) and rerun leaves every table with each
row exactly once; a Python worker that dies on one image fails only that image."""

from __future__ import annotations

import hashlib
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from cli_process import kill_when, run_cli, start_cli, write_conf
from conftest import make_config
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.core import faults
from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.lake import lakehouse, tracking
from imageiq_spark.ml.classifier import load_classifier
from imageiq_spark.stages import ingest, preprocess, train


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real digits per label, one duplicate content and one corrupt file."""
    root = tmp_path_factory.mktemp("fault_images")
    write_sample_data(root, per_class=2)
    (root / "7" / "copy_of_a_seven.png").write_bytes(next((root / "7").glob("*.png")).read_bytes())
    (root / "5" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 5)
    return root


def python_workers_running(proc: subprocess.Popen) -> bool:
    """The job is computing: its JVM has started Python workers (they live until the job ends)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return False
    for child in children:
        try:
            if "pyspark.daemon" in " ".join(child.cmdline()):
                return True
        except psutil.Error:  # a child that just ended (or a zombie) says nothing about the rest
            continue
    return False


def ingest_keys(spark, config: Config):
    """Which images and quarantined files a lakehouse holds. Which of two paths with the same bytes
    `images` keeps depends on the batches they arrived in, so `path` is checked separately."""
    images = lakehouse.read_table(spark, config, "images").select("image_id", "label", "size_bytes")
    quarantine = lakehouse.read_table(spark, config, "quarantine").select("path", "reason", "stage")
    return images, quarantine


def test_ingest_killed_mid_batch_and_rerun_holds_each_row_exactly_once(spark, tmp_path, source):
    config = make_config(tmp_path, ingest={"source": str(source), "files_per_batch": 6})
    conf = write_conf(config, tmp_path / "conf.yaml")
    checkpoints = Path(config.storage.root) / "checkpoints" / "ingest"

    # Batch 1 is planned (its offsets are written) and batch 0 committed: kill mid-run.
    proc = start_cli(conf, "ingest", cwd=tmp_path)
    kill_when(proc, lambda: any(checkpoints.glob("*/offsets/1")))
    images_after_kill = lakehouse.read_table(spark, config, "images").count()
    rerun = run_cli(conf, "ingest", cwd=tmp_path)

    assert proc.returncode == -signal.SIGKILL
    assert 0 < images_after_kill < 20, "the kill must land after the first batch and before the last"
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    clean = make_config(tmp_path / "clean", ingest={"source": str(source), "files_per_batch": 6})
    ingest.run(spark, clean)
    killed_images, killed_quarantine = ingest_keys(spark, config)
    clean_images, clean_quarantine = ingest_keys(spark, clean)
    assertDataFrameEqual(killed_images, clean_images)
    assertDataFrameEqual(killed_quarantine, clean_quarantine)
    assert killed_images.count() == 20  # 21 good files, one of them a duplicate of another's bytes
    content_of = {f"file:{p}": hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*.png")}
    kept = lakehouse.read_table(spark, config, "images").select("image_id", "path").collect()
    assert all(content_of[r.path] == r.image_id for r in kept)
    assert [tuple(r) for r in killed_quarantine.collect()] == [
        (f"file:{source}/5/broken.png", "truncated", "ingest")
    ]


def test_the_fault_switch_names_one_stage_and_a_key_substring(monkeypatch):
    monkeypatch.setenv(faults.INJECT_FAULT, "score:4/a:b")
    assert [faults.injected(stage) for stage in ("score", "embed", "ingest")] == ["4/a:b", "", ""]
    monkeypatch.setenv(faults.INJECT_FAULT, "score")
    assert faults.injected("score") == ""
    monkeypatch.delenv(faults.INJECT_FAULT)
    assert faults.injected("score") == ""


def test_fault_injection_is_no_config_key():
    with pytest.raises(ConfigError, match="unknown config key 'score.fault_inject_id_contains'"):
        Config().with_overrides({"score.fault_inject_id_contains": "ab"})


def test_python_worker_dying_on_one_image_quarantines_only_that_image(spark, tmp_path, source, monkeypatch):
    victim = sorted((source / "4").glob("mnist_*.png"))[1]
    config = make_config(tmp_path, ingest={"source": str(source)})
    clean = make_config(tmp_path / "clean", ingest={"source": str(source)})
    monkeypatch.setenv(faults.INJECT_FAULT, f"ingest:4/{victim.name}")

    summary = ingest.run(spark, config)

    monkeypatch.delenv(faults.INJECT_FAULT)
    ingest.run(spark, clean)
    images, quarantine = ingest_keys(spark, config)
    clean_images, _ = ingest_keys(spark, clean)
    victim_id = hashlib.sha256(victim.read_bytes()).hexdigest()
    assertDataFrameEqual(images, clean_images.filter(f"image_id != '{victim_id}'"))
    assert sorted(tuple(r) for r in quarantine.collect()) == sorted([
        (f"file:{source}/5/broken.png", "truncated", "ingest"),
        (f"file:{victim}", "worker_crash", "ingest"),
    ])
    assert summary.quarantined == {"truncated": 1, "worker_crash": 1}
    assert summary.new_images == 19


@pytest.mark.slow  # the ingest crash test covers faults.survive_worker_crashes in `make test`
def test_python_worker_dying_on_one_image_in_preprocess_quarantines_only_that_image(spark, tmp_path, source,
                                                                                    monkeypatch):
    config = make_config(tmp_path, ingest={"source": str(source)})
    ingest.run(spark, config)
    ids = sorted(r.image_id for r in lakehouse.read_table(spark, config, "images").collect())
    victim = ids[len(ids) // 2]
    monkeypatch.setenv(faults.INJECT_FAULT, f"preprocess:{victim}")

    summary = preprocess.run(spark, config)

    prepared = lakehouse.read_table(spark, config, "prepared").groupBy("image_id").count().collect()
    assert sorted(r.image_id for r in prepared) == [i for i in ids if i != victim]
    assert {r["count"] for r in prepared} == {1}
    quarantine = lakehouse.read_table(spark, config, "quarantine").where("stage = 'preprocess'")
    assert [tuple(r) for r in quarantine.select("image_id", "reason", "version").collect()] == [
        (victim, "worker_crash", summary.version)
    ]
    assert (summary.prepared, dict(summary.quarantined)) == (len(ids) - 1, {"worker_crash": 1})


def killed_and_rerun(spark, config: Config, conf: Path, stage: str, table: str, cwd: Path):
    """Kill `stage`'s driver once its Python workers run, count `table`'s rows then, rerun it:
    (the killed process, the rows after the kill, the rerun's completed process)."""
    proc = start_cli(conf, stage, cwd=cwd)
    kill_when(proc, lambda: python_workers_running(proc))
    rows_after_kill = (lakehouse.read_table(spark, config, table).count()
                       if lakehouse.table_exists(spark, config, table) else 0)
    return proc, rows_after_kill, run_cli(conf, stage, cwd=cwd)


@pytest.mark.slow  # `make test-all`; too long for `make test` on 2 cores
def test_preprocess_killed_mid_run_and_rerun_equals_a_clean_run(spark, tmp_path, source):
    config = make_config(tmp_path, ingest={"source": str(source)})
    ingest.run(spark, config)
    conf = write_conf(config, tmp_path / "conf.yaml")

    proc, rows_after_kill, rerun = killed_and_rerun(spark, config, conf, "preprocess", "prepared", tmp_path)

    assert proc.returncode == -signal.SIGKILL
    assert rows_after_kill == 0, "the kill must land before the tensors are committed"
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    clean = make_config(tmp_path / "clean", ingest={"source": str(source)})
    ingest.run(spark, clean)
    preprocess.run(spark, clean)

    def prepared(cfg: Config):
        return lakehouse.read_table(spark, cfg, "prepared").select(
            "image_id", "label", "label_index", "split", F.sha2("tensor", 256).alias("tensor_sha")
        )

    assertDataFrameEqual(prepared(config), prepared(clean))
    assert prepared(config).count() == 20


@pytest.mark.slow  # `make test-all`; too long for `make test` on 2 cores
def test_score_killed_mid_run_and_rerun_scores_every_image_exactly_once(spark, tmp_path, source):
    config = make_config(tmp_path, ingest={"source": str(source)}, train={"epochs": 1, "batch_size": 8})
    ingest.run(spark, config)
    preprocess.run(spark, config)
    trained = train.run(spark, config)
    conf = write_conf(config, tmp_path / "conf.yaml")

    proc, rows_after_kill, rerun = killed_and_rerun(spark, config, conf, "score", "predictions", tmp_path)

    assert proc.returncode == -signal.SIGKILL
    assert rows_after_kill == 0, "the kill must land before the predictions are merged"
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    predictions = lakehouse.read_table(spark, config, "predictions")
    images = lakehouse.read_table(spark, config, "images")
    assertDataFrameEqual(
        predictions.select("image_id", "model_name", "model_version"),
        images.select("image_id", F.lit("imageiq").alias("model_name"),
                      F.lit(str(trained.version)).alias("model_version")),
    )
    classifier = load_classifier(tracking.default_model_uri(config))
    rows = images.join(predictions, "image_id").select("content", "predicted_label").collect()
    probabilities, failures = classifier.predict_bytes([bytes(r.content) for r in rows])
    assert not failures
    assert [r.predicted_label for r in rows] == [classifier.labels[i] for i in probabilities.argmax(axis=1)]
