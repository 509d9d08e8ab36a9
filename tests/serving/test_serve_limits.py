"""imageiq serve on a network: body, pixel, concurrency and time limits, the bearer token, and a
hostile load, against real `imageiq serve` processes on 127.0.0.1 (nothing else is contacted).

Two servers share one registered model: `guarded` (a token, tiny limits: one request at a time,
one waiting, 5 s for a body, 3 s for headers) for each refusal, and `open_server` (the default limits, 3 s
deadlines) for the hostile load."""

from __future__ import annotations

import base64
import functools
import json
import resource
import select
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import psutil
import pytest
import requests
from conftest import make_config
from registered import register
from test_serve import ServerProcess, crafted_png

from imageiq_spark.cli.sample_data import load_digits
from imageiq_spark.core.config import ConfigError
from imageiq_spark.core.config_sections import ServeConfig
from imageiq_spark.serving.limits import TOKEN_ENV, read_token

TOKEN = "s3cret-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 200_000  # guarded: serve.max_body_bytes
PIXELS = 250_000  # guarded: serve.max_pixels
BODY_DEADLINE_S = 5.0  # guarded: serve.body_timeout_s
HEADER_DEADLINE_S = 3.0  # guarded: serve.header_timeout_s
MiB = 1024 * 1024
CHUNK = b"A" * (64 * 1024)


@pytest.fixture(scope="module", autouse=True)
def many_files():
    """Thousands of sockets: the soft fd limit raised to the hard one, for the servers too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def servers(spark, tmp_path_factory, many_files):
    root = tmp_path_factory.mktemp("serve_limits")
    model = {"registered_model": f"limits_{uuid.uuid4().hex[:8]}"}
    register(spark, make_config(root, mlflow=model), seed=1)
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    guarded = ServerProcess(root, make_config(root, mlflow=model, serve={
        "alias_poll_s": 0.0, "auth_token_file": str(token_file), "max_body_bytes": LIMIT,
        "max_pixels": PIXELS, "max_concurrency": 1, "max_queue": 1,
        "body_timeout_s": BODY_DEADLINE_S, "header_timeout_s": HEADER_DEADLINE_S}))
    open_server = ServerProcess(root, make_config(root, mlflow=model, serve={
        "alias_poll_s": 0.0, "body_timeout_s": 3.0, "header_timeout_s": 3.0}))
    yield guarded.wait_ready(), open_server.wait_ready()
    for server in (guarded, open_server):
        assert server.stop(), server.log_text()


@pytest.fixture(scope="module")
def guarded(servers) -> ServerProcess:
    return servers[0]


@pytest.fixture(scope="module")
def open_server(servers) -> ServerProcess:
    return servers[1]


@functools.cache
def digit_png(i: int = 0) -> bytes:
    return cv2.imencode(".png", load_digits()[0][i])[1].tobytes()


def post_png(url: str, data: bytes, auth: dict[str, str] = AUTH,
             session: requests.Session | None = None) -> requests.Response:
    return (session or requests).post(f"{url}/predict", data=data, timeout=60,
                                      headers={**auth, "Content-Type": "image/png"})


# --- a raw HTTP client: bodies streamed from generators, answers read as soon as they come -------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the kernel took before the answer came
    closed: bool = False  # the server closed the connection after answering

    def json(self) -> dict:
        return json.loads(self.body)


def chunked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def repeated(total: int, prefix: bytes = b"") -> Iterator[bytes]:
    """`prefix`, then `total` bytes of 'A' in 64 KiB chunks, none held beyond the one sent."""
    yield prefix
    for _ in range(total // len(CHUNK)):
        yield CHUNK


def head(port: int, path: str, headers: dict[str, str], method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, sent: int, timeout: float = 30) -> Answer:
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError(f"closed without an answer after {sent} bytes")
            data += more
        top, _, body = data.partition(b"\r\n\r\n")
        lines = top.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
        try:
            sock.settimeout(2)
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionError:
            closed = True
        return Answer(int(lines[0].split()[1]), headers, body, sent, closed)
    finally:
        sock.close()


def wait_for(sock: socket.socket, events: int, timeout: float) -> int:
    """The poll events of `sock` among `events` within `timeout` s, 0 if none (select() would
    refuse the fd numbers above 1024 a test with thousands of sockets uses)."""
    poller = select.poll()
    poller.register(sock, events)
    ready = poller.poll(max(0.0, timeout) * 1000)
    return ready[0][1] if ready else 0


def send_streaming(port: int, request_head: bytes, chunks: Iterable[bytes], timeout: float = 60) -> Answer:
    """Send the head, then the chunks, until the server answers (checked before every send)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request_head)
    sock.setblocking(False)
    sent, end = 0, time.monotonic() + timeout
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                ready = wait_for(sock, select.POLLIN | select.POLLOUT, end - time.monotonic())
                if ready & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    return read_answer(sock, sent)
                if not ready & select.POLLOUT:
                    raise TimeoutError(f"no answer and no progress after {sent} bytes")
                try:
                    n = sock.send(view)
                except BlockingIOError:
                    continue
                view, sent = view[n:], sent + n
    except (BrokenPipeError, ConnectionResetError):
        pass
    return read_answer(sock, sent)


