"""Online recognition: `imageiq serve` answers HTTP requests with the registry's model.

The server loads the very object batch scoring uses (`classifier.load_classifier`), prepares raw
bytes with the same `transform.prepare_batch` and the model's own `TransformSpec`, and builds
label, confidence and top-k with score's `top_classes` ranking, so online and batch answers agree.

- `POST /predict`: a raw image body (`image/*`, `application/octet-stream`) or
  `multipart/form-data` with one or more files; `GET /` the upload page.
- The Open Inference Protocol v2 (KServe, Triton): `/v2`, `/v2/health/live`, `/v2/health/ready`,
  `/v2/models/<name>[/versions/<v>]`, `.../ready` and `POST .../infer` with one `BYTES` input of
  encoded images (base64 strings in JSON, or raw with the binary tensor extension).
- Micro-batching: requests are decoded in threads, then one asyncio queue feeds the forward
  workers (`serve.forward_workers`, one by default, the cores shared between them); a
  free worker takes what is queued, at most `serve.max_batch_size` images. Only when no other
  pass is running does it wait, up to `serve.max_wait_ms`, for a fuller batch; a lone request
  goes straight through.
- Readiness is false until the model is loaded and warmed. With an alias URI the registry is
  polled; a new version is loaded and warmed beside the old one, then swapped in by one
  assignment: requests already decoded finish on the model they started with.
- Bad input: ingest's reason codes (`probe`) and the transform's, 422, judged before any full
  decode where the header allows (`serve.max_pixels`); decodes run on one thread per core.
- Network limits (`serve_limits`): bearer token, body size and time limits enforced while the
  body streams in, admission with a bounded queue (503), header deadline; multipart is parsed as
  it streams, never spooled to disk.
- `/metrics`: Prometheus text; optional request log: Parquet files under
  `<storage.root>/request_log/request_date=YYYY-MM-DD/` that `spark.read.parquet` reads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Match

from imageiq_spark.core import clock
from imageiq_spark.core.config import Config
from imageiq_spark.lake import tracking
from imageiq_spark.lake.lakehouse import lake_path
from imageiq_spark.ml.inference import prediction_rows
from imageiq_spark.serving.limits import (
    BadInput,
    Guard,
    concurrency,
    cores,
    guarded_protocol,
    read_multipart,
    read_token,
    refusal,
)
from imageiq_spark.vision import probe, transform

if TYPE_CHECKING:
    from imageiq_spark.ml.classifier import ImageClassifier

log = logging.getLogger(__name__)

RAW_TYPES = ("image/", "application/octet-stream")
#: Triton's binary tensor extension: the JSON header's length when raw tensor bytes follow it.
BINARY_HEADER = "inference-header-content-length"
REQUEST_LOG_ROWS = 1000
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServedModel:
    """One loaded and warmed model version."""

    classifier: ImageClassifier
    name: str
    version: str
    run_id: str


def share_cores(workers: int) -> None:
    """Before TensorFlow starts: each of `workers` concurrent forward passes gets an even share of
    the cores (intra-op threads) and runs its ops one after another (one inter-op thread each)."""
    from imageiq_spark.core.quiet import import_quietly

    tf = import_quietly("tensorflow")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cores() // workers))
        tf.config.threading.set_inter_op_parallelism_threads(workers)
    except RuntimeError:  # TensorFlow already ran in this process (a test): it keeps its threads
        log.debug("TensorFlow threads already set")


def load_model(config: Config, name: str, version: str, run_id: str) -> ServedModel:
    """Load a registry version and run it once on every path a request takes (decode, forward)."""
    import cv2

    from imageiq_spark.ml.classifier import load_classifier

    classifier = load_classifier(f"models:/{name}/{version}")
    shape = tuple(classifier.model.input_shape[1:])
    sample = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    tensors, _ = transform.prepare_batch([sample], classifier.spec)
    classifier.predict_tensors(tensors)
    classifier.predict_tensors(np.zeros((config.serve.max_batch_size, *shape), np.uint8))
    log.info("serving %s version %s", name, version)
    return ServedModel(classifier, name, version, run_id)


def prepare(contents: list[bytes], spec: transform.TransformSpec, max_pixels: int) -> np.ndarray:
    """Encoded images -> the model's uint8 tensors; the first bad one raises BadInput. (Bytes
    need no check here: the request body that held them was within serve.max_body_bytes.)"""
    for index, data in enumerate(contents):
        where = f"image {index}: " if len(contents) > 1 else ""
        try:
            probe.probe(data, max_pixels)  # a decompression bomb is refused from its header
        except probe.ProbeError as exc:
            raise BadInput(422, exc.reason, where + exc.detail) from exc
    tensors, failures = transform.prepare_batch(contents, spec)
    if failures:
        index, error = failures[0]
        where = f"image {index}: " if len(contents) > 1 else ""
        raise BadInput(422, error.reason, where + error.detail)
    return tensors


@dataclass
class _Job:
    model: ServedModel
    tensors: np.ndarray
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """One queue of at most `max_queued` requests (admission keeps it below that; one more is
    refused with 503); `workers` threads beside the event loop, each running one gathered batch."""

    def __init__(self, max_batch: int, max_wait_s: float, observe: Callable[[int], None],
                 workers: int = 1, max_queued: int = 0) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.observe = observe
        self.workers = workers
        #: Forward passes running now: while one runs, a free worker takes what is queued at once.
        self.running = 0
        #: Requests being decoded right now: the batch they will join is worth waiting for.
        self.decoding = 0
        #: Images inside the server (received, not yet answered), and the most of them seen at
        #: once in this and the previous second: the batch a concurrent load will fill.
        self.active = 0
        self._peaks = [0, 0]
        self._peak_second = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(max_queued)
        self._held: _Job | None = None
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="imageiq-forward")

    async def predict(self, model: ServedModel, tensors: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(model, tensors, future))
        except asyncio.QueueFull:
            raise BadInput(503, "overloaded", f"{self._queue.maxsize} requests wait for the "
                           "model; retry shortly") from None
        return await future

    def entered(self, images: int) -> None:
        """A request's images arrived: they count towards the concurrency a batch waits for."""
        self.active += images
        second = int(time.monotonic())
        if second != self._peak_second:
            self._peaks = [self._peaks[1] if second == self._peak_second + 1 else 0, 0]
            self._peak_second = second
        self._peaks[1] = max(self._peaks[1], self.active)

    def left(self, images: int) -> None:
        self.active -= images

    def expected_batch(self) -> int:
        """Images a batch waits for: the requests recently in the server at once. Under a steady
        concurrent load the clients just answered send their next images within milliseconds, and
        one forward pass of them all costs far less than two half-full ones; a lone request
        (concurrency 1) expects no company and never waits."""
        second = int(time.monotonic())
        recent = max(self._peaks) if second - self._peak_second <= 1 else 0
        return max(1, min(self.max_batch, recent))

    async def run(self) -> None:
        free = asyncio.Semaphore(self.workers)
        passes: set[asyncio.Task[None]] = set()  # referenced until done, as asyncio asks
        while True:
            await free.acquire()
            batch = asyncio.create_task(self._forward(await self._gather()))
            passes.add(batch)
            batch.add_done_callback(lambda task: (passes.discard(task), free.release()))

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def _gather(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        first = self._held or await self._queue.get()
        self._held = None
        jobs, rows = [first], len(first.tensors)
        deadline = loop.time() + self.max_wait_s
        expected = self.expected_batch()
        while rows < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if self.running or (self.decoding == 0 and rows >= expected) or remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if rows + len(job.tensors) > self.max_batch or job.model is not first.model:
                self._held = job  # starts the next batch
                break
            jobs.append(job)
            rows += len(job.tensors)
        return jobs

    async def _forward(self, jobs: list[_Job]) -> None:
        model = jobs[0].model
        tensors = jobs[0].tensors if len(jobs) == 1 else np.concatenate([j.tensors for j in jobs])
        self.observe(len(tensors))
        self.running += 1
        try:
            probs = await asyncio.get_running_loop().run_in_executor(
                self._executor, model.classifier.predict_tensors, tensors)
        except Exception as exc:  # the requests fail with it; the batcher goes on
            log.exception("forward pass failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.running -= 1
        start = 0
        for job in jobs:
            end = start + len(job.tensors)
            if not job.future.done():  # a client that went away cancelled its future
                job.future.set_result(probs[start:end])
            start = end


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("imageiq_serve_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("imageiq_serve_request_duration_seconds",
                                 "Time from request to response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("imageiq_serve_images", "Images recognised, by outcome",
                              ["outcome"], registry=self.registry)
        self.batch_size = Histogram("imageiq_serve_batch_size", "Images per forward pass",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.model = Gauge("imageiq_serve_model_info", "1 for the model version being served",
                           ["model_name", "model_version"], registry=self.registry)
        self.ready = Gauge("imageiq_serve_ready", "1 once the model is loaded and warmed",
                           registry=self.registry)
        self.switches = Counter("imageiq_serve_model_switches", "Switches to a new model version",
                                registry=self.registry)

    def serving(self, old: ServedModel | None, new: ServedModel) -> None:
        if old is not None:
            self.model.remove(old.name, old.version)
            self.switches.inc()
        self.model.labels(new.name, new.version).set(1)
        self.ready.set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


REQUEST_LOG_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("predicted_label", pa.string()),
        ("confidence", pa.float64()),
        ("top_k", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("route", pa.string()),
        ("size_bytes", pa.int64()),
        ("requested_at", pa.timestamp("us", tz="UTC")),
    ]
)


class RequestLog:
    """Online predictions buffered, then written as Parquet files (one per flush) under `uri`."""

    def __init__(self, uri: str) -> None:
        from imageiq_spark.lake import storage

        self.filesystem, self.path = storage.filesystem(uri)
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, rows: list[dict[str, Any]]) -> bool:
        """Buffer rows; True when the buffer is big enough to write now."""
        with self._lock:
            self._rows.extend(rows)
            return len(self._rows) >= REQUEST_LOG_ROWS

    def flush(self) -> int:
        import pyarrow.parquet as pq

        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return 0
        day = rows[0]["requested_at"].date().isoformat()
        folder = f"{self.path}/request_date={day}"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        try:
            self.filesystem.create_dir(folder, recursive=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=REQUEST_LOG_SCHEMA),
                           f"{folder}/part-{stamp}-{uuid.uuid4().hex[:12]}.parquet",
                           filesystem=self.filesystem)
        except (OSError, pa.ArrowException) as exc:  # storage away: keep serving, retry later
            log.warning("request log: could not write %d rows (%s); retrying with the next write",
                        len(rows), exc)
            with self._lock:
                self._rows[:0] = rows[-REQUEST_LOG_ROWS * 10:]  # bounded: the oldest are dropped
            return 0
        return len(rows)


