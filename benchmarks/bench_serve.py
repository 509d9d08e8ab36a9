"""Online serving: `imageiq serve` against `mlflow models serve` on the same registered model and
the same JPEGs, and against the bare forward pass of that model in one process.

A load generator in a second process (asyncio + aiohttp, one request per image) keeps 1, 8 and
32 requests in flight on loopback for a fixed time and reports images/s and latency percentiles.
The load generator shares the machine's cores with the server, as a client on the same host does.
Bare rows run in this process with nothing else going on: the forward pass alone on prepared
tensors (the machine's ceiling), and JPEG bytes -> decode, preprocess, forward in batches.
The model has random weights: only speed is measured.

A third server bounds what HTTP alone allows: the same FastAPI + uvicorn stack answering a fixed
prediction to each POST, with no decode and no model, under the same load generator.

    python -m benchmarks.bench_serve load URL KIND FILES_DIR CONCURRENCY SECONDS   # the load generator
    python -m benchmarks.bench_serve http-alone PORT                                # the HTTP bound
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from fastapi import Request  # noqa: E402  (a module-level name: FastAPI resolves the route's annotation)

from benchmarks.common import bench_config, median, table, timed  # noqa: E402

if TYPE_CHECKING:
    from imageiq_spark.ml.classifier import ImageClassifier

CONCURRENCY = (1, 8, 32)
SECONDS = float(os.environ.get("BENCH_SERVE_SECONDS", "10"))
IMAGES = 256
#: (bare forward pass, `imageiq serve` at the top concurrency) pairs measured back to back.
PAIRS = 3
SIDE = 256  # JPEG size
CASES = (("small_cnn", 32), ("mobilenet_v2", 224))  # architecture, input side
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A loopback port nothing listens on now (for a server the benchmark starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jpegs(folder: Path, n: int) -> list[bytes]:
    """n photo-like JPEGs (smooth colour fields plus texture) of SIDE x SIDE."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC)
        image = cv2.add(image, rng.integers(0, 24, image.shape, dtype=np.uint8))
        data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        (folder / f"{i:04d}.jpg").write_bytes(data)
        blobs.append(data)
    return blobs


def register_model(config, arch: str, side: int) -> str:
    """A model of the zoo (random weights) logged and registered as `models:/<name>@champion`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from imageiq_spark.lake import tracking
    from imageiq_spark.ml.classifier import ImageClassifier, log_classifier
    from imageiq_spark.ml.models import ModelSpec, build_model
    from imageiq_spark.vision.spec import TransformSpec

    tracking.configure_mlflow(config)
    model = build_model(ModelSpec(arch, side, side, 3, 10, (127.5,) * 3, (64.0,) * 3))
    classifier = ImageClassifier(model, [str(i) for i in range(10)], TransformSpec(size=(side, side)))
    name = config.mlflow.registered_model
    with mlflow.start_run(), tempfile.TemporaryDirectory() as staging:
        info = log_classifier(classifier, staging, registered_model_name=name)
    MlflowClient().set_registered_model_alias(name, "champion", str(info.registered_model_version))
    return str(info.registered_model_version)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def generate_load(url: str, kind: str, files: Path, concurrency: int, seconds: float) -> dict:
    """Run the load generator process; returns its JSON summary."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_serve", "load", url, kind, str(files),
         str(concurrency), str(seconds)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(result.stdout)


# --- the load generator (second process) ------------------------------------------------------