def rss(server: ServerProcess) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


class PeakRss(threading.Thread):
    """The server's largest RSS, sampled every 50 ms until stopped."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.server, self.peak, self._done = server, rss(server), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, rss(self.server))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def v2_head(port: int, name: str, length: int | None = None, extra: dict | None = None) -> bytes:
    size = {"Content-Length": str(length)} if length is not None else {"Transfer-Encoding": "chunked"}
    return head(port, f"/v2/models/{name}/infer",
                {"Content-Type": "application/json", **size, **(extra or {})})


V2_PREFIX = b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["'


def model_name(server: ServerProcess, headers: dict | None = None) -> str:
    return requests.get(f"{server.url}/model", headers=headers, timeout=10).json()["name"]


# --- body size, enforced while it streams in ---------------------------------------------------


def test_v2_body_over_the_limit_is_413_without_the_server_growing(open_server):
    """Was: a 200 MB v2 JSON body was read whole (RSS +0.8 GB) before a 422."""
    name, port = model_name(open_server), open_server.port
    before = rss(open_server)
    peak = PeakRss(open_server)
    peak.start()
    declared = send_streaming(port, v2_head(port, name, 200_000_000), repeated(200_000_000, V2_PREFIX))
    streamed = send_streaming(port, v2_head(port, name), chunked(repeated(200_000_000, V2_PREFIX)))
    grown = peak.stop() - before
    for answer in (declared, streamed):
        assert (answer.status, answer.json()["error"]) == (413, "too_large")
        assert answer.headers["connection"] == "close" and answer.closed
    assert declared.json()["detail"] == f"200000000 bytes > serve.max_body_bytes {20 * MiB}"
    assert declared.sent < 16 * MiB  # refused from its Content-Length, before it was read
    assert 20 * MiB < streamed.sent < 20 * MiB + 16 * MiB  # counted up to the limit, then refused
    assert grown < 150 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
    assert requests.get(f"{open_server.url}/v2/health/ready", timeout=10).status_code == 200


def multipart_head(port: int, boundary: str, extra: dict[str, str]) -> bytes:
    return head(port, "/predict", {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                   "Transfer-Encoding": "chunked", **extra})


def file_part(boundary: str, name: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()


def test_multipart_part_over_the_limit_is_refused_before_it_is_written(guarded):
    """Was: starlette spooled every part to a temporary file before its size was checked."""
    boundary = uuid.uuid4().hex
    answer = send_streaming(guarded.port, multipart_head(guarded.port, boundary, AUTH),
                            chunked(repeated(100 * MiB, file_part(boundary, "huge.png"))))
    assert (answer.status, answer.json()["error"]) == (413, "too_large")
    assert answer.json()["detail"] == f"more than {LIMIT} bytes (serve.max_body_bytes)"
    assert answer.sent < 16 * MiB and answer.closed  # the other 84+ MiB were never read


def test_multipart_with_good_files_still_works_and_counts_files(guarded):
    files = [("files", (f"{i}.png", digit_png(i), "image/png")) for i in range(3)]
    response = requests.post(f"{guarded.url}/predict", files=files, data={"note": "x"}, headers=AUTH,
                             timeout=60)
    assert response.status_code == 200, response.text
    assert [p["filename"] for p in response.json()["predictions"]] == ["0.png", "1.png", "2.png"]
    truncated = file_part("b", "0.png") + digit_png()  # no closing boundary
    response = requests.post(f"{guarded.url}/predict", data=truncated, timeout=60,
                             headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"})
    assert (response.status_code, response.json()["error"]) == (422, "bad_request")


# --- pixels, from the header -------------------------------------------------------------------


def rgba16_png(side: int) -> bytes:
    return cv2.imencode(".png", np.zeros((side, side, 4), np.uint16))[1].tobytes()


def test_image_over_serve_max_pixels_is_refused_from_its_header(guarded):
    """Was: the batch limit (ingest.max_pixels, 100 MP) applied online."""
    name = model_name(guarded, AUTH)
    small, large = rgba16_png(400), rgba16_png(600)  # 160,000 and 360,000 pixels; 250,000 allowed
    assert len(large) < LIMIT
    ok = post_png(guarded.url, small)
    assert ok.status_code == 200, ok.text
    raw = post_png(guarded.url, large)
    form = requests.post(f"{guarded.url}/predict", headers=AUTH, timeout=60,
                         files=[("files", ("a.png", small)), ("files", ("b.png", large))])
    v2 = requests.post(f"{guarded.url}/v2/models/{name}/infer", headers=AUTH, timeout=60, json={"inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(large).decode()]}]})
    for response, where in ((raw, ""), (form, "image 1: "), (v2, "")):
        assert response.status_code == 422
        assert response.json() == {"error": "too_many_pixels",
                                   "detail": f"{where}600x600 = 360000 pixels > {PIXELS}"}
    bomb = crafted_png(60_000, 60_000, zlib.compress(bytes(1000)))
    response = post_png(guarded.url, bomb)
    assert response.json()["error"] == "too_many_pixels"


# --- concurrency, a bounded queue, then 503 ----------------------------------------------------


def hold_slot(port: int) -> socket.socket:
    """A request that sent its headers and 10 of its 1,000 body bytes: it holds its slot."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    headers = {**AUTH, "Content-Type": "image/png", "Content-Length": "1000"}
    sock.sendall(head(port, "/predict", headers) + b"x" * 10)
    return sock


