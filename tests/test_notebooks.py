"""The notebooks run top to bottom (nbclient, the .venv kernel) on tiny real sample data.

Parameters are injected like papermill does: a cell after the one tagged `parameters` overrides
its values, so the notebooks themselves stay as a user opens them. The three share one lakehouse
and run in order: exploration ingests, training preprocesses and trains, evaluation evaluates.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PER_CLASS = 6
EPOCHS = 2



@pytest.fixture(scope="module")
def overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("notebooks")
    return [
        f"storage.root={root / 'lake'}",
        f"ingest.source={root / 'sample'}",
        f"catalog.database=nb_{uuid.uuid4().hex[:8]}",
        f"train.epochs={EPOCHS}",
        "spark_conf.spark.master=local[2]",
        "spark_conf.spark.ui.enabled=false",
        "spark_conf.spark.ui.showConsoleProgress=false",
        "spark_conf.spark.sql.shuffle.partitions=2",
        "spark_conf.spark.default.parallelism=2",
        "spark_conf.spark.driver.memory=2g",
    ]


def execute(name: str, parameters: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    (index,) = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters,
                                                                 metadata={"tags": ["injected-parameters"]}))
    # Raises CellExecutionError, with the cell and its traceback, when any cell fails.
    NotebookClient(notebook, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def text_of(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def png_count(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def test_data_exploration_ingests_and_pictures_the_sample(overrides):
    notebook = execute("data_exploration.ipynb",
                       f"OVERRIDES = {overrides!r}\nSAMPLE_PER_CLASS = {PER_CLASS}\nGRID_SIZE = 16")
    text = text_of(notebook)
    assert re.search(rf"new images:\s+{10 * PER_CLASS}\b", text)
    # The label-balance table: every digit with PER_CLASS images.
    balance = re.findall(r"^\d+\s+(\d)\s+(\d+)$", text, re.M)
    assert sorted(balance) == [(str(d), str(PER_CLASS)) for d in range(10)]
    assert png_count(notebook) == 2  # label balance chart and sample grid
    # The sample holds only good images: the quarantine summary is an empty table.
    assert "Empty DataFrame\nColumns: [stage, reason, count]" in text


@pytest.mark.slow  # `make test-all`; runs after data_exploration, whose lake it trains on
def test_model_training_trains_registers_and_plots_curves(overrides):
    notebook = execute("model_training.ipynb", f"OVERRIDES = {overrides!r}")
    text = text_of(notebook)
    assert re.search(rf"^prepared:\s+{10 * PER_CLASS}$", text, re.M)
    assert "registered version: 1, alias: champion" in text
    history = re.search(r"\{'loss': \[([^\]]*)\]", text)
    assert history and 1 <= len(history.group(1).split(",")) <= EPOCHS
    assert png_count(notebook) == 2  # split chart and training curves
    assert "[('1', ['champion']," in text


@pytest.mark.slow  # `make test-all`; too long for `make test` on 2 cores
def test_model_evaluation_fills_the_table_and_draws_the_confusion_matrix(overrides):
    notebook = execute("model_evaluation.ipynb", f"OVERRIDES = {overrides!r}\nMODEL_URI = None")
    text = text_of(notebook)
    assert "model:        imageiq version 1" in text
    evaluated = int(re.search(r"^split:\s+test \((\d+) images\)$", text, re.M).group(1))
    assert evaluated > 0
    # The matrix rebuilt from the evaluations table holds every evaluated test image.
    diagonal, total = map(int, re.search(r"(\d+) of (\d+) test images on the diagonal", text).groups())
    assert total == evaluated and 0 <= diagonal <= total
    accuracy = float(re.search(r"^test accuracy: ([\d.]+)$", text, re.M).group(1))
    assert accuracy == pytest.approx(diagonal / total, abs=1e-4)
    # Confusion matrix, per-class chart, reliability diagram, confident mistakes.
    assert png_count(notebook) == 4
