"""Every config we ship for a cluster passes the checks the stages make before any work: the k8s
configmap, the EMR steps and EMR Serverless jobs, the Databricks job in docs/platforms.md, and
every command line with `--set` in the manual and READMEs. A config that would exit 2 at `train`
after ingest and preprocess had run fails here instead."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from test_deploy import rendered

from imageiq_spark.core.config import Config, ConfigError, from_dict, load_config
from imageiq_spark.ml import readers

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted(REPO.glob("deploy/*/README.md"))]


def set_pairs(tokens: list[str]) -> list[str]:
    """The KEY=VALUE after each `--set` (EMR's `Args=[a,b,...]` shorthand split on commas)."""
    flat = [part for token in tokens for part in (
        token.partition("Args=[")[2].removesuffix("]").split(",") if "Args=[" in token else [token])]
    return [flat[i + 1] for i, token in enumerate(flat[:-1]) if token == "--set"]


def json_argument_lists(node: object) -> list[list[str]]:
    """Every list of strings in a JSON document that holds a `--set`."""
    if isinstance(node, dict):
        return [found for value in node.values() for found in json_argument_lists(value)]
    if isinstance(node, list):
        if node and all(isinstance(item, str) for item in node) and "--set" in node:
            return [node]
        return [found for item in node for found in json_argument_lists(item)]
    return []


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(body)))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def command_lines(text: str) -> list[str]:
    """Shell lines of fenced blocks that pass `--set`, backslash continuations joined (a prompt's
    `$ ` taken off; a program's output such as `imageiq: error: ...` left out)."""
    lines = [line.removeprefix("$ ") for language, body in fenced_blocks(text)
             if language in ("", "bash", "sh", "console")
             for line in body.replace("\\\n", " ").splitlines()]
    return [line for line in lines if "--set" in line and not line.split(" ", 1)[0].endswith(":")]


def shipped_configs() -> dict[str, Config]:
    base = REPO / "conf" / "local.yaml"
    configs = {"deploy/k8s/configmap.yaml": from_dict(yaml.safe_load(
        next(d for d in yaml.safe_load_all((REPO / "deploy/k8s/configmap.yaml").read_text())
             if d)["data"]["imageiq.yaml"]))}
    for path in sorted((REPO / "deploy/emr").glob("*.json")):
        for i, args in enumerate(json_argument_lists(rendered(path.name))):
            configs[f"{path.relative_to(REPO)}#{i}"] = load_config(base, set_pairs(args))
    for path in DOCUMENTS:
        text = path.read_text()
        json_blocks = [body for language, body in fenced_blocks(text) if language == "json"]
        for i, block in enumerate(json_blocks):
            for j, args in enumerate(json_argument_lists(json.loads(block))):
                configs[f"{path.relative_to(REPO)} json {i}#{j}"] = load_config(base, set_pairs(args))
        for i, line in enumerate(command_lines(text)):
            tokens = shlex.split(line, comments=True)
            configs[f"{path.relative_to(REPO)} line {i}"] = load_config(base, set_pairs(tokens))
    return configs


SHIPPED = shipped_configs()
ON_OBJECT_STORAGE = {name: c for name, c in SHIPPED.items() if readers.cache_root(c).startswith("s3")}


def test_the_cluster_configs_are_all_found():
    assert {"deploy/k8s/configmap.yaml", "deploy/emr/steps-train.json#0",
            "deploy/emr/serverless-train.json#0"} <= set(ON_OBJECT_STORAGE)
    assert any(name.startswith("docs/platforms.md json") for name in ON_OBJECT_STORAGE)
    assert any(name.startswith("docs/user_manual.md line") for name in SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_config_passes_the_checks_train_makes_before_any_work(name):
    readers.check_reader(SHIPPED[name])


@pytest.mark.parametrize("name", sorted(ON_OBJECT_STORAGE))
def test_a_cluster_config_names_the_reader_that_reads_its_cache(name):
    config = SHIPPED[name]

    assert config.train.reader == "arrow"
    with pytest.raises(ConfigError, match="train.reader"):
        readers.check_reader(config.with_overrides({"train.reader": "petastorm"}))


def test_set_pairs_reads_the_emr_shorthand_and_plain_arguments():
    line = ("aws emr add-steps --steps 'Type=Spark,Name=a b,Args=[--deploy-mode,cluster,job.py,--set,"
            "storage.root=s3://B/lake,--set,train.reader=arrow]'")

    assert set_pairs(shlex.split(line)) == ["storage.root=s3://B/lake", "train.reader=arrow"]
    assert set_pairs(["job.py", "--set", "a=1", "--set", "b=2"]) == ["a=1", "b=2"]