def test_beyond_concurrency_and_queue_is_503_with_retry_after(guarded):
    """Was: no limit; every request was taken in."""
    image = digit_png()
    running = hold_slot(guarded.port)
    time.sleep(0.3)
    waiting = hold_slot(guarded.port)
    time.sleep(0.3)
    refused = post_png(guarded.url, image)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"] == "overloaded"
    assert requests.get(f"{guarded.url}/v2/health/live", timeout=10).status_code == 200  # not counted
    for sock in (running, waiting):  # both finish their bodies: not images, but answered
        sock.sendall(b"x" * 990)
        answer = read_answer(sock, 1000)
        assert (answer.status, answer.json()["error"]) == (422, "not_image"), answer
    after = post_png(guarded.url, digit_png())
    assert after.status_code == 200
    text = requests.get(f"{guarded.url}/metrics", headers=AUTH, timeout=10).text
    assert 'imageiq_serve_requests_total{method="POST",route="/predict",status="503"} 1.0' in text


# --- time limits -------------------------------------------------------------------------------


def test_slow_body_is_answered_408_and_dropped(guarded):
    """Was: a client could take forever to send its body, holding the request open."""
    sock = hold_slot(guarded.port)
    started = time.monotonic()
    answer = read_answer(sock, 10)
    assert (answer.status, answer.json()["error"]) == (408, "body_timeout")
    assert BODY_DEADLINE_S - 0.2 < time.monotonic() - started < BODY_DEADLINE_S + 3 and answer.closed


