"""The container image (`make image`): it runs `imageiq serve` on a registered model and answers
over 127.0.0.1 with what the same model gives in this process. Slow; `make test-image` builds the
image, then runs this."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import cv2
import pytest
import requests
from cluster import free_port
from conftest import make_config
from registered import register

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.ml.classifier import load_classifier

IMAGE = os.environ.get("IMAGEIQ_IMAGE", "localhost/imageiq:0.1.0")
CONTAINER = Path(__file__).resolve().parents[1] / "deploy" / "container"
# The podman settings `make image` builds with (runc, cgroupfs, vfs storage).
os.environ.setdefault("CONTAINERS_CONF", str(CONTAINER / "containers.conf"))
os.environ.setdefault("CONTAINERS_STORAGE_CONF", str(CONTAINER / "storage.conf"))


def _image_exists() -> bool:
    return shutil.which("podman") is not None and subprocess.run(
        ["podman", "image", "exists", IMAGE], capture_output=True).returncode == 0


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _image_exists(), reason=f"needs podman and {IMAGE} (make test-image)")]


def test_container_serves_the_registered_model_over_loopback(spark, tmp_path):
    """As shipped (deploy/k8s/serve-deployment.yaml): its own non-root user, a read-only root file
    system with a writable /tmp, the lake mounted."""
    config = make_config(tmp_path, mlflow={"registered_model": "digits"})
    register(spark, config, seed=1)
    lake = config.storage.root  # mounted at the same path: the registry stores absolute artifact URIs
    # The image's user (uid 10001) writes the request log beside the tables.
    subprocess.run(["chmod", "-R", "a+rwX", lake], check=True)
    port, name = free_port(), f"imageiq-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["podman", "run", "-d", "--rm", "--name", name, "--read-only", "--tmpfs", "/tmp",
         "-p", f"127.0.0.1:{port}:8080",
         "-v", f"{lake}:{lake}", IMAGE, "imageiq", "--set", f"storage.root={lake}",
         "--set", "mlflow.registered_model=digits", "serve", "--host", "0.0.0.0", "--port", "8080"],
        check=True, capture_output=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        digit = cv2.imencode(".png", load_digits()[0][0])[1].tobytes()
        response = requests.post(f"{url}/predict", data=digit, headers={"Content-Type": "image/png"},
                                 timeout=60)
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True).stderr
        user = subprocess.run(["podman", "exec", name, "id", "-u"], capture_output=True, text=True).stdout
        assert response.status_code == 200, logs
        assert user.strip() == "10001"
    finally:
        subprocess.run(["podman", "stop", "-t", "10", name], capture_output=True)
    classifier = load_classifier("models:/digits/1")
    (top,) = classifier.top_k(classifier.predict_bytes([digit])[0], 3)
    answer = response.json()
    assert (answer["model_name"], answer["model_version"]) == ("digits", "1")
    assert answer["predicted_label"] == top[0][0]
    assert answer["confidence"] == pytest.approx(top[0][1], abs=1e-5)
