"""imageiq serve: a real server process on 127.0.0.1 (`imageiq serve` as users start it) serving a
real small CNN from a real MLflow registry (SQLite under tmp_path), checked against batch scoring
of the same images, under load while the champion alias moves, and in a real headless browser."""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import yaml
from cluster import free_port
from conftest import make_config
from prometheus_client.parser import text_string_to_metric_families
from pyspark.sql import functions as F
from registered import LABELS, register

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.core.config import to_dict
from imageiq_spark.lake import lakehouse
from imageiq_spark.stages import ingest, score

IMAGEIQ = Path(sys.executable).parent / "imageiq"
AGREEMENT, AGREEMENT_SLOW = 50, 200  # images compared over HTTP and in `predictions`
MAX_BYTES = 100_000
MAX_PIXELS = 1_000_000
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class ServerProcess:
    """`imageiq --conf FILE serve --port P` in a subprocess. From its start a thread records the
    (live, ready) status codes it answers until it is ready, in `readiness`."""

    def __init__(self, root: Path, config, *args: str, timeout: float = 180,
                 env: dict[str, str] | None = None) -> None:
        conf = root / f"serve-{uuid.uuid4().hex[:6]}.yaml"
        conf.write_text(yaml.safe_dump(to_dict(config)))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"{conf.stem}.log"
        self.process = subprocess.Popen(
            [str(IMAGEIQ), "--conf", str(conf), "serve", "--port", str(self.port), *args],
            cwd=root, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"),
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2",
                 **(env or {})},
        )
        self.readiness: list[tuple[int, int]] = []
        self._watcher = threading.Thread(target=self._watch, args=(timeout,), daemon=True)
        self._watcher.start()

    def _watch(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                live = requests.get(f"{self.url}/v2/health/live", timeout=5).status_code
                ready = requests.get(f"{self.url}/v2/health/ready", timeout=5).status_code
            except requests.ConnectionError:
                time.sleep(0.1)
                continue
            self.readiness.append((live, ready))
            if ready == 200:
                return
            time.sleep(0.1)

    def wait_ready(self) -> ServerProcess:
        self._watcher.join()
        if not self.readiness or self.readiness[-1][1] != 200:
            self.stop()
            raise RuntimeError(f"imageiq serve did not get ready (exit {self.process.returncode}):\n"
                               f"{self.log_text()}")
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> bool:
        """SIGTERM; True when the server finished its requests and shut down in order (uvicorn
        then re-raises the signal, so the exit status is -SIGTERM)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return "Application shutdown complete" in self.log_text()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose structure and CRCs are sound (so the header probe passes) around any IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def write_digits(source: Path, indices: range) -> None:
    """Real digits as files `source/<label>/<i>.png`, every third one a JPEG."""
    digits, labels = load_digits()
    for i in indices:
        folder = source / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i}.{'jpg' if i % 3 == 0 else 'png'}"), digits[i])


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """AGREEMENT real digits ingested, a registered champion (version 1), and the server started
    on it while ingest runs."""
    root = tmp_path_factory.mktemp("serve")
    source = root / "source"
    write_digits(source, range(AGREEMENT))
    config = make_config(
        root, ingest={"source": str(source), "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS},
        mlflow={"registered_model": f"serve_{uuid.uuid4().hex[:8]}"},
        serve={"alias_poll_s": 0.5, "request_log": True, "request_log_flush_s": 0.5,
               "max_images_per_request": 8, "max_batch_size": 8, "max_wait_ms": 20,
               "max_body_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS},
    )
    register(spark, config, seed=1)
    server = ServerProcess(root, config)
    ingest.run(spark, config)
    yield root, config, server.wait_ready()
    assert server.stop(), server.log_text()


@pytest.fixture(scope="module")
def url(lake) -> str:
    return lake[2].url


@pytest.fixture(scope="module")
def images(spark, lake) -> list[tuple[str, str, bytes]]:
    """(image_id, format, bytes) of the ingested images, in image_id order."""
    _, config, _ = lake
    rows = lakehouse.read_table(spark, config, "images").orderBy("image_id").collect()
    return [(r.image_id, r.format, bytes(r.content)) for r in rows]


def scored_by_version_1(spark, config) -> dict[str, object]:
    """`score.run` with version 1, then its rows in `predictions` by image_id."""
    score.run(spark, config, f"models:/{config.mlflow.registered_model}/1")
    rows = lakehouse.read_table(spark, config, "predictions").where("model_version = '1'").collect()
    return {r.image_id: r for r in rows}


@pytest.fixture(scope="module")
def batch(spark, lake) -> dict[str, object]:
    return scored_by_version_1(spark, lake[1])


def post_image(url: str, data: bytes, content_type: str = "image/png",
               session: requests.Session | None = None) -> requests.Response:
    return (session or requests).post(f"{url}/predict", data=data,
                                      headers={"Content-Type": content_type}, timeout=60)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples `name` whose labels include `labels`, from /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def assert_agrees(online: dict, row) -> None:
    assert online["image_id"] == row.image_id
    assert online["predicted_label"] == row.predicted_label
    assert online["confidence"] == pytest.approx(row.confidence, abs=1e-5)
    assert [t["label"] for t in online["top_k"]] == [t.label for t in row.top_k]
    assert [t["probability"] for t in online["top_k"]] == pytest.approx(
        [t.probability for t in row.top_k], abs=1e-5)
    assert (online["model_name"], online["model_version"]) == (row.model_name, row.model_version)


def check_agreement(url: str, images, batch) -> None:
    def ask(item):
        _, fmt, data = item
        return post_image(url, data, f"image/{fmt}")

    with ThreadPoolExecutor(8) as pool:  # concurrent: answers come from gathered batches
        responses = list(pool.map(ask, images))
    assert [r.status_code for r in responses] == [200] * len(images)
    for (image_id, _, _), response in zip(images, responses):
        assert_agrees(response.json(), batch[image_id])


# --- start-up ---------------------------------------------------------------------------------


def test_readiness_is_false_until_the_model_is_loaded(lake):
    readiness = lake[2].readiness
    assert readiness[-1] == (200, 200)
    assert (200, 503) in readiness  # alive, answering, and saying it is not ready yet


def test_serve_with_a_model_not_in_the_registry_exits_2(lake, tmp_path):
    _, config, _ = lake
    conf = tmp_path / "serve.yaml"
    conf.write_text(yaml.safe_dump(to_dict(config)))
    result = subprocess.run([str(IMAGEIQ), "--conf", str(conf), "serve", "--model", "models:/nope@champion"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--model 'models:/nope@champion' is not in the registry" in result.stderr


# --- batch and online agree -------------------------------------------------------------------


def test_http_answers_equal_the_predictions_table(url, images, batch):
    assert len(images) == AGREEMENT
    check_agreement(url, images, batch)


@pytest.mark.slow
def test_http_answers_equal_the_predictions_table_for_200_images(spark, lake, url):
    root, config, _ = lake
    write_digits(root / "more", range(AGREEMENT, AGREEMENT_SLOW))
    ingest.run(spark, config.with_overrides({"ingest.source": str(root / "more")}))
    rows = lakehouse.read_table(spark, config, "images").collect()
    assert len(rows) == AGREEMENT_SLOW
    check_agreement(url, [(r.image_id, r.format, bytes(r.content)) for r in rows],
                    scored_by_version_1(spark, config))


# --- each route and content type --------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "application/octet-stream"])
def test_raw_body_of_each_content_type(url, images, batch, content_type):
    image_id, _, data = images[1]
    response = post_image(url, data, content_type)
    assert response.status_code == 200
    assert_agrees(response.json(), batch[image_id])


def test_multipart_with_several_files_answers_each_in_order(url, images, batch):
    chosen = images[2:5]
    files = [("files", (f"{i}.{fmt}", data, f"image/{fmt}")) for i, (_, fmt, data) in enumerate(chosen)]
    response = requests.post(f"{url}/predict", files=files, timeout=60)
    assert response.status_code == 200
    answers = response.json()["predictions"]
    assert [a["filename"] for a in answers] == [f"{i}.{fmt}" for i, (_, fmt, _) in enumerate(chosen)]
    for answer, (image_id, _, _) in zip(answers, chosen):
        assert_agrees(answer, batch[image_id])


def test_v2_health_and_metadata(url, lake):
    _, config, _ = lake
    name = config.mlflow.registered_model
    assert requests.get(f"{url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert requests.get(f"{url}/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = requests.get(f"{url}/v2/models/{name}").json()
    assert (meta["name"], meta["versions"]) == (name, ["1"])
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["probabilities"] == [-1, 10]
    assert meta["outputs"][2]["parameters"]["labels"] == LABELS
    assert requests.get(f"{url}/v2/models/{name}/versions/1").json() == meta
    assert requests.get(f"{url}/v2/models/{name}/ready").json() == {"name": name, "ready": True}
    assert requests.get(f"{url}/v2/models/{name}/versions/1/ready").status_code == 200


def test_v2_unknown_model_or_version_is_404(url, lake):
    name = lake[1].mlflow.registered_model
    assert requests.get(f"{url}/v2/models/other").status_code == 404
    response = requests.get(f"{url}/v2/models/{name}/versions/7/ready")
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_model"


def check_infer(response: requests.Response, chosen, batch, request_id: str) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == request_id and body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["image_id"]["data"] == [image_id for image_id, _, _ in chosen]
    assert outputs["label"]["data"] == [batch[i].predicted_label for i, _, _ in chosen]
    probs = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert probs.shape == (len(chosen), 10)
    for row, (image_id, _, _) in zip(probs, chosen):
        assert row.max() == pytest.approx(batch[image_id].confidence, abs=1e-5)
        assert LABELS[int(row.argmax())] == batch[image_id].predicted_label


def test_v2_infer_with_base64_json(url, lake, images, batch):
    name = lake[1].mlflow.registered_model
    chosen = images[5:8]
    request = {"id": "r1", "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                       "data": [base64.b64encode(d).decode() for _, _, d in chosen]}]}
    check_infer(requests.post(f"{url}/v2/models/{name}/infer", json=request, timeout=60), chosen, batch, "r1")


def test_v2_infer_with_binary_tensor_extension(url, lake, images, batch):
    name = lake[1].mlflow.registered_model
    chosen = images[8:10]
    raw = b"".join(struct.pack("<I", len(d)) + d for _, _, d in chosen)
    header = json.dumps({"id": "r2", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                                 "parameters": {"binary_data_size": len(raw)}}]}).encode()
    response = requests.post(f"{url}/v2/models/{name}/versions/1/infer", data=header + raw, timeout=60,
                             headers={"Content-Type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))})
    check_infer(response, chosen, batch, "r2")


def test_upload_page_is_served_without_external_resources(url):
    response = requests.get(f"{url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'type="file"' in response.text
    assert "http://" not in response.text and "https://" not in response.text


# --- bad input --------------------------------------------------------------------------------


@functools.cache
def _digit_png() -> bytes:
    return cv2.imencode(".png", load_digits()[0][0])[1].tobytes()


def _corrupt_png() -> bytes:
    data = bytearray(_digit_png())
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    return bytes(data)


BAD_INPUTS = {
    "empty": (lambda: b"", 422, "empty"),
    "text": (lambda: b"hello, not an image", 422, "not_image"),
    "truncated": (lambda: _digit_png()[:60], 422, "truncated"),
    "corrupt": (_corrupt_png, 422, "corrupt"),
    "undecodable": (lambda: crafted_png(8, 8, b"not zlib data"), 422, "decode_failed"),
    "bomb": (lambda: crafted_png(20_000, 20_000, b"x"), 422, "too_many_pixels"),
    "oversized": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES), 413, "too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_raw_body_gets_the_ingest_reason_code(url, case):
    make, status, reason = BAD_INPUTS[case]
    response = post_image(url, make())
    assert (response.status_code, response.json()["error"]) == (status, reason)
    assert requests.get(f"{url}/v2/health/ready").status_code == 200


def test_bad_file_in_multipart_names_the_file(url):
    files = [("files", ("good.png", _digit_png(), "image/png")),
             ("files", ("bad.png", b"hello", "image/png"))]
    response = requests.post(f"{url}/predict", files=files, timeout=60)
    assert response.status_code == 422
    assert response.json() == {"error": "not_image", "detail": "image 1: unknown signature 68656c6c6f"}


def test_oversized_file_in_multipart_is_413(url):
    files = [("files", ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES), "image/png"))]
    response = requests.post(f"{url}/predict", files=files, timeout=60)
    assert (response.status_code, response.json()["error"]) == (413, "too_large")


def test_too_many_images_in_one_request_is_413(url):
    files = [("files", (f"{i}.png", _digit_png(), "image/png")) for i in range(9)]
    response = requests.post(f"{url}/predict", files=files, timeout=60)
    assert (response.status_code, response.json()["error"]) == (413, "too_many_images")


def test_unsupported_content_type_is_415(url):
    response = post_image(url, b'{"a": 1}', "application/json")
    assert (response.status_code, response.json()["error"]) == (415, "unsupported_media_type")


@pytest.mark.parametrize("request_body", [
    {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
    {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]},
    {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
    {"no_inputs": []},
], ids=["not-bytes", "shape-mismatch", "not-base64", "no-inputs"])
def test_malformed_v2_infer_is_422(url, lake, request_body):
    name = lake[1].mlflow.registered_model
    response = requests.post(f"{url}/v2/models/{name}/infer", json=request_body, timeout=60)
    assert (response.status_code, response.json()["error"]) == (422, "bad_request")


def test_bad_image_in_v2_infer_gets_its_reason(url, lake):
    name = lake[1].mlflow.registered_model
    request = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                           "data": [base64.b64encode(_corrupt_png()).decode()]}]}
    response = requests.post(f"{url}/v2/models/{name}/infer", json=request, timeout=60)
    assert (response.status_code, response.json()["error"]) == (422, "corrupt")


# --- metrics and the request log --------------------------------------------------------------


def predict_counters(url: str) -> dict[str, float]:
    """The server's counters of /predict requests, images and batched forward passes."""
    return {
        "ok": metric(url, "imageiq_serve_requests_total", route="/predict", status="200"),
        "bad": metric(url, "imageiq_serve_requests_total", route="/predict", status="422"),
        "images": metric(url, "imageiq_serve_images_total", outcome="ok"),
        "not_image": metric(url, "imageiq_serve_images_total", outcome="not_image"),
        "latency": metric(url, "imageiq_serve_request_duration_seconds_count", route="/predict"),
        "batched": metric(url, "imageiq_serve_batch_size_sum"),
    }


def test_metrics_count_what_was_sent(url, lake, images):
    name = lake[1].mlflow.registered_model
    before = predict_counters(url)
    for _, fmt, data in images[:5]:
        assert post_image(url, data, f"image/{fmt}").status_code == 200
    files = [("files", (f"{i}.png", d, "image/png")) for i, (_, _, d) in enumerate(images[:3])]
    assert requests.post(f"{url}/predict", files=files, timeout=60).status_code == 200
    for _ in range(2):
        assert post_image(url, b"hello").status_code == 422
    after = predict_counters(url)
    assert {key: after[key] - before[key] for key in before} == {
        "ok": 6, "bad": 2, "images": 8, "not_image": 2, "latency": 8, "batched": 8}
    assert metric(url, "imageiq_serve_model_info", model_name=name, model_version="1") == 1
    assert metric(url, "imageiq_serve_ready") == 1


def test_concurrent_requests_share_forward_passes_of_bounded_size(url, images):
    passes = metric(url, "imageiq_serve_batch_size_count")
    within = metric(url, "imageiq_serve_batch_size_bucket", le="8.0")
    start = threading.Barrier(24)

    def ask(i: int) -> int:
        _, fmt, data = images[i]
        start.wait()
        return post_image(url, data, f"image/{fmt}").status_code

    with ThreadPoolExecutor(24) as pool:
        assert list(pool.map(ask, range(24))) == [200] * 24
    passes = metric(url, "imageiq_serve_batch_size_count") - passes
    assert 3 <= passes < 24  # gathered, at most serve.max_batch_size = 8 images each
    assert metric(url, "imageiq_serve_batch_size_bucket", le="8.0") - within == passes


def gathered(recent_images: int, queued: int, arriving_after_s: float | None = None,
             running: int = 0) -> tuple[int, float]:
    """(images in the batch a MicroBatcher (at most 8 images, 0.5 s wait, two workers) gathers,
    seconds it took), after `recent_images` were in the server at once, with `queued` one-image jobs
    waiting, `running` forward passes under way and, if given, as many jobs again arriving after
    `arriving_after_s`."""
    import asyncio

    from imageiq_spark.serving.batcher import MicroBatcher, _Job

    model = object()

    async def scenario() -> tuple[int, float]:
        batcher = MicroBatcher(max_batch=8, max_wait_s=0.5, observe=lambda n: None, workers=2)
        batcher.running = running
        batcher.entered(recent_images)
        batcher.left(recent_images - queued)
        loop = asyncio.get_running_loop()
        job = lambda: _Job(model, np.zeros((1, 2, 2, 3), np.uint8), loop.create_future())  # noqa: E731
        for _ in range(queued):
            batcher._queue.put_nowait(job())
        if arriving_after_s is not None:
            arrive = lambda: [batcher._queue.put_nowait(job()) for _ in range(queued)]  # noqa: E731
            loop.call_later(arriving_after_s, arrive)
        started = loop.time()
        jobs = await batcher._gather()
        return sum(len(j.tensors) for j in jobs), loop.time() - started

    return asyncio.run(scenario())


def test_a_lone_request_is_forwarded_without_waiting():
    size, waited = gathered(recent_images=1, queued=1)
    assert size == 1 and waited < 0.1


def test_under_concurrent_load_a_batch_waits_for_the_answered_clients_to_come_back():
    size, waited = gathered(recent_images=8, queued=4, arriving_after_s=0.05)
    assert size == 8 and 0.04 < waited < 0.4


def test_while_another_forward_pass_runs_a_free_worker_takes_the_queued_requests_at_once():
    size, waited = gathered(recent_images=8, queued=4, arriving_after_s=0.05, running=1)
    assert size == 4 and waited < 0.04


def test_the_wait_for_a_fuller_batch_is_bounded_by_max_wait():
    size, waited = gathered(recent_images=8, queued=2)  # nobody comes back
    assert size == 2 and 0.45 < waited < 1.0


def test_request_log_is_readable_by_spark(spark, url, lake, images):
    _, config, _ = lake
    answers = [post_image(url, data, f"image/{fmt}").json() for _, fmt, data in images[10:13]]
    path = lakehouse.lake_path(config, "request_log")
    ids = [a["image_id"] for a in answers]
    deadline = time.monotonic() + 30
    while True:  # the server writes its buffer every serve.request_log_flush_s
        rows = []
        if Path(path.removeprefix("file://")).exists():
            rows = spark.read.parquet(path).where(F.col("image_id").isin(ids)).collect()
        if len(rows) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    logged = {r.image_id: r for r in rows}
    assert sorted(logged) == sorted(ids)
    for answer in answers:
        row = logged[answer["image_id"]]
        assert (row.predicted_label, row.model_version, row.route) == (
            answer["predicted_label"], "1", "/predict")
        assert row.confidence == answer["confidence"]
        assert [(t.label, t.probability) for t in row.top_k] == [
            (t["label"], t["probability"]) for t in answer["top_k"]]
        assert row.request_date == row.requested_at.date()


# --- the upload page in a real browser --------------------------------------------------------


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs Debian's chromium and chromium-driver (make browser)")
def test_upload_page_shows_the_predicted_label(url, images, batch, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1100,700"):
        options.add_argument(flag)
    chosen = images[20:23]
    paths = []
    for image_id, fmt, data in chosen:
        path = tmp_path / f"digit-{image_id[:8]}.{fmt}"
        path.write_bytes(data)
        paths.append(path)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(f"{url}/")
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(
            By.CSS_SELECTOR, '.result[data-status="done"]')) == len(paths))
        WebDriverWait(driver, 30).until(lambda d: "version 1" in d.find_element(By.ID, "model").text)
        shown = {card.find_element(By.CLASS_NAME, "name").text: card.find_element(By.CLASS_NAME, "label").text
                 for card in driver.find_elements(By.CLASS_NAME, "result")}
        driver.save_screenshot(str(tmp_path / "upload_page.png"))
    finally:
        driver.quit()
    assert shown == {p.name: batch[image_id].predicted_label for p, (image_id, _, _) in zip(paths, chosen)}


# --- the alias moves under load (last: it changes what the shared server serves) ---------------


def test_alias_switch_under_load_drops_no_request(spark, url, lake, images):
    _, config, _ = lake
    stop = threading.Event()
    seen: list[list[tuple[int, str | None]]] = [[] for _ in range(4)]

    def load(worker: int) -> None:
        with requests.Session() as session:
            i = worker
            while not stop.is_set():
                _, fmt, data = images[i % len(images)]
                response = post_image(url, data, f"image/{fmt}", session)
                seen[worker].append((response.status_code, response.json().get("model_version")))
                i += 4

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        register(spark, config, seed=2)
        deadline = time.monotonic() + 120
        while not all(s and s[-1][1] == "2" for s in seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    answers = [a for s in seen for a in s]
    assert {status for status, _ in answers} == {200}
    for s in seen:  # each client sees version 1, then version 2, never back
        versions = [v for _, v in s]
        assert versions == sorted(versions) and versions[0] == "1" and versions[-1] == "2"
    assert metric(url, "imageiq_serve_model_switches_total") == 1
    assert metric(url, "imageiq_serve_model_info", model_version="2") == 1
    assert metric(url, "imageiq_serve_model_info", model_version="1") == 0