def test_slow_headers_get_408_and_silent_connections_are_closed(guarded):
    started = time.monotonic()
    slow = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
    slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    silent = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
    answer = read_answer(slow, 0)
    assert (answer.status, answer.json()["error"]) == (408, "header_timeout") and answer.closed
    assert silent.recv(1) == b""  # closed by the server, nothing said
    assert HEADER_DEADLINE_S - 0.2 < time.monotonic() - started < HEADER_DEADLINE_S + 3
    silent.close()


def test_oversized_headers_are_431(guarded):
    sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    answer = read_answer(sock, 0)
    assert (answer.status, answer.json()["error"]) == (431, "header_too_large")


# --- the bearer token --------------------------------------------------------------------------


def test_token_is_required_but_health_probes_stay_open(guarded):
    """Was: no authentication; /metrics and /model were open."""
    url = guarded.url
    for path in ("/model", "/metrics", "/", "/v2"):
        missing = requests.get(url + path, timeout=10)
        assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="imageiq"'
        wrong = requests.get(url + path, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="imageiq", error="invalid_token"'
        assert requests.get(url + path, headers=AUTH, timeout=10).status_code == 200
    refused = post_png(url, digit_png(), {})
    assert refused.status_code == 401
    ok = post_png(url, digit_png())
    assert ok.status_code == 200
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert requests.get(url + path, timeout=10).status_code == 200
    assert TOKEN not in guarded.log.read_text(errors="replace")


def test_the_token_comes_from_its_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert read_token(ServeConfig()) is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(ServeConfig()) == b"from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token(ServeConfig(auth_token_file=str(tmp_path / "t"))) == b"from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="serve.auth_token_file: .* is empty"):
        read_token(ServeConfig(auth_token_file=str(tmp_path / "empty")))


# --- hostile load ------------------------------------------------------------------------------


@dataclass
class Load:
    idle: int  # connections opened at once that send nothing
    slow: int  # clients sending their body a byte every 0.5 s, again and again
    huge_v2: int  # 200 MB v2 bodies at once (chunked: counted by the server)
    bad_images: int  # corrupt images and decompression bombs, half each
    seconds: float  # how long the steady client and the slow clients go on


@dataclass
class Outcome:
    steady: list[tuple[int, float]] = field(default_factory=list)  # (status, seconds)
    statuses: dict[str, list[int]] = field(default_factory=dict)
    idle_held: int = 0
    idle_closed: int = 0


def bad_images(n: int) -> Iterator[bytes]:
    rng = np.random.default_rng(0)
    good = digit_png()
    for i in range(n):
        if i % 2:
            yield crafted_png(int(rng.integers(10_000, 100_000)), 50_000, zlib.compress(bytes(100_000)))
        else:
            data = bytearray(good)
            data[int(rng.integers(8, len(data)))] ^= 0xFF
            yield bytes(data[: int(rng.integers(1, len(data)))]) if i % 4 == 0 else bytes(data)


