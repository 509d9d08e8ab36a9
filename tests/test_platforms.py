"""docs/platforms.md agrees with the code: its JSON blocks parse, the Databricks job runs files of
`jobs/` with a valid configuration, its YAML is a valid config, and the IAM policies grant S3 on
the lake prefix only, with every action they grant explained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from imageiq_spark.core.config import Config, from_dict, parse_set_argument

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "platforms.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), re.S)


def documents() -> list[dict]:
    return [json.loads(block) for block in blocks("json")]


def job() -> dict:
    (found,) = [d for d in documents() if "tasks" in d]
    return found


def policies() -> list[dict]:
    return [d for d in documents() if "Statement" in d]


def granted(policy: dict) -> list[str]:
    return [action for statement in policy["Statement"] for action in statement["Action"]]


def test_every_json_block_parses_into_the_job_or_a_policy():
    assert len(documents()) == 3
    assert len(policies()) == 2


def test_the_job_runs_python_files_of_jobs():
    files = [task["spark_python_task"]["python_file"] for task in job()["tasks"]]
    assert files == ["jobs/nightly_train.py", "jobs/nightly_score.py"]
    assert all((REPO / f).is_file() for f in files)


def test_the_job_parameters_are_a_valid_unity_catalog_configuration():
    for task in job()["tasks"]:
        parameters = task["spark_python_task"]["parameters"]
        assert parameters[::2] == ["--set"] * (len(parameters) // 2)
        config = Config().with_overrides(dict(parse_set_argument(p) for p in parameters[1::2]))
        assert (config.catalog.name, config.mlflow.registry_uri, config.mlflow.registered_model) == \
            ("main", "databricks-uc", "main.imageiq.digits")


def test_the_job_installs_the_wheel_as_a_library_without_an_init_script():
    cluster = job()["job_clusters"][0]["new_cluster"]
    assert "init_scripts" not in cluster
    libraries = [task["libraries"] for task in job()["tasks"]]
    assert all([list(library) for library in found] == [["whl"]] for found in libraries)
    assert {Path(found[0]["whl"]).name for found in libraries} == {"imageiq_spark-0.1.0-py3-none-any.whl"}


def test_the_local_metastore_yaml_is_a_valid_config():
    (block,) = blocks("yaml")
    config = from_dict(yaml.safe_load(block))
    hive = config.spark_conf["spark.sql.catalogImplementation"]
    assert (config.storage.root, config.catalog.name, hive) == ("/data/lake", "spark_catalog", "hive")


def test_policies_grant_s3_on_their_bucket_only():
    lake, artifacts = policies()
    for policy, bucket in ((lake, "BUCKET"), (artifacts, "ARTIFACT-BUCKET")):
        assert policy["Version"] == "2012-10-17"
        assert all(action.startswith("s3:") and "*" not in action for action in granted(policy))
        assert {s["Resource"] for s in policy["Statement"]} <= {f"arn:aws:s3:::{bucket}",
                                                               f"arn:aws:s3:::{bucket}/*",
                                                               f"arn:aws:s3:::{bucket}/imageiq/*"}
    objects = [s["Resource"] for s in lake["Statement"] if s["Resource"].endswith("*")]
    assert objects == ["arn:aws:s3:::BUCKET/imageiq/*"]


def test_every_granted_action_is_explained():
    explained = set(re.findall(r"^\| `(s3:\w+)`", PAGE.read_text(), re.M))
    assert {action for policy in policies() for action in granted(policy)} == explained
