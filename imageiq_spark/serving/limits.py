"""What keeps `imageiq serve` safe on a network: limits applied before a request costs much.

- `Guard`, an ASGI middleware in front of the routes: the bearer token (constant-time compare,
  never logged; health probes always open, `/metrics` when `serve.metrics_public`), a declared
  `Content-Length` over `serve.max_body_bytes` refused unread, then admission
  (`serve.max_concurrency` at once, `serve.max_queue` waiting, 503 with `Retry-After` beyond),
  then the body itself counted chunk by chunk from the ASGI receive channel: 413 as soon as it
  passes the limit, 408 when it has not all arrived `serve.body_timeout_s` after admission. A
  refusal sent before the body was read closes the connection, so the rest is never read.
- `guarded_protocol`: uvicorn's httptools protocol with a deadline for the request line and
  headers (`serve.header_timeout_s`, also for a connection that sends nothing) and at most
  `MAX_HEADER_BYTES` of them, which uvicorn itself leaves unbounded.
- `read_multipart`: a multipart body parsed as it streams (python-multipart), each file kept in
  memory (the body limit bounds them all), none written to disk.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from imageiq_spark.core.config import ConfigError
from imageiq_spark.core.config_sections import ServeConfig

TOKEN_ENV = "IMAGEIQ_SERVE_TOKEN"
#: Routes that answer without a token and without taking a slot: orchestrators probe them.
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: Request line and headers of one request: a browser sends 1-2 KiB, nginx allows 32 KiB.
MAX_HEADER_BYTES = 64 * 1024
RETRY_AFTER_S = 1

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BadInput(Exception):
    """A request the server refuses: HTTP `status`, a short `reason` code, a `detail`, and the
    headers that go with the status (`Retry-After` with 503, `WWW-Authenticate` with 401)."""

    def __init__(self, status: int, reason: str, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or ({"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {})


def refusal(exc: BadInput) -> Any:
    """The JSON answer to a refused request: `{"error": reason, "detail": ...}`."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": exc.reason, "detail": exc.detail}, exc.status, headers=exc.headers)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def concurrency(serve: ServeConfig) -> int:
    """`serve.max_concurrency`; 0 means 8 per core, at least `serve.max_batch_size` (a full batch)."""
    return serve.max_concurrency or max(8 * cores(), serve.max_batch_size)


def read_token(serve: ServeConfig) -> bytes | None:
    """The bearer token: the first line of `serve.auth_token_file`, else $IMAGEIQ_SERVE_TOKEN."""
    if serve.auth_token_file:
        try:
            token = Path(serve.auth_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"serve.auth_token_file: cannot read {serve.auth_token_file!r} "
                              f"({exc.strerror})") from exc
        if not token:
            raise ConfigError(f"serve.auth_token_file: {serve.auth_token_file!r} is empty")
        return token.encode()
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token.encode() if token else None


class Admission:
    """At most `concurrency` requests at once and `queue` waiting, in arrival order; one more is
    refused with 503 at once."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self) -> None:
        if self.running < self.concurrency and not self._waiting:
            self.running += 1
            return
        if len(self._waiting) >= self.queue:
            raise BadInput(503, "overloaded", f"{self.running} requests in progress and "
                           f"{len(self._waiting)} waiting (serve.max_concurrency, serve.max_queue); "
                           "retry shortly")
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            await slot  # `leave` hands its slot over
        except asyncio.CancelledError:  # the client went away while waiting
            if slot.done() and not slot.cancelled():
                self.leave()
            else:
                self._waiting.remove(slot)
            raise

    def leave(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.running -= 1


class LimitedBody:
    """The ASGI receive channel of one request, counted: BadInput 413 past `limit` bytes, 408
    when the body is not complete by the deadline `start` sets."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float) -> None:
        self._receive = receive
        self.limit = limit
        self.timeout_s = timeout_s
        self.received = 0
        self.complete = False
        self._deadline = float("inf")

    def start(self) -> None:
        self._deadline = asyncio.get_running_loop().time() + self.timeout_s

    async def __call__(self) -> dict[str, Any]:
        if self.complete:  # only a disconnect can follow
            return await self._receive()
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(remaining, 0.001))
        except TimeoutError:
            raise BadInput(408, "body_timeout", f"the body did not arrive within "
                           f"serve.body_timeout_s = {self.timeout_s:g} s") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise BadInput(413, "too_large", f"more than {self.limit} bytes (serve.max_body_bytes)")
            self.complete = not message.get("more_body", False)
        return message


