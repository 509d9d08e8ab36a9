"""The wheel respects a platform's runtime: installed where Spark 3.5 and its pyarrow, numpy and
pandas already are (a Databricks or EMR cluster), pip keeps Spark, pyarrow and pandas; with the
runtime's own packages as constraints (`pip freeze`), it keeps every one. Needs PyPI."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What a Spark 3.5 runtime brings, each inside the wheel's ranges but not the `[local]` pins.
RUNTIME = {"pyspark": "3.5.7", "pyarrow": "14.0.1", "numpy": "1.26.3", "pandas": "2.2.3"}


def pip(env: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # downloads Spark 3.5 (about 320 MB) the first time
def test_installing_the_wheel_on_a_spark_35_runtime_keeps_its_packages(tmp_path):
    reachable = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "pyspark"],
                               capture_output=True, text=True, timeout=120)
    if reachable.returncode != 0:
        pytest.skip(f"PyPI is not reachable: {reachable.stderr.strip()[-200:]}")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
                    str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("imageiq_spark-*.whl")
    env = tmp_path / "runtime"
    venv.create(env, with_pip=True)
    runtime = pip(env, "install", "-q", *(f"{name}=={version}" for name, version in RUNTIME.items()))
    assert runtime.returncode == 0, runtime.stderr[-3000:]

    frozen = tmp_path / "runtime.txt"
    frozen.write_text(pip(env, "freeze").stdout)

    plain, constrained = (planned_installs(env, wheel, tmp_path / f"{name}.json", *options)
                          for name, options in (("plain", ()), ("constrained", ("-c", str(frozen)))))

    assert "imageiq-spark" in plain and "imageiq-spark" in constrained
    assert "delta-spark" not in plain  # the platform's Delta; `[local]` brings one for local use
    # Alone, pip keeps Spark, pyarrow and pandas; the newest scipy (via scikit-learn) asks for
    # numpy >= 1.26.4, so numpy may move unless the runtime is given as constraints.
    assert {name: plain[name] for name in ("pyspark", "pyarrow", "pandas") if name in plain} == {}
    assert {name: constrained[name] for name in RUNTIME if name in constrained} == {}


def planned_installs(env: Path, wheel: Path, report: Path, *options: str) -> dict[str, str]:
    """name -> version of what `pip install` would install, from its dry-run report."""
    planned = pip(env, "install", "--dry-run", "--quiet", "--report", str(report), *options, str(wheel))
    assert planned.returncode == 0, planned.stderr[-3000:]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}
