"""The user manual agrees with the code: its config reference is the generated one, it covers
every command and job, and the architecture picture is rendered from its source."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from imageiq_spark.cli import build_parser, docs
from imageiq_spark.core.config import Config, flatten, to_dict

REPO = Path(__file__).resolve().parents[1]
MANUAL = REPO / "docs" / "user_manual.md"


def test_manual_holds_the_freshly_generated_config_reference():
    text = MANUAL.read_text()
    assert docs.reference() in text, (
        "docs/user_manual.md is stale: run `python -m imageiq_spark.cli.docs --write docs/user_manual.md`"
    )


def test_reference_has_one_row_per_config_key():
    keys = [key for key, *_ in docs.rows()]
    assert keys == list(flatten(to_dict(Config())))


def test_reference_defaults_read_back_as_the_real_defaults():
    defaults = flatten(to_dict(Config()))
    for key, _, default, _ in docs.rows():
        assert yaml.safe_load(default) == defaults[key], key


def test_reference_rows_carry_type_and_doc_comment():
    rows = {key: (tp, default, meaning) for key, tp, default, meaning in docs.rows()}
    assert rows["score.top_k"] == (
        "an integer", "3", "How many labels with probabilities each prediction keeps."
    )
    assert rows["ingest.source"][:2] == ("a string or null", "null")
    assert rows["train.model"][0].startswith("one of 'small_cnn', 'mobilenet_v2'")
    assert rows["preprocess.split.val"][2] == "Fraction used for early stopping and choosing the champion."


class _Inner(BaseModel):
    depth: int = 1


class _Outer(BaseModel):
    #: The section's own comment.
    inner: _Inner = _Inner()


def test_a_key_without_its_own_comment_takes_its_sections_comment():
    assert list(docs.rows(_Outer)) == [("inner.depth", "an integer", "1", "The section's own comment.")]


def test_check_flags_a_stale_manual_and_write_fixes_it(tmp_path):
    manual = tmp_path / "manual.md"
    manual.write_text(f"# Manual\n\n{docs.BEGIN}\n| `old.key` | x | y | z |\n{docs.END}\n\nmore text\n")
    assert docs.main(["--check", str(manual)]) == 1
    assert docs.main(["--write", str(manual)]) == 0
    assert docs.main(["--check", str(manual)]) == 0
    text = manual.read_text()
    assert "old.key" not in text
    assert text.startswith("# Manual\n\n") and text.endswith("\n\nmore text\n")
    assert "| `score.top_k` | an integer | `3` |" in text


def test_write_refuses_a_manual_without_markers(tmp_path):
    manual = tmp_path / "manual.md"
    manual.write_text("# Manual\n")
    with pytest.raises(ValueError, match="no config reference markers"):
        docs.main(["--write", str(manual)])


def test_manual_documents_every_command_and_job():
    text = MANUAL.read_text()
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for command in subcommands:
        assert f"\n  {command} " in text, command
    for job in sorted((REPO / "jobs").glob("*.py")):
        assert f"`jobs/{job.name}`" in text, job.name


def test_manual_spark_submit_lines_name_files_that_exist():
    text = MANUAL.read_text()
    for line in text.splitlines():
        if line.startswith("spark-submit --properties-file"):
            properties, job = line.split()[2], line.split()[3]
            assert (REPO / properties).is_file(), properties
            assert (REPO / job).is_file(), job


def test_local_spark_properties_point_at_the_project_jars_and_python():
    props = dict(
        line.split(None, 1) for line in (REPO / "conf" / "spark-local.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    for jar in props["spark.jars"].split(","):
        assert (REPO / jar).is_file(), jar
    assert props["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert Path(REPO / props["spark.pyspark.python"]).resolve() == Path(sys.executable).resolve()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz (apt-get install graphviz)")
def test_architecture_png_is_rendered_from_its_source():
    rendered = subprocess.run(
        ["dot", "-Tpng", "-Gdpi=110", str(REPO / "docs" / "architecture.dot")],
        capture_output=True, check=True,
    ).stdout
    committed = (REPO / "docs" / "architecture.png").read_bytes()
    assert _png_size(committed) == _png_size(rendered)


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_readme_lists_every_command_and_shows_the_example_and_monitoring_output():
    readme = (REPO / "README.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [name for name in commands if f"`imageiq {name}" not in readme]
    assert missing == []
    assert "tests/test_readme_example.py runs these lines as written" in readme
    assert "$ imageiq status\nlatest runs:" in readme
    assert "$ imageiq monitor --fail-on-alert" in readme
