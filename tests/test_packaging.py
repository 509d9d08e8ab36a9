"""The project wheel: what it holds, and that it installs into a clean venv where `imageiq` runs."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
                    str(REPO)], check=True, capture_output=True)
    (built,) = out.glob("imageiq_spark-*.whl")
    return built


def _requirements(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-"))]


def test_wheel_holds_the_package_entry_point_requirement_ranges_and_the_pinned_local_extra(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "imageiq_spark").glob("*.py")}
    assert modules <= names
    data = {"py.typed", "log4j2.properties", "static/index.html"}  # the upload page, the driver JVM's logging
    assert {f"imageiq_spark/{name}" for name in data} <= names
    assert "[console_scripts]\nimageiq = imageiq_spark.cli:main" in entry_points
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    # Requirement objects: the metadata writes a range's bounds in its own order.
    assert [Requirement(r) for r in requires if "extra ==" not in r] == \
        [Requirement(r) for r in _requirements("requirements.txt")]
    assert [Requirement(r) for r in requires if "extra ==" in r] == \
        [Requirement(f'{r}; extra == "local"') for r in _requirements("requirements-local.txt")]
    assert "Provides-Extra: local" in metadata
    assert "License: Apache-2.0" in metadata
    assert not any(n.startswith(("tests/", "jobs/", "benchmarks/")) for n in names)


@pytest.mark.slow  # `make test-all`; too long for `make test` on 2 cores
def test_wheel_installs_into_a_clean_venv_and_imageiq_help_runs(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    subprocess.run([str(env / "bin" / "pip"), "install", "-q", "-c", str(REPO / "constraints.txt"),
                    f"{wheel}[local]"], check=True, timeout=1200)
    result = subprocess.run([str(env / "bin" / "imageiq"), "--help"], capture_output=True, text=True,
                            check=True, cwd=tmp_path)
    assert result.stdout.startswith("usage: imageiq [-h] [--conf FILE] [--set KEY=VALUE] COMMAND")
    for command in ("sample-data", "ingest", "preprocess", "train", "evaluate", "score", "run-all", "sql"):
        assert command in result.stdout
    # The installed package, not the checkout, answers: run from outside the repository.
    located = subprocess.run([str(env / "bin" / "python"), "-c",
                              "import imageiq_spark, tensorflow, cv2, petastorm, mlflow, delta; "
                              "print(imageiq_spark.__file__)"],
                             capture_output=True, text=True, check=True, cwd=tmp_path)
    assert located.stdout.strip().startswith(str(env))
