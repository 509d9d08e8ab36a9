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
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "imageiq_spark").rglob("*.py")}
    assert modules <= names
    data = {"py.typed", "log4j2.properties", "static/index.html"}  # the upload page, the driver JVM's logging
    assert {f"imageiq_spark/{name}" for name in data} <= names
    assert "[console_scripts]\nimageiq = imageiq_spark.cli:main" in entry_points
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    # Requirement objects: the metadata writes a range's bounds in its own order.
    assert [Requirement(r) for r in requires if "extra ==" not in r] == \
        [Requirement(r) for r in _requirements("requirements.txt")]
    assert [Requirement(r) for r in requires if 'extra == "local"' in r] == \
        [Requirement(f'{r}; extra == "local"') for r in _requirements("requirements-local.txt")]
    extras = {Requirement(r).name: r.split("extra == ")[1].strip('"') for r in requires
              if "extra ==" in r and 'extra == "local"' not in r}
    assert extras == {"petastorm": "petastorm", "mlxtend": "sample", "tensorflow": "cuda"}
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
                              "import imageiq_spark, tensorflow, cv2, mlflow, delta; "
                              "print(imageiq_spark.__file__)"],
                             capture_output=True, text=True, check=True, cwd=tmp_path)
    assert located.stdout.strip().startswith(str(env))


#: Declared for what they do at run time, not imported: Spark Connect's client (pyspark imports
#: them), uvicorn's C parser and event loop, and the multipart parser FastAPI's forms use.
RUNTIME_ONLY = {"grpcio-status", "googleapis-common-protos", "httptools", "uvloop", "python-multipart"}


def test_the_package_declares_every_package_it_imports_and_nothing_else():
    import ast
    import importlib.metadata

    imported: set[str] = set()
    for path in (REPO / "imageiq_spark").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    def normal(name: str) -> str:
        return name.lower().replace("_", "-")

    extras = {"delta": "delta-spark", "petastorm": "petastorm", "mlxtend": "mlxtend"}
    declared = {normal(Requirement(r).name) for r in _requirements("requirements.txt")} | set(extras.values())
    distributions = importlib.metadata.packages_distributions()
    third_party = imported - set(sys.stdlib_module_names) - {"imageiq_spark"}
    # A module several distributions provide (mlflow: mlflow, mlflow-skinny) needs one of them.
    needed = {extras.get(m) or next((normal(d) for d in distributions[m] if normal(d) in declared),
                                    normal(distributions[m][0])) for m in third_party}

    assert needed - declared == set()
    assert declared - needed - RUNTIME_ONLY == set()