def hostile_load(server: ServerProcess, load: Load) -> tuple[Outcome, int, int]:
    """Run `load` against `server` while one steady client posts a good digit; returns what each
    client saw, the server's RSS before and its peak during."""
    url, port, name = server.url, server.port, model_name(server)
    outcome, stop = Outcome(), threading.Event()
    before = rss(server)
    peak = PeakRss(server)
    peak.start()

    def steady() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                started = time.perf_counter()
                status = session.post(f"{url}/predict", data=digit_png(1), timeout=30,
                                      headers={"Content-Type": "image/png"}).status_code
                outcome.steady.append((status, time.perf_counter() - started))

    def slow() -> list[int]:
        seen = []
        while not stop.is_set():
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(head(port, "/predict", {"Content-Type": "image/png", "Content-Length": "100000"}))
            try:
                while not stop.is_set() and not wait_for(sock, select.POLLIN, 0.5):
                    sock.sendall(b"x")
            except OSError:
                pass
            seen.append(read_answer(sock, 0).status if not stop.is_set() else 0)
        return [s for s in seen if s]

    def huge_v2(_: int) -> int:
        return send_streaming(port, v2_head(port, name), chunked(repeated(200_000_000, V2_PREFIX))).status

    def huge_multipart() -> int:
        boundary = uuid.uuid4().hex
        return send_streaming(port, multipart_head(port, boundary, {}),
                              chunked(repeated(1024 * MiB, file_part(boundary, "1GiB.png")))).status

    def bad(data: bytes) -> int:
        return post_png(url, data, {}).status_code

    started = time.monotonic()
    idle: list[socket.socket] = []
    with ThreadPoolExecutor(2 + load.slow + load.huge_v2 + 4) as pool:
        steady_client = pool.submit(steady)
        try:  # whatever fails, the clients that loop until `stop` are stopped
            idle += [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(load.idle)]
            outcome.idle_held = len(idle)
            slow_clients = [pool.submit(slow) for _ in range(load.slow)]
            huge = [pool.submit(huge_v2, i) for i in range(load.huge_v2)] + [pool.submit(huge_multipart)]
            bad_answers = list(pool.map(bad, bad_images(load.bad_images)))
            outcome.statuses["huge"] = [f.result() for f in huge]
            stop.wait(max(0.0, started + load.seconds - time.monotonic()))
        finally:
            stop.set()
        steady_client.result()
        outcome.statuses["slow"] = [s for c in slow_clients for s in c.result()]
        outcome.statuses["bad"] = bad_answers
    for sock in idle:
        sock.setblocking(False)
        try:
            outcome.idle_closed += sock.recv(1) == b""
        except (BlockingIOError, ConnectionError):
            pass
        sock.close()
    return outcome, before, peak.stop()


def check_hostile_load(server: ServerProcess, load: Load, bound: int) -> None:
    outcome, before, peak = hostile_load(server, load)
    statuses = [s for s, _ in outcome.steady]
    latencies = sorted(t for _, t in outcome.steady)
    print(f"\nhostile load {load}: {outcome.idle_held} idle connections held, "
          f"{outcome.idle_closed} closed by the server; RSS {before / MiB:.0f} MiB before, peak "
          f"{peak / MiB:.0f} MiB; steady client {statuses.count(200)}/{len(statuses)} answered 200, "
          f"latency median {1000 * latencies[len(latencies) // 2]:.0f} ms, max "
          f"{1000 * latencies[-1]:.0f} ms; slow clients answered {sorted(set(outcome.statuses['slow']))} "
          f"x{len(outcome.statuses['slow'])}; load average {psutil.getloadavg()}")
    assert statuses and set(statuses) == {200}
    assert outcome.statuses["huge"] == [413] * (load.huge_v2 + 1)
    assert set(outcome.statuses["bad"]) <= {422} and len(outcome.statuses["bad"]) == load.bad_images
    assert set(outcome.statuses["slow"]) <= {408} and len(outcome.statuses["slow"]) >= load.slow
    assert outcome.idle_held == load.idle and outcome.idle_closed == load.idle
    assert peak < bound, f"peak RSS {peak / MiB:.0f} MiB >= {bound / MiB:.0f} MiB"
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200


#: The server's RSS stays under its idle RSS plus this: at most max_concurrency bodies of
#: max_body_bytes are buffered, and here far fewer are in flight at once.
RSS_HEADROOM = 600 * MiB


def test_hostile_load_short(open_server):
    check_hostile_load(open_server, Load(idle=1000, slow=4, huge_v2=10, bad_images=200, seconds=15),
                       rss(open_server) + RSS_HEADROOM)


@pytest.mark.slow
def test_hostile_load(open_server, many_files):
    idle = min(5000, many_files // 2 - 500)
    check_hostile_load(open_server, Load(idle=idle, slow=8, huge_v2=10, bad_images=1000, seconds=60),
                       rss(open_server) + RSS_HEADROOM)
