"""The lease on a folder (`imageiq_spark.lake.lease`): exclusive, waited for, renewed, taken over once
stale, and lost when taken over; on local files (no Spark)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from imageiq_spark.lake import lease


def test_a_second_holder_is_refused_with_the_holders_identity(tmp_path):
    uri = str(tmp_path / "ckpt.lease")
    first = lease.acquire(uri, "train", wait_s=0)
    try:
        with pytest.raises(lease.LeaseHeld) as refused:
            lease.acquire(uri, "train", wait_s=0, wait_key="train.lease_wait_s")
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, lease {first.lease_id}" in message
        assert "(train.lease_wait_s, now 0 s)" in message
        assert json.loads((tmp_path / "ckpt.lease").read_text())["lease_id"] == first.lease_id
    finally:
        first.release()
    assert not (tmp_path / "ckpt.lease").exists()


def test_a_waiting_holder_gets_the_lease_when_it_is_released(tmp_path):
    uri = str(tmp_path / "ckpt.lease")
    first = lease.acquire(uri, "train", wait_s=0)
    threading.Timer(0.3, first.release).start()
    started = time.monotonic()

    with lease.hold(uri, "train", wait_s=30) as second:
        waited = time.monotonic() - started
        assert json.loads((tmp_path / "ckpt.lease").read_text())["lease_id"] == second.lease_id

    assert 0.3 <= waited < 10
    assert not (tmp_path / "ckpt.lease").exists()


def test_a_stale_lease_of_a_dead_driver_is_taken_over_at_once(tmp_path):
    path = tmp_path / "ckpt.lease"
    path.write_text(json.dumps({"lease_id": "dead", "host": "gone", "pid": 1, "expires_at": time.time() - 1}))

    with lease.hold(str(path), "train", wait_s=0) as taken:
        assert json.loads(path.read_text())["lease_id"] == taken.lease_id != "dead"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no renamed stale file left behind


def test_the_holder_renews_its_lease_and_notices_a_takeover(tmp_path):
    path = tmp_path / "ckpt.lease"
    held = lease.acquire(str(path), "train", wait_s=0, ttl_s=0.4)
    try:
        time.sleep(0.6)  # longer than the time to live: only renewals keep it fresh
        assert json.loads(path.read_text())["expires_at"] > time.time()
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(str(path), "train", wait_s=0)
        held.check()
        path.write_text(json.dumps({"lease_id": "other", "expires_at": time.time() + 60}))
        with pytest.raises(lease.LeaseLost, match="lease other"):
            held.check()
    finally:
        held.release()
    assert json.loads(path.read_text())["lease_id"] == "other"  # not ours: left alone