class Server:
    """The state behind the routes: the model being served, the batcher, metrics, the log."""

    def __init__(self, config: Config, model_uri: str) -> None:
        self.config = config
        self.model_uri = model_uri
        self.model: ServedModel | None = None
        self.metrics = Metrics()
        serve = config.serve
        self.batcher = MicroBatcher(serve.max_batch_size, serve.max_wait_ms / 1000,
                                    self.metrics.batch_size.observe, serve.forward_workers,
                                    max_queued=concurrency(serve))
        #: Decodes at once: one per core (a 50 MP 16-bit RGBA PNG took 1.5 GB or more while converted).
        self._decoder = ThreadPoolExecutor(cores(), thread_name_prefix="imageiq-decode")
        self.request_log = (RequestLog(lake_path(config, "request_log")) if serve.request_log
                            else None)
        self.failed: BaseException | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def follows_alias(self) -> bool:
        return "@" in self.model_uri and self.config.serve.alias_poll_s > 0

    async def start(self, on_failure: Callable[[], None]) -> None:
        self._tasks = [asyncio.create_task(self.batcher.run()),
                       asyncio.create_task(self._load_first(on_failure))]
        if self.request_log is not None:
            self._tasks.append(asyncio.create_task(self._flush_log_every()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.batcher.close()
        self._decoder.shutdown(wait=False)
        if self.request_log is not None:
            await asyncio.to_thread(self.request_log.flush)

    async def _load_first(self, on_failure: Callable[[], None]) -> None:
        try:
            name, version, run_id = await asyncio.to_thread(
                tracking.resolve_model, self.config, self.model_uri)
            self._switch(await asyncio.to_thread(load_model, self.config, name, version, run_id))
        except Exception as exc:
            log.exception("could not load %s", self.model_uri)
            self.failed = exc
            on_failure()
            return
        if self.follows_alias:
            await self._follow_alias()

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.config.serve.alias_poll_s)
            try:
                name, version, run_id = await asyncio.to_thread(
                    tracking.resolve_model, self.config, self.model_uri)
                if self.model is None or version != self.model.version:
                    log.info("%s now points at version %s: loading it", self.model_uri, version)
                    self._switch(await asyncio.to_thread(load_model, self.config, name, version, run_id))
            except Exception:  # keep serving the current version; try again next time
                log.exception("could not follow %s", self.model_uri)

    def _switch(self, model: ServedModel) -> None:
        old, self.model = self.model, model  # one assignment: each request sees one model or the other
        self.metrics.serving(old, model)

    async def _flush_log_every(self) -> None:
        assert self.request_log is not None
        while True:
            await asyncio.sleep(self.config.serve.request_log_flush_s)
            await asyncio.to_thread(self.request_log.flush)

    def ready_model(self) -> ServedModel:
        if self.model is None:
            raise BadInput(503, "not_ready", "the model is still loading; retry shortly")
        return self.model

    async def recognise(self, contents: list[bytes], route: str
                        ) -> tuple[ServedModel, list[dict[str, Any]], np.ndarray]:
        """Encoded images -> (model, one prediction row each, probabilities)."""
        model = self.ready_model()
        if not contents:
            raise BadInput(422, probe.EMPTY, "the request holds no image")
        limit = self.config.serve.max_images_per_request
        if len(contents) > limit:
            raise BadInput(413, "too_many_images",
                           f"{len(contents)} images > serve.max_images_per_request {limit}")
        self.batcher.entered(len(contents))
        try:
            probs = await self._forward(model, contents)
        finally:
            self.batcher.left(len(contents))
        rows = [{"image_id": hashlib.sha256(data).hexdigest(), **row,
                 "model_name": model.name, "model_version": model.version}
                for data, row in zip(contents, prediction_rows(probs, model.classifier.labels,
                                                               self.config.score.top_k))]
        self.metrics.images.labels("ok").inc(len(rows))
        if self.request_log is not None:
            now = clock.utc_now()
            logged = [{**row, "route": route, "size_bytes": len(data), "requested_at": now}
                      for row, data in zip(rows, contents)]
            if self.request_log.add(logged):  # written beside the requests, not in their way
                self._tasks = [task for task in self._tasks if not task.done()]
                self._tasks.append(asyncio.create_task(asyncio.to_thread(self.request_log.flush)))
        return model, rows, probs

    async def _forward(self, model: ServedModel, contents: list[bytes]) -> np.ndarray:
        """Decode beside the event loop, then join the next batch."""
        self.batcher.decoding += 1
        try:
            tensors = await asyncio.get_running_loop().run_in_executor(
                self._decoder, prepare, contents, model.classifier.spec, self.config.serve.max_pixels)
        except BadInput as exc:
            self.metrics.images.labels(exc.reason).inc(len(contents))
            raise
        finally:
            self.batcher.decoding -= 1
        return await self.batcher.predict(model, tensors)


async def read_body(request: Request) -> bytes:
    """The request body (its size and time limits are the Guard's, applied as it streams in)."""
    return b"".join([chunk async for chunk in request.stream()])


def bytes_elements(raw: bytes) -> list[bytes]:
    """A v2 binary BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    elements, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadInput(422, "bad_request", "binary BYTES tensor ends inside a length prefix")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise BadInput(422, "bad_request", "binary BYTES element runs past the tensor's data")
        elements.append(raw[pos:pos + size])
        pos += size
    return elements


def infer_inputs(header: dict[str, Any], binary: bytes) -> list[bytes]:
    """The encoded images of a v2 infer request: one BYTES input, base64 in JSON or binary."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInput(422, "bad_request", "expected 'inputs' with exactly one BYTES tensor of "
                                           "encoded images")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise BadInput(422, "bad_request",
                       f"input '{tensor.get('name')}' has datatype {tensor.get('datatype')!r}; "
                       "expected BYTES (encoded image files)")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size > len(binary):
            raise BadInput(422, "bad_request", "binary_data_size is larger than the data sent")
        elements = bytes_elements(binary[:size])
    else:
        data = tensor.get("data")
        flat = list(np.ravel(np.array(data, dtype=object))) if isinstance(data, list) else None
        if not flat or not all(isinstance(item, str) for item in flat):
            raise BadInput(422, "bad_request", "BYTES 'data' must be a list of base64 strings")
        try:
            elements = [base64.b64decode(item, validate=True) for item in flat]
        except binascii.Error as exc:
            raise BadInput(422, "bad_request", f"BYTES 'data' is not base64: {exc}") from exc
    shape = tensor.get("shape")
    if not isinstance(shape, list) or int(np.prod(shape)) != len(elements):
        raise BadInput(422, "bad_request",
                       f"shape {shape} does not match the {len(elements)} elements sent")
    return elements


