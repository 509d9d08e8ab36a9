"""An exclusive lease on a folder under storage.root, so two drivers never share it.

`train` keeps its checkpoints in one folder per (train config, data snapshot): two trains on the
same data would resume each other's MLflow run, overwrite each other's weights, and whichever
ended first would delete the folder under the other. Each takes a lease first: a small JSON file
beside the folder (`<folder>.lease`) naming its holder (lease id, host, pid, since) and when it
expires. The holder renews it in a background thread every quarter of its time to live; a lease
whose holder died is stale once it expires, and the next driver takes it over.

- Local storage (and NFS): the file is created with O_CREAT | O_EXCL, so exactly one creator
  wins. A stale file is first renamed to a name of the taker's own (a rename succeeds once) and
  checked to still be the stale one before it is deleted.
- Object storage (s3a://, s3://): pyarrow offers no conditional PUT, so the lease is written,
  then read back after a pause: two drivers that start within that pause may both see their own
  lease (the later write wins the read-back, the earlier one usually sees the loss). It guards
  against the common case (a second run started later); it is not a lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from imageiq_spark.core import clock
from imageiq_spark.lake import storage

log = logging.getLogger(__name__)

#: A lease not renewed for this long is stale: its holder died (renewals come every quarter of it).
TTL_S = 120.0
#: How often a waiting driver looks at the lease again.
POLL_S = 2.0
#: Object storage: how long a writer waits before reading its lease back.
SETTLE_S = 1.0


class LeaseHeld(RuntimeError):
    """Another live driver holds the lease."""


class LeaseLost(RuntimeError):
    """The lease was taken over while held (the holder stalled past its time to live)."""


def _now() -> float:
    return time.time()


def _stamp(seconds: float) -> str:
    return clock.utc_from_timestamp(seconds).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class Lease:
    """A held lease; `release` (or the end of `hold`'s block) gives it back."""

    uri: str
    record: dict[str, Any]
    ttl_s: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _lost: bool = False
    _heart: threading.Thread | None = None

    def start_heartbeat(self) -> None:
        self._heart = threading.Thread(target=self._heartbeat, name="imageiq-lease", daemon=True)
        self._heart.start()

    @property
    def lease_id(self) -> str:
        return str(self.record["lease_id"])

    def check(self) -> None:
        """Raise LeaseLost if another driver took the lease over; call before an irreversible step."""
        current, _ = read(self.uri)
        if self._lost or current is None or current.get("lease_id") != self.lease_id:
            self._lost = True
            holder = describe(current) if current else "nobody"
            raise LeaseLost(f"lost the lease {self.uri} (now held by {holder}): this driver stalled "
                            f"longer than {self.ttl_s:.0f} s without renewing it")

    def renew(self) -> bool:
        """Push the expiry out, if the lease is still ours; False once it is not."""
        current, _ = read(self.uri)
        if current is None or current.get("lease_id") != self.lease_id:
            self._lost = True
            return False
        self.record["expires_at"] = _now() + self.ttl_s
        storage.write_bytes(self.uri, _encode(self.record))
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    log.error("lease %s was taken over by another driver", self.uri)
                    return
            except OSError as exc:  # a storage hiccup: the next beat tries again
                log.warning("could not renew lease %s: %s", self.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._heart is not None:
            self._heart.join()  # a renewal in flight would write the file again after the delete
        current, _ = read(self.uri)
        if current is not None and current.get("lease_id") == self.lease_id:
            filesystem, path = storage.filesystem(self.uri)
            filesystem.delete_file(path)


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def read(uri: str) -> tuple[dict[str, Any] | None, bytes | None]:
    """(the lease's record, its raw bytes); (None, None) when there is none. A file being written
    (unparsable) reads as a record with no expiry: held, until its modification time is TTL old."""
    raw = storage.read_bytes(uri)
    if raw is None:
        return None, None
    try:
        return json.loads(raw), raw
    except ValueError:
        filesystem, path = storage.filesystem(uri)
        info = filesystem.get_file_info(path)
        modified = info.mtime.timestamp() if info.mtime else _now()
        return {"lease_id": None, "expires_at": modified + TTL_S}, raw


def describe(record: dict[str, Any]) -> str:
    """Who holds a lease, for messages."""
    since = f", since {_stamp(record['acquired_at'])}" if record.get("acquired_at") else ""
    return (f"{record.get('holder', 'a driver')} (host {record.get('host', '?')}, pid "
            f"{record.get('pid', '?')}, lease {record.get('lease_id')}{since}, expires "
            f"{_stamp(record['expires_at'])} unless renewed)")


def _try_local(path: str, record: dict[str, Any], stale: bytes | None) -> bool:
    """One attempt on local storage: remove `stale` (the bytes of an expired lease) if it is still
    there, then create the file exclusively."""
    if stale is not None:
        grave = f"{path}.stale-{record['lease_id']}"
        try:
            os.rename(path, grave)  # exactly one taker moves a given file
        except FileNotFoundError:
            return False
        with open(grave, "rb") as moved:
            still_stale = moved.read() == stale
        if not still_stale:
            # Renewed (or replaced) between our read and our rename: put it back unless a new one is there.
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
            os.unlink(grave)
            return False
        os.unlink(grave)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as out:
        out.write(_encode(record))
        out.flush()
        os.fsync(out.fileno())
    return True


def _try_object_store(uri: str, record: dict[str, Any]) -> bool:
    """One attempt on object storage: write, wait, read back (see the module's caveat)."""
    storage.write_bytes(uri, _encode(record))
    time.sleep(SETTLE_S)
    current, _ = read(uri)
    return current is not None and current.get("lease_id") == record["lease_id"]


def acquire(uri: str, holder: str, wait_s: float, wait_key: str = "", ttl_s: float = TTL_S,
            poll_s: float = POLL_S) -> Lease:
    """Take the lease at `uri` for `holder` (a name for messages), waiting up to `wait_s` for a
    live holder to give it back; raises LeaseHeld naming that holder when it does not (and the
    config key `wait_key` that sets the wait). A stale lease is taken over."""
    record = {"lease_id": uuid.uuid4().hex, "holder": holder, "host": socket.gethostname(),
              "pid": os.getpid(), "acquired_at": _now()}
    deadline = time.monotonic() + wait_s
    local = storage.is_local(uri)
    _, path = storage.filesystem(uri)
    logged = False
    while True:
        current, raw = read(uri)
        stale = current is not None and float(current.get("expires_at", 0)) < _now()
        if stale:
            log.warning("taking over the stale lease %s of %s", uri, describe(current))
        if current is None or stale:
            record["expires_at"] = _now() + ttl_s
            taken = (_try_local(path, record, raw if stale else None) if local
                     else _try_object_store(uri, record))
            if taken:
                lease = Lease(uri, record, ttl_s)
                lease.start_heartbeat()
                return lease
            continue  # lost the race for it: look again at once
        if time.monotonic() >= deadline:
            setting = f" ({wait_key}, now {wait_s:g} s)" if wait_key else ""
            raise LeaseHeld(
                f"{holder}: {uri} is held by {describe(current)}: another run is using it. Let it "
                f"finish and run again, or let this run wait longer for it{setting}. A lease whose "
                f"holder died is taken over {ttl_s:g} s after its last renewal"
            )
        if not logged:
            log.info("%s: waiting up to %g s for %s, held by %s", holder, wait_s, uri, describe(current))
            logged = True
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


@contextmanager
def hold(uri: str, holder: str, wait_s: float, wait_key: str = "", ttl_s: float = TTL_S
         ) -> Iterator[Lease]:
    """`acquire` for the duration of a block."""
    lease = acquire(uri, holder, wait_s, wait_key, ttl_s)
    try:
        yield lease
    finally:
        lease.release()