async def _load(url: str, kind: str, blobs: list[bytes], concurrency: int, seconds: float) -> dict:
    import aiohttp

    if kind == "imageiq":
        bodies = blobs
        headers = {"Content-Type": "image/jpeg"}
        target = f"{url}/predict"
    else:  # mlflow models serve: JSON, the image base64-encoded in the binary `content` column
        bodies = [json.dumps({"dataframe_split": {"columns": ["content"],
                                                  "data": [[base64.b64encode(b).decode()]]}}).encode()
                  for b in blobs]
        headers = {"Content-Type": "application/json"}
        target = f"{url}/invocations"
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> bool:
            async with session.post(target, data=bodies[i % len(bodies)], headers=headers) as response:
                await response.read()
                return response.status == 200

        for i in range(concurrency):  # warm-up: connections open, first batches done
            await one(i)
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                ok = await one(i)
                latencies.append(time.perf_counter() - started)
                errors += not ok
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    # A failed request answered no image: only answered ones count towards the rate.
    return {"requests": len(latencies), "errors": errors, "images_per_s": (len(latencies) - errors) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def http_alone_main(port: str) -> None:
    """FastAPI + uvicorn as `imageiq serve` runs them, answering every POST /predict with one fixed
    prediction after reading its body: what one-image requests cost without decode or model."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    answer = {"predicted_label": "0", "confidence": 0.5, "top_k": [{"label": "0", "probability": 0.5}],
              "image_id": "0" * 64, "model_name": "none", "model_version": "0"}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        await request.body()
        return answer

    @app.get("/ready")
    async def ready() -> dict:
        return {}

    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)


def http_alone(workdir: Path, concurrency: int) -> dict:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_serve", "http-alone", str(port)],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                               stderr=(workdir / "http-alone.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/ready", process)
        return generate_load(url, "imageiq", workdir / "jpegs", concurrency, SECONDS)
    finally:
        stop(process)


def load_main(argv: list[str]) -> int:
    url, kind, folder, concurrency, seconds = argv
    blobs = [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]
    print(json.dumps(asyncio.run(_load(url, kind, blobs, int(concurrency), float(seconds)))))
    return 0


# --- the benchmark ----------------------------------------------------------------------------


class Bare:
    """The served model in this process, nothing else going on: images/s of the forward pass alone
    (prepared tensors in memory) and of bytes -> predictions (decode, preprocess, forward), in
    batches of `batch`."""

    def __init__(self, classifier: ImageClassifier, blobs: list[bytes], batch: int = 32) -> None:
        self.classifier, self.blobs, self.batch = classifier, blobs, batch

    @classmethod
    def load(cls, model_uri: str, blobs: list[bytes], batch: int = 32) -> Bare:
        """The registered model loaded and warmed up (one pass of each rate)."""
        from imageiq_spark.ml.classifier import load_classifier

        bare = cls(load_classifier(model_uri), blobs, batch)
        bare.forward_rate(repeats=1), bare.bytes_rate(repeats=1)
        return bare

    @functools.cached_property
    def chunks(self) -> list[np.ndarray]:
        """The blobs prepared once, in batches: the forward pass alone is timed."""
        from imageiq_spark.vision.transform import prepare_batch

        tensors, _ = prepare_batch(self.blobs, self.classifier.spec)
        return [tensors[i:i + self.batch] for i in range(0, len(tensors), self.batch)]

    def forward_rate(self, repeats: int = 5) -> float:
        def forward() -> None:
            for chunk in self.chunks:
                self.classifier.predict_tensors(chunk)

        return len(self.blobs) / median(timed(forward, repeats=repeats))

    def bytes_rate(self, repeats: int = 3) -> float:
        from imageiq_spark.vision.transform import prepare_batch

        def from_bytes() -> None:
            for i in range(0, len(self.blobs), self.batch):
                tensors, _ = prepare_batch(self.blobs[i:i + self.batch], self.classifier.spec)
                self.classifier.predict_tensors(tensors)

        return len(self.blobs) / median(timed(from_bytes, repeats=repeats))


def run_case(workdir: Path, blobs: list[bytes], arch: str, side: int
             ) -> tuple[dict, float, float, list[float]]:
    """({(server, concurrency): load summary}, bare forward images/s, bare bytes images/s, the
    paired ratios: `imageiq serve` at the top concurrency over the bare forward pass just before)."""
    from imageiq_spark.core.config import to_dict
    from imageiq_spark.lake.tracking import tracking_uri

    name = f"bench_serve_{arch}"
    config = bench_config(workdir / "lake", mlflow={"registered_model": name}, serve={"alias_poll_s": 0})
    version = register_model(config, arch, side)
    conf = workdir / f"{arch}.yaml"
    conf.write_text(yaml.safe_dump(to_dict(config)))
    # mlflow models serve starts `uvicorn` from the PATH: the venv's.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(config), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    servers = {
        "imageiq": ([str(BIN / "imageiq"), "--conf", str(conf), "serve", "--port", "{port}"],
                    "/v2/health/ready"),
        "mlflow": ([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}",
                    "--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}"], "/ping"),
        # The default's alternative: one forward pass per core, each on one core.
        "imageiq-per-core": ([str(BIN / "imageiq"), "--conf", str(conf), "--set",
                              f"serve.forward_workers={len(os.sched_getaffinity(0))}", "serve",
                              "--port", "{port}"], "/v2/health/ready"),
    }
    # The machine's speed drifts over minutes (shared host): the bare rates are measured before and
    # after the servers' runs, and their means taken; the target's ratio is also measured in pairs,
    # each load run right after a bare run.
    bare = Bare.load(f"models:/{name}/{version}", blobs)
    before = bare.forward_rate(), bare.bytes_rate()
    results: dict[tuple[str, int], dict] = {}
    paired: list[float] = []
    for kind, (command, ready) in servers.items():
        port = free_port()
        process = subprocess.Popen([part.format(port=port) for part in command], env=env,
                                   stdout=subprocess.DEVNULL,
                                   stderr=(workdir / f"{arch}-{kind}.log").open("wb"))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url + ready, process)
            for concurrency in CONCURRENCY if kind != "imageiq-per-core" else CONCURRENCY[-1:]:
                protocol = "mlflow" if kind == "mlflow" else "imageiq"
                results[kind, concurrency] = generate_load(url, protocol, workdir / "jpegs", concurrency,
                                                           SECONDS)
            for _ in range(PAIRS if kind == "imageiq" else 0):
                ceiling = bare.forward_rate()
                load = generate_load(url, "imageiq", workdir / "jpegs", CONCURRENCY[-1], SECONDS)
                paired.append(load["images_per_s"] / ceiling)
        finally:
            stop(process)
    after = bare.forward_rate(), bare.bytes_rate()
    return (results, *(float(np.mean(pair)) for pair in zip(before, after)), paired)


def run(workdir: Path) -> str:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    blobs = write_jpegs(workdir / "jpegs", IMAGES)
    bound = http_alone(workdir, max(CONCURRENCY))
    rows, notes = [], []
    for arch, side in CASES:
        results, forward_rate, bytes_rate, paired = run_case(workdir, blobs, arch, side)
        label = f"{arch} {side}x{side}"
        rows.append([label, "bare forward pass (prepared tensors, batch 32)", "", round(forward_rate),
                     "", "", "", 1.0])
        rows.append([label, "bare JPEG bytes -> predictions (batch 32)", "", round(bytes_rate), "", "", "",
                     bytes_rate / forward_rate])
        for (kind, concurrency), r in results.items():
            server = {"imageiq": "`imageiq serve`", "mlflow": "`mlflow models serve` (JSON, base64)",
                      "imageiq-per-core": "`imageiq serve`, one forward worker per core"}[kind]
            rows.append([label, server, concurrency, round(r["images_per_s"]), round(r["p50_ms"], 1),
                         round(r["p99_ms"], 1), r["errors"], r["images_per_s"] / forward_rate])
        ours, theirs = results["imageiq", 32]["images_per_s"], results["mlflow", 32]["images_per_s"]
        per_core = results["imageiq-per-core", 32]["images_per_s"]
        most = 1 / (1 / bytes_rate + 1 / bound["images_per_s"])
        notes.append(f"- {label}: at concurrency 32 `imageiq serve` answered {ours / theirs:.1f}x the "
                     f"images/s of `mlflow models serve`, {ours / forward_rate:.2f}x the bare forward pass, "
                     f"{ours / bytes_rate:.2f}x bare bytes -> predictions and "
                     f"{ours / bound['images_per_s']:.2f}x HTTP alone; one forward worker per core "
                     f"instead of one over all cores: {per_core / ours:.2f}x. Paired with a bare forward "
                     f"pass run just before each ({PAIRS} pairs): median {median(paired):.2f}x "
                     f"({min(paired):.2f}-{max(paired):.2f}). Adding up the time per image of HTTP alone "
                     f"and of bare bytes -> predictions, both on the same cores, gives about {most:.0f} "
                     f"images/s ({most / forward_rate:.2f}x the bare forward pass): roughly the most a "
                     "server that answers one image per request beside its load generator reaches here.")
    return "\n".join([
        "## Serve",
        "",
        f"Models of the zoo with random weights, {IMAGES} JPEGs of {SIDE}x{SIDE}, one image per request, "
        f"{SECONDS:.0f} s per row after a warm-up; the load generator (aiohttp, a second process) "
        "shares the cores with the server. Bare rows run in one process with nothing else going on, "
        "before and after the servers (mean of the two). "
        "Ratio = images/s over the bare forward pass on prepared tensors (the machine's ceiling). "
        "Target: at concurrency 32, >= 0.8x that ceiling and ahead of `mlflow models serve`; since the "
        "host's speed drifts between rows, that ratio is also measured in pairs, each load run right "
        "after a bare run (notes under the table).",
        "",
        table(["model", "path", "concurrency", "images/s", "p50 ms", "p99 ms", "errors",
               "ratio to bare forward"], rows),
        "",
        f"- HTTP alone (FastAPI + uvicorn answering a fixed prediction, no decode, no model) at "
        f"concurrency {max(CONCURRENCY)}: {bound['images_per_s']:.0f} requests/s, "
        f"p50 {bound['p50_ms']:.1f} ms, p99 {bound['p99_ms']:.1f} ms: the most one-image requests this "
        "stack answers here beside its load generator, whatever the model.",
        *notes,
    ])


if __name__ == "__main__":
    if sys.argv[1:2] == ["load"]:
        sys.exit(load_main(sys.argv[2:]))
    if sys.argv[1:2] == ["http-alone"]:
        sys.exit(http_alone_main(sys.argv[2]))
    print(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/out/serve")))