def infer_response(model: ServedModel, rows: list[dict[str, Any]], probs: np.ndarray,
                   header: dict[str, Any]) -> dict[str, Any]:
    n = len(rows)
    outputs = [
        {"name": "label", "datatype": "BYTES", "shape": [n], "data": [r["predicted_label"] for r in rows]},
        {"name": "confidence", "datatype": "FP64", "shape": [n], "data": [r["confidence"] for r in rows]},
        {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
         "data": probs.astype(np.float32).ravel().tolist()},
        {"name": "image_id", "datatype": "BYTES", "shape": [n], "data": [r["image_id"] for r in rows]},
    ]
    wanted = {o.get("name") for o in header.get("outputs") or [] if isinstance(o, dict)}
    if wanted:
        outputs = [o for o in outputs if o["name"] in wanted]
    response = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if "id" in header:
        response["id"] = header["id"]
    return response


def model_metadata(model: ServedModel) -> dict[str, Any]:
    classes = len(model.classifier.labels)
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "imageiq_tensorflow",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1],
                    "parameters": {"content": "encoded image files (PNG, JPEG, GIF, BMP, TIFF, WebP)"}}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "confidence", "datatype": "FP64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes],
             "parameters": {"labels": model.classifier.labels}},
            {"name": "image_id", "datatype": "BYTES", "shape": [-1]},
        ],
    }


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not the raw path), those the
    Guard refused before routing included."""

    def __init__(self, app: Any, metrics: Metrics, routes: list[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def route_of(self, scope: dict[str, Any]) -> str:
        route = scope.get("route") or next(
            (r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", "unmatched")

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            name = self.route_of(scope)
            self.metrics.requests.labels(name, scope["method"], str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)


def create_app(config: Config, model_uri: str, on_failure: Callable[[], None] = lambda: None
               ) -> tuple[Any, Server]:
    """The ASGI application serving `model_uri`, and its state; the model loads when it starts."""
    server = Server(config, model_uri)
    token = read_token(config.serve)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.start(on_failure)
        yield
        await server.stop()

    app = FastAPI(title="imageiq serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    page = resources.files("imageiq_spark").joinpath("static/index.html").read_text()

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput) -> JSONResponse:
        return refusal(exc)

    def model_named(name: str, version: str | None = None) -> ServedModel:
        model = server.ready_model()
        if name != model.name or version not in (None, model.version):
            served = f"'{model.name}' version {model.version}"
            raise BadInput(404, "unknown_model", f"this server serves {served}, not '{name}'"
                           + (f" version {version}" if version else ""))
        return model

    @app.get("/", response_class=HTMLResponse)
    async def upload_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            files = await read_multipart(request.stream(), request.headers["content-type"],
                                         config.serve.max_images_per_request)
            _, rows, _ = await server.recognise([data for _, data in files], "/predict")
            for row, (filename, _) in zip(rows, files):
                row["filename"] = filename
            return JSONResponse({"predictions": rows})
        if not content_type.startswith(RAW_TYPES):
            raise BadInput(415, "unsupported_media_type",
                           f"Content-Type {content_type or 'none'}; send the image bytes as image/* "
                           "or application/octet-stream, or files as multipart/form-data")
        _, rows, _ = await server.recognise([await read_body(request)], "/predict")
        return JSONResponse(rows[0])

    @app.get("/model")
    async def served() -> dict[str, Any]:
        model = server.ready_model()
        return {"name": model.name, "version": model.version, "run_id": model.run_id,
                "model_uri": model_uri, "labels": model.classifier.labels}

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        from importlib.metadata import version

        return {"name": "imageiq", "version": version("imageiq-spark"), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = server.model is not None
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return model_metadata(model_named(name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        model = model_named(name, version)
        return {"name": model.name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> JSONResponse:
        model_named(name, version)
        body = await read_body(request)
        header_length = request.headers.get(BINARY_HEADER)
        split = int(header_length) if header_length and header_length.isdigit() else len(body)
        try:
            header = json.loads(body[:split])
        except ValueError as exc:
            raise BadInput(422, "bad_request", f"the request is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise BadInput(422, "bad_request", "the request must be a JSON object")
        model, rows, probs = await server.recognise(infer_inputs(header, body[split:]), request.url.path)
        return JSONResponse(infer_response(model, rows, probs, header))

    @app.get("/metrics")
    async def metrics() -> Response:
        body, media_type = server.metrics.render()
        return Response(body, media_type=media_type)

    return MetricsMiddleware(Guard(app, config.serve, token), server.metrics, app.router.routes), server


def run(config: Config, model_uri: str | None = None, host: str | None = None,
        port: int | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM finish the requests in flight first)."""
    import uvicorn

    uri = model_uri or tracking.default_model_uri(config)
    tracking.resolve_model(config, uri)  # a URI that is not in the registry is a usage error (2)
    share_cores(config.serve.forward_workers)
    holder: dict[str, Any] = {}
    app, server = create_app(config, uri, on_failure=lambda: setattr(holder["server"], "should_exit", True))
    serve = config.serve
    holder["server"] = uvicorn.Server(uvicorn.Config(
        app, host=host or serve.host, port=serve.port if port is None else port,
        log_level="info", access_log=False, lifespan="on", timeout_graceful_shutdown=30,
        http=guarded_protocol(serve.header_timeout_s), timeout_keep_alive=serve.keep_alive_s,
        ssl_certfile=serve.ssl_certfile or None, ssl_keyfile=serve.ssl_keyfile or None))
    holder["server"].run()
    if server.failed is not None:
        raise RuntimeError(f"could not load {uri}: {server.failed}") from server.failed
