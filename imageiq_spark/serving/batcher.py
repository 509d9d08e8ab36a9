"""Micro-batching: the queue between decoded requests and the model's forward passes.

Requests are decoded in threads, then one asyncio queue feeds the forward workers
(`serve.forward_workers`, one by default, the cores shared between them); a free worker takes what
is queued, at most `serve.max_batch_size` images. Only when no other pass is running does it wait,
up to `serve.max_wait_ms`, for a fuller batch; a lone request goes straight through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imageiq_spark.serving.limits import BadInput
from imageiq_spark.serving.model import ServedModel

log = logging.getLogger(__name__)


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
