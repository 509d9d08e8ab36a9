"""The state behind `imageiq serve`'s routes: the model being served, the batcher, metrics and the
request log, and how one request's images become predictions.

- Readiness is false until the model is loaded and warmed. With an alias URI the registry is
  polled; a new version is loaded and warmed beside the old one, then swapped in by one
  assignment: requests already decoded finish on the model they started with.
- Decodes run on one thread per core; label, confidence and top-k come from score's
  `ranking.top_classes` (`inference.prediction_rows`), as in batch scoring.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from imageiq_spark.core import clock
from imageiq_spark.core.config import Config
from imageiq_spark.lake import tracking
from imageiq_spark.lake.lakehouse import lake_path
from imageiq_spark.ml.inference import prediction_rows
from imageiq_spark.serving.batcher import MicroBatcher
from imageiq_spark.serving.limits import BadInput, concurrency, cores
from imageiq_spark.serving.metrics import Metrics
from imageiq_spark.serving.model import ServedModel, load_model, prepare
from imageiq_spark.serving.request_log import RequestLog
from imageiq_spark.vision import probe

log = logging.getLogger(__name__)


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
