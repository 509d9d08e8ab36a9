"""deploy/emr: every request file is a valid EMR / EMR Serverless API request (checked offline
against the service models botocore ships) and agrees with the code it deploys."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from imageiq_spark.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
EMR = REPO / "deploy" / "emr"
VALUES = {
    "BUCKET": "imageiq-test-bucket",
    "SUBNET_ID": "subnet-0123456789abcdef0",
    "CLUSTER_ID": "j-2AXXXXXXGAPLF",
    "APPLICATION_ID": "00fabcdefghij012",
    "EXECUTION_ROLE_ARN": "arn:aws:iam::123456789012:role/imageiq-emr-serverless",
    "MLFLOW_TRACKING_URI": "databricks",
}


def _load_tool():
    # deploy/emr is not a package: load the script the README runs, as a module.
    spec = importlib.util.spec_from_file_location("emr_request", EMR / "emr_request.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def rendered(name: str) -> dict:
    return tool.render(EMR / name, VALUES)


def spark_defaults(cluster: dict) -> dict[str, str]:
    (conf,) = [c for c in cluster["Configurations"] if c["Classification"] == "spark-defaults"]
    return conf["Properties"]


def test_every_json_file_is_a_known_request():
    assert sorted(p.name for p in EMR.glob("*.json")) == sorted(tool.REQUESTS)


@pytest.mark.parametrize("name", sorted(tool.REQUESTS))
def test_request_is_valid_against_botocore_service_model(name):
    service, operation = tool.REQUESTS[name]
    tool.validate(service, operation, rendered(name))  # raises ValueError listing every problem


def test_validation_rejects_unknown_keys_missing_members_and_bad_enums():
    cluster = rendered("cluster.json")
    cluster["Instances"]["InstanceGroups"][0]["InstanceRole"] = "PRIMARY"
    cluster["Instances"]["InstanceGroups"][1]["InstanceCount"] = "2"
    cluster["ReleaseLable"] = "emr-7.13.0"
    del cluster["Name"]
    with pytest.raises(ValueError) as err:
        tool.validate("emr", "RunJobFlow", cluster)
    message = str(err.value)
    assert 'Missing required parameter in input: "Name"' in message
    assert 'Unknown parameter in input: "ReleaseLable"' in message
    assert "InstanceGroups[1].InstanceCount" in message
    assert "InstanceGroups[0].InstanceRole, value: 'PRIMARY', valid values: MASTER, CORE, TASK" in message


def test_render_names_every_missing_placeholder():
    with pytest.raises(ValueError, match="cluster.json needs values for BUCKET, SUBNET_ID"):
        tool.render(EMR / "cluster.json", {})


def test_rendered_requests_hold_no_placeholder():
    for name in tool.REQUESTS:
        text = json.dumps(rendered(name))
        assert "@" not in text.replace("@environment", ""), name


def test_cluster_is_emr7_spark_with_gpu_core_nodes():
    cluster = rendered("cluster.json")
    assert re.fullmatch(r"emr-7\.\d+\.\d+", cluster["ReleaseLabel"])
    assert {"Name": "Spark"} in cluster["Applications"]
    groups = {g["InstanceRole"]: g for g in cluster["Instances"]["InstanceGroups"]}
    assert re.match(r"(g4dn|g5|g6|g6e|p3|p4d|p5)\.", groups["CORE"]["InstanceType"])
    defaults = spark_defaults(cluster)
    assert defaults["spark.executor.resource.gpu.amount"] == "1"
    # Tasks share the executor's GPU: one GPU split across all of its cores.
    assert float(defaults["spark.task.resource.gpu.amount"]) * int(defaults["spark.executor.cores"]) == 1.0
    yarn = [c for c in cluster["Configurations"] if c["Classification"] == "yarn-site"][0]["Properties"]
    assert yarn["yarn.resource-types"] == "yarn.io/gpu"
    assert yarn["yarn.nodemanager.resource-plugins"] == "yarn.io/gpu"


def test_bootstrap_installs_what_the_spark_defaults_point_to():
    cluster = rendered("cluster.json")
    (action,) = cluster["BootstrapActions"]
    script = action["ScriptBootstrapAction"]
    assert script["Path"] == "s3://imageiq-test-bucket/imageiq/deploy/bootstrap.sh"
    assert [Path(a).name for a in script["Args"]] == ["imageiq-env.tar.gz", "get_gpus_resources.sh"]
    text = (EMR / "bootstrap.sh").read_text()
    prefix = re.search(r"^PREFIX=(\S+)$", text, re.M).group(1)
    defaults = spark_defaults(cluster)
    assert defaults["spark.executor.resource.gpu.discoveryScript"] == f"{prefix}/get_gpus_resources.sh"
    assert defaults["spark.pyspark.python"] == f"{prefix}/env/bin/python"
    assert '-C "$PREFIX/env"' in text


def test_shell_scripts_parse():
    for script in ("bootstrap.sh", "get_gpus_resources.sh"):
        subprocess.run(["bash", "-n", str(EMR / script)], check=True)


def _job_and_args(argv: list[str]) -> tuple[str, list[str]]:
    (index,) = [i for i, a in enumerate(argv) if a.endswith(".py")]
    return argv[index], argv[index + 1:]


def _overrides(args: list[str]) -> list[str]:
    assert args[0::2] == ["--set"] * (len(args) // 2), args
    return args[1::2]


@pytest.mark.parametrize("name, job", [("steps-train.json", "nightly_train"),
                                       ("steps-score.json", "nightly_score")])
def test_steps_spark_submit_a_nightly_job_with_valid_config_keys(name, job):
    (step,) = rendered(name)["Steps"]
    argv = step["HadoopJarStep"]["Args"]
    assert step["HadoopJarStep"]["Jar"] == "command-runner.jar"
    assert argv[0] == "spark-submit" and "--master" not in argv
    path, args = _job_and_args(argv)
    assert path == f"s3://imageiq-test-bucket/imageiq/jobs/{job}.py"
    assert (REPO / "jobs" / f"{job}.py").is_file()
    config = load_config(REPO / "conf" / "local.yaml", _overrides(args))
    assert config.storage.root == "s3://imageiq-test-bucket/imageiq/lake"
    assert config.ingest.source == "s3://imageiq-test-bucket/imageiq/incoming/"
    assert config.mlflow.tracking_uri == "databricks"


@pytest.mark.parametrize("name, job", [("serverless-train.json", "nightly_train"),
                                       ("serverless-score.json", "nightly_score")])
def test_serverless_job_ships_the_packed_environment(name, job):
    driver = rendered(name)["jobDriver"]["sparkSubmit"]
    assert driver["entryPoint"] == f"s3://imageiq-test-bucket/imageiq/jobs/{job}.py"
    params = shlex.split(driver["sparkSubmitParameters"])
    assert params[params.index("--archives") + 1] == (
        "s3://imageiq-test-bucket/imageiq/dist/imageiq-env.tar.gz#environment"
    )
    confs = dict(params[i + 1].split("=", 1) for i, p in enumerate(params) if p == "--conf")
    assert confs["spark.emr-serverless.driverEnv.PYSPARK_PYTHON"] == "./environment/bin/python"
    assert confs["spark.executorEnv.PYSPARK_PYTHON"] == "./environment/bin/python"
    assert confs["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    config = load_config(REPO / "conf" / "local.yaml", _overrides(driver["entryPointArguments"]))
    assert config.storage.root == "s3://imageiq-test-bucket/imageiq/lake"


def test_serverless_application_runs_the_cluster_release():
    app = rendered("serverless-application.json")
    assert app["type"] == "SPARK"
    assert app["releaseLabel"] == rendered("cluster.json")["ReleaseLabel"]


def test_gpu_discovery_script_fails_without_nvidia_driver(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # a PATH with no nvidia-smi on it
    result = subprocess.run(["/bin/bash", str(EMR / "get_gpus_resources.sh")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "nvidia-smi not found" in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU and driver")
def test_gpu_discovery_script_lists_every_gpu():
    result = subprocess.run([str(EMR / "get_gpus_resources.sh")], capture_output=True, text=True,
                            check=True)
    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    count = len([line for line in gpus.stdout.splitlines() if line.startswith("GPU ")])
    assert json.loads(result.stdout) == {"name": "gpu", "addresses": [str(i) for i in range(count)]}


def _container_ignores(path: str) -> bool:
    """Whether .containerignore keeps `path` out of the build context (dockerignore patterns: `*`
    within one path segment; a matched folder takes everything under it)."""
    patterns = [line.strip() for line in (REPO / ".containerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*"), prefix)
               for p in patterns for prefix in prefixes)


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".venv-compat-3.5/bin/python", ".venv-compat-4.0/lib",
    "jars/compat-3.5/delta/delta.jar",
    "benchmarks/out/sizing-images/a.jpg", "lake/images", "imageiq_spark/__pycache__/x.pyc"])
def test_the_image_build_context_leaves_out_venvs_other_spark_lines_jars_and_outputs(path):
    # With vfs storage every layer is a full copy: a compat venv in the context costs gigabytes.
    assert _container_ignores(path)


@pytest.mark.parametrize("path", ["imageiq_spark/cli/__init__.py", "jars/delta/delta-spark.jar", "setup.py"])
def test_the_image_build_context_keeps_the_package_and_this_lines_jars(path):
    assert not _container_ignores(path)
