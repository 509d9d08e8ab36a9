"""deploy/k8s: every manifest is valid offline (`kubernetes-validate --strict` for the built-in
kinds, the spark-operator CRD schema for the ScheduledSparkApplications, unknown fields refused),
and the manifests, the README's spark-submit lines and the code agree."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from imageiq_spark.core.config import from_dict

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
CRD_SCHEMA = REPO / "tests" / "data" / "spark-operator-scheduledsparkapplication.schema.json"
BUILTIN = ("configmap.yaml", "serve-deployment.yaml", "serve-service.yaml", "serve-hpa.yaml",
           "spark-rbac.yaml")
NIGHTLY = ("nightly-train.yaml", "nightly-score.yaml")
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(name: str) -> dict:
    (document,) = documents(name)
    return document


def strict(schema: dict) -> dict:
    """The CRD schema refusing unknown fields, as `kubectl apply --validate=strict` does."""
    schema = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))


def crd_errors(validator: jsonschema.Draft7Validator, document: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(document))


def test_every_manifest_is_checked_here():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(BUILTIN + NIGHTLY)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_manifests_pass_kubernetes_validate_strict(version):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", version,
         *(str(K8S / name) for name in BUILTIN)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in result.stdout.splitlines() if line.startswith("INFO") and " passed " in line]
    assert len(passed) == sum(len(documents(name)) for name in BUILTIN), result.stdout


def test_kubernetes_validate_strict_refuses_an_unknown_field():
    deployment = one("serve-deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def merge(base: dict, patch: dict) -> dict:
    """A strategic merge patch as kubectl applies it here: maps merge, containers merge by name."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "containers":
            by_name = {c["name"]: c for c in merged[key]}
            for container in value:
                by_name[container["name"]] = merge(by_name[container["name"]], container)
            merged[key] = list(by_name.values())
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_gpu_patch_gives_a_valid_deployment_with_one_gpu():
    patch = yaml.safe_load((K8S / "patches" / "serve-gpu.yaml").read_text())
    deployment = merge(one("serve-deployment.yaml"), patch)
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": 1}
    assert container["readinessProbe"] == one("serve-deployment.yaml")["spec"]["template"]["spec"][
        "containers"][0]["readinessProbe"]


@pytest.mark.parametrize("name", NIGHTLY)
def test_nightly_job_matches_the_spark_operator_crd(crd_validator, name):
    document = one(name)
    assert (document["apiVersion"], document["kind"]) == ("sparkoperator.k8s.io/v1beta2",
                                                          "ScheduledSparkApplication")
    assert crd_errors(crd_validator, document) == []


def test_crd_check_refuses_an_unknown_field(crd_validator):
    document = one("nightly-train.yaml")
    document["spec"]["template"]["executer"] = {"instances": 2}
    document["spec"]["template"]["driver"]["memory"] = 4
    assert crd_errors(crd_validator, document) == [
        "spec.template.driver.memory: 4 is not of type 'string'",
        "spec.template: Additional properties are not allowed ('executer' was unexpected)",
    ]


def test_pods_mount_a_config_the_code_accepts():
    config = from_dict(yaml.safe_load(one("configmap.yaml")["data"]["imageiq.yaml"]))
    assert (config.serve.host, config.serve.port) == ("0.0.0.0", 8080)
    assert config.storage.root.startswith("s3a://") and config.mlflow.tracking_uri.startswith("http")


def test_serving_deployment_probes_the_v2_health_routes_on_the_served_port():
    from imageiq_spark.serving.app import create_app

    deployment = one("serve-deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    args = container["args"]
    assert args[:4] == ["imageiq", "--conf", "/etc/imageiq/imageiq.yaml", "serve"]
    assert args[args.index("--port") + 1] == str(container["ports"][0]["containerPort"]) == "8080"
    app, _ = create_app(from_dict({}), "models:/unused@champion")
    routes = {route.path for route in app.app.app.routes}  # metrics, then the guard, then FastAPI
    assert {"/v2/health/ready", "/v2/health/live", "/metrics"} <= routes
    service = one("serve-service.yaml")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert one("serve-hpa.yaml")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def spark_submit_lines() -> list[list[str]]:
    text = (K8S / "README.md").read_text()
    return [shlex.split(line) for line in text.splitlines() if line.startswith("spark-submit ")]


def _options(argv: list[str]) -> tuple[dict[str, str], str, list[str]]:
    """(--conf settings, the application file, its arguments) of a spark-submit line."""
    confs, i = {}, 1
    while argv[i].startswith("--"):
        if argv[i] == "--conf":
            key, _, value = argv[i + 1].partition("=")
            confs[key] = value
        else:
            confs[argv[i]] = argv[i + 1]
        i += 2
    return confs, argv[i], argv[i + 1:]


@pytest.mark.parametrize("name", NIGHTLY)
def test_operator_and_spark_submit_run_the_same_job_the_same_way(name):
    template = one(name)["spec"]["template"]
    job = template["mainApplicationFile"]
    assert job.startswith("local:///opt/imageiq/jobs/")
    assert (REPO / "jobs" / Path(job).name).is_file()
    (line,) = [argv for argv in spark_submit_lines() if _options(argv)[1] == job]
    confs, _, arguments = _options(line)
    assert confs["--master"].startswith("k8s://") and confs["--deploy-mode"] == "cluster"
    assert confs["spark.kubernetes.container.image"] == template["image"]
    assert {k: v for k, v in confs.items() if k in template["sparkConf"]} == {
        k: v for k, v in template["sparkConf"].items() if k != "spark.databricks.delta.snapshotPartitions"}
    for jar in template["sparkConf"]["spark.jars"].split(","):  # the jars `make jars jars-s3` fetches
        assert jar.startswith("local:///opt/imageiq/jars/")
        assert (REPO / jar.removeprefix("local:///opt/imageiq/")).is_file(), jar
    overrides = dict(arguments[i + 1].split("=", 1) for i in range(0, len(arguments), 2))
    mounted = yaml.safe_load(one("configmap.yaml")["data"]["imageiq.yaml"])
    assert overrides == {"storage.root": mounted["storage"]["root"],
                         "ingest.source": mounted["ingest"]["source"],
                         "mlflow.tracking_uri": mounted["mlflow"]["tracking_uri"]}
    assert template["arguments"] == ["--conf", "/etc/imageiq/imageiq.yaml"]
    assert template["driver"]["configMaps"] == [{"name": "imageiq-config", "path": "/etc/imageiq"}]
