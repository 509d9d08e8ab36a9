"""Online recognition: `imageiq serve` answers HTTP requests with the registry's model; this module
holds its routes and `run`.

- `POST /predict`: a raw image body (`image/*`, `application/octet-stream`) or
  `multipart/form-data` with one or more files; `GET /` the upload page; `GET /model`.
- The Open Inference Protocol v2 (KServe, Triton): `/v2`, `/v2/health/live`, `/v2/health/ready`,
  `/v2/models/<name>[/versions/<v>]`, `.../ready` and `POST .../infer` (bodies: `codec`).
- Network limits (`limits`): bearer token, body size and time limits enforced while the body
  streams in, admission with a bounded queue (503), header deadline; multipart is parsed as it
  streams, never spooled to disk.
- `/metrics`: Prometheus text (`metrics`). The model, micro-batching (`batcher`) and the request
  log (`request_log`) sit behind the routes in `server.Server`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from imageiq_spark.core.config import Config
from imageiq_spark.lake import tracking
from imageiq_spark.serving.codec import BINARY_HEADER, infer_inputs, infer_response, model_metadata
from imageiq_spark.serving.limits import (
    BadInput,
    Guard,
    guarded_protocol,
    read_multipart,
    read_token,
    refusal,
)
from imageiq_spark.serving.metrics import MetricsMiddleware
from imageiq_spark.serving.model import ServedModel, share_cores
from imageiq_spark.serving.server import Server

RAW_TYPES = ("image/", "application/octet-stream")


async def read_body(request: Request) -> bytes:
    """The request body (its size and time limits are the Guard's, applied as it streams in)."""
    return b"".join([chunk async for chunk in request.stream()])


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