def _has_body(scope: dict[str, Any]) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


class Guard:
    """Token, declared length, admission and the counted body, in that order (module docstring)."""

    def __init__(self, app: Any, serve: ServeConfig, token: bytes | None) -> None:
        self.app = app
        self.serve = serve
        self.token = token
        self.admission = Admission(concurrency(serve), serve.max_queue)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            await self.app(scope, receive, send)
            return
        body = LimitedBody(receive, self.serve.max_body_bytes, self.serve.body_timeout_s)
        started = False
        unread = _has_body(scope)

        async def send_closing(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if unread and not body.complete:  # the rest of the body is never read
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"connection", b"close")]}
            await send(message)

        try:
            metrics = scope["path"] == "/metrics"
            if self.token is not None and not (metrics and self.serve.metrics_public):
                self._authorise(scope)
            if metrics:
                await self.app(scope, body, send_closing)
                return
            self._check_declared_length(scope)
            await self.admission.enter()
            try:
                body.start()
                await self.app(scope, body, send_closing)
            finally:
                self.admission.leave()
        except BadInput as exc:  # raised before the routes (their own handler answers theirs)
            if started:
                raise
            await refusal(exc)(scope, receive, send_closing)

    def _authorise(self, scope: dict[str, Any]) -> None:
        assert self.token is not None
        sent = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, credentials = sent.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
            return
        challenge = 'Bearer realm="imageiq"' + (', error="invalid_token"' if sent else "")
        raise BadInput(401, "unauthorized",
                       "a wrong bearer token" if sent else "send 'Authorization: Bearer <token>'",
                       {"WWW-Authenticate": challenge})

    def _check_declared_length(self, scope: dict[str, Any]) -> None:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        limit = self.serve.max_body_bytes
        if declared.isdigit() and int(declared) > limit:
            raise BadInput(413, "too_large",
                           f"{int(declared)} bytes > serve.max_body_bytes {limit}")


def guarded_protocol(header_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header deadline and a header size limit."""

    class GuardedProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0
        _begun = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._begun, self._header_bytes = True, 0
            if self._header_timer is None:  # a kept-alive connection's next request
                self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            self._begun = False
            if not self.transport.is_closing():
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self.transport.is_closing():
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self.transport.is_closing():
                super().on_message_complete()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._refuse(431, "Request Header Fields Too Large", "header_too_large",
                             f"request line and headers over {MAX_HEADER_BYTES} bytes")

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._begun and (self.cycle is None or self.cycle.response_complete):
                self._refuse(408, "Request Timeout", "header_timeout", "headers not complete "
                             f"within serve.header_timeout_s = {header_timeout_s:g} s")
            elif self.cycle is None or self.cycle.response_complete:
                self.transport.close()  # connected and silent: nothing to answer
            # else: a response is being written on this connection; keep-alive ends it

        def _refuse(self, status: int, phrase: str, reason: str, detail: str) -> None:
            import json

            body = json.dumps({"error": reason, "detail": detail}).encode()
            self.transport.write(
                f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            self.transport.close()

    return GuardedProtocol


async def read_multipart(chunks: AsyncIterator[bytes], content_type: str,
                         max_files: int) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of each file part of a multipart/form-data body, parsed as it streams;
    other fields are skipped. BadInput 413 `too_many_images` at file `max_files + 1`, 422 for a
    malformed body."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadInput(422, "bad_request", "multipart/form-data without a boundary")
    files: list[tuple[str | None, bytes]] = []
    part: dict[str, Any] = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, field=b"", value=b"", data=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"filename" not in disposition:
            return  # a plain form field: skipped
        if len(files) == max_files:
            raise BadInput(413, "too_many_images",
                           f"more than {max_files} files (serve.max_images_per_request)")
        part["filename"] = disposition[b"filename"].decode("utf-8", "replace")
        part["data"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part["data"] is not None:
            part["data"] += data[start:end]

    def on_part_end() -> None:
        if part["data"] is not None:
            files.append((part["filename"], bytes(part["data"])))
            part["data"] = None

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadInput(422, "bad_request", f"malformed multipart body: {exc}") from exc
    if parser.state != MultipartState.END:
        raise BadInput(422, "bad_request", "multipart body ends before its closing boundary")
    return files
