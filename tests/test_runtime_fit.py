"""Installing the wheel on a supported managed runtime changes none of the packages the runtime
ships. Each constraints/runtimes/*.txt holds a runtime's published Python library versions (its
release notes, cited in the file) and its `# python:` and `# spark:` lines; pip resolves the
wheel's requirements against it (`--dry-run --report`, nothing installed). The runtime provides
Spark, so pyspark is checked against the wheel's range instead of resolved. Where our ranges cannot
fit a runtime, the conflict is asserted as the manual's Supported versions table states it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = sorted((REPO / "constraints" / "runtimes").glob("*.txt"))

#: Runtimes whose shipped packages our ranges would change, and the packages pip may name first
#: (docs/user_manual.md, Supported versions): MLflow 3 (log_model(name=...), registry aliases)
#: replaces their mlflow-skinny 2; 15.4's pydantic 1 cannot hold the pydantic 2 config schema, and
#: its pillow 9.4 is under our tested floor of 10.
CONFLICTS = {"databricks-15.4-lts": ("pillow", "pydantic", "mlflow-skinny"),
             "databricks-16.4-lts": ("mlflow-skinny",)}
pytestmark = pytest.mark.slow  # about 20 s of pip resolution per runtime


def runtime_line(path: Path, key: str) -> str:
    (value,) = re.findall(rf"^# {key}: (\S+)$", path.read_text(), re.M)
    return value


def shipped(path: Path) -> dict[str, str]:
    pins = [Requirement(line) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {canonicalize_name(pin.name): str(next(iter(pin.specifier)).version) for pin in pins}


@pytest.fixture(scope="module")
def wheel_requirements(tmp_path_factory: pytest.TempPathFactory) -> list[Requirement]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(REPO), "-w", str(out)], check=True, capture_output=True)
    (wheel,) = out.glob("imageiq_spark-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    requirements = [Requirement(line.split(": ", 1)[1]) for line in lines
                    if line.startswith("Requires-Dist: ")]
    return [r for r in requirements if r.marker is None]


def resolve(requirements: list[Requirement], constraints: Path, report: Path) -> subprocess.CompletedProcess:
    listed = report.with_suffix(".in")
    listed.write_text("\n".join(str(r) for r in requirements) + "\n")
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--report", str(report), "-c", str(constraints), "-r", str(listed)],
        capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda p: p.stem)
def test_the_runtime_keeps_every_package_it_ships(runtime, wheel_requirements, tmp_path):
    spark = next(r for r in wheel_requirements if r.name == "pyspark")
    others = [r for r in wheel_requirements if r.name != "pyspark"]
    pins = shipped(runtime)
    assert Version(runtime_line(runtime, "spark")) in spark.specifier

    result = resolve(others, runtime, tmp_path / "report.json")

    if runtime.stem in CONFLICTS:
        assert result.returncode != 0
        output = result.stdout + result.stderr
        assert any(f"(constraint) {name}==" in output for name in CONFLICTS[runtime.stem]), output
        return
    assert result.returncode == 0, result.stderr
    installed = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                 for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    changed = {name: (version, installed[name]) for name, version in pins.items()
               if name in installed and installed[name] != version}
    assert changed == {}


def test_every_runtime_names_its_python_and_spark():
    assert len(RUNTIMES) == 6
    for runtime in RUNTIMES:
        assert re.fullmatch(r"3\.\d+", runtime_line(runtime, "python"))
        assert re.fullmatch(r"\d+\.\d+\.\d+", runtime_line(runtime, "spark"))


def test_the_cuda_extra_resolves_with_the_pinned_stack(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(tmp_path / "report.json"), "-c", str(REPO / "constraints.txt"),
         "tensorflow[and-cuda]"], capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stderr
    installed = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                 for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert installed["tensorflow"] == "2.21.0"
    assert any(name.startswith("nvidia-cudnn") for name in installed)
