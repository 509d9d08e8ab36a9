"""jobs/nightly_train.py and jobs/nightly_score.py as processes: exit codes, and (slow) the
manual's local spark-submit lines end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def run_job(job: str, *args: str, spark_submit: bool = False,
            timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    prefix = ([str(VENV_BIN / "spark-submit"), "--properties-file", "conf/spark-local.conf",
               "--conf", "spark.ui.enabled=false", "--master", "local[2]"]
              if spark_submit else [sys.executable])
    return subprocess.run([*prefix, f"jobs/{job}.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("job", ["nightly_train", "nightly_score"])
def test_config_error_exits_2_before_any_stage(job, tmp_path):
    result = run_job(job, "--set", f"storage.root={tmp_path}", "--set", "score.top_k=zero")
    assert result.returncode == 2
    assert "config key 'score.top_k' expects an integer, got 'zero'" in result.stderr
    assert "== " not in result.stdout


def test_nightly_train_rejects_the_score_only_model_option():
    result = run_job("nightly_train", "--model", "models:/imageiq@champion")
    assert result.returncode == 2
    assert "unrecognized arguments: --model" in result.stderr


@pytest.mark.slow  # `make test-all`; too long for `make test` on 2 cores
def test_manual_spark_submit_lines_run_the_nightly_jobs_locally(tmp_path):
    from imageiq_spark.cli.sample_data import write_sample_data

    write_sample_data(tmp_path / "sample", per_class=8)
    common = ["--conf", "conf/local.yaml", "--set", f"storage.root={tmp_path / 'lake'}",
              "--set", "train.epochs=2"]
    trained = run_job("nightly_train", *common, "--source", str(tmp_path / "sample"), spark_submit=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert re.findall(r"^== (\w+)$", trained.stdout, re.M) == ["ingest", "duplicates", "preprocess", "train",
                                                                "evaluate"]
    assert re.search(r"^new images:\s+80$", trained.stdout, re.M)
    assert "registered version: 1, alias: champion" in trained.stdout

    scored = run_job("nightly_score", *common, "--source", str(tmp_path / "sample"), spark_submit=True)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert re.findall(r"^== (\w+)$", scored.stdout, re.M) == ["ingest", "score", "monitor"]
    assert re.search(r"^new images:\s+0$", scored.stdout, re.M)  # nothing new since training
