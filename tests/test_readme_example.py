"""The README's command example runs as written on a fresh lake, and every command says on standard
error which config file and which absolute storage.root it works on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imageiq_spark import cli
from imageiq_spark.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
MARKER = "runs these lines as written):\n\n```bash\n"


def readme_commands() -> list[str]:
    block = (REPO / "README.md").read_text().split(MARKER, 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def where_line(folder: Path) -> str:
    return f"config file: {folder / 'conf' / 'local.yaml'}; storage.root: {(folder / 'lake').as_uri()}"


def test_a_command_logs_its_config_file_and_absolute_storage_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "local.yaml").write_text("storage:\n  root: ./lake\n")
    cli.configure_logging()

    cli.log_where(None, load_config())
    (tmp_path / "conf" / "local.yaml").unlink()
    cli.log_where(None, load_config())

    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(where_line(tmp_path))
    assert lines[1].endswith("config file: none (built-in defaults); storage.root: "
                             + (tmp_path / "lake").as_uri())


@pytest.mark.slow
def test_the_readme_example_runs_as_written_on_a_fresh_lake(tmp_path):
    # A fresh checkout's layout: its venv, its conf/, nothing else; the lake is ./lake.
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}

    results = []
    for line in readme_commands():
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, (line, done.stderr[-3000:])
        results.append(done)

    labels, _, trained, _, predictions, again = results[2:]
    assert labels.stdout.splitlines() == ["label,n", *(f"{digit},20" for digit in range(10))]
    assert "registered version: 1, alias: champion" in trained.stdout
    assert predictions.stdout.splitlines() == ["predictions", "200"]
    assert again.stdout.startswith("== train\nskipped: neither prepared's labelled train/val rows nor the "
                                   "training config changed since imageiq version 1")
    assert all(where_line(tmp_path) in done.stderr for done in results)
