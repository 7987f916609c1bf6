"""The output lock: one run at a time per output, with an expiry; local disk and S3 (moto)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from blipbatch.pipeline.lock import LOCK_NAME, OutputLock, OutputLocked


def roots(tmp_path, s3fs_clean):
    if not s3fs_clean.exists("locks"):
        s3fs_clean.mkdir("locks")
    return [str(tmp_path / "out"), f"s3://locks/{tmp_path.name}"]


def test_second_holder_is_refused_until_release(tmp_path, s3fs_clean):
    for root in roots(tmp_path, s3fs_clean):
        first = OutputLock(root)
        first.acquire()
        with pytest.raises(OutputLocked, match=r"is being written by another run \(held by pid \d+ on .*expires in"):
            OutputLock(root).acquire()
        first.renew()
        first.release()
        with OutputLock(root):
            pass


def test_an_expired_lock_is_taken_over_and_its_holder_told(tmp_path, s3fs_clean):
    for root in roots(tmp_path, s3fs_clean):
        stale = OutputLock(root, ttl_s=0.2)
        stale.acquire()
        time.sleep(0.3)
        fresh = OutputLock(root)
        fresh.acquire()
        with pytest.raises(OutputLocked, match="taken over"):
            stale.renew()
        fresh.release()


def test_a_dead_local_holder_does_not_block(tmp_path):
    root = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = OutputLock(str(root))
    lock.acquire()
    held = json.loads((root / LOCK_NAME).read_text())
    held["pid"] = int(dead.stdout)  # a process of this host that has exited
    (root / LOCK_NAME).write_text(json.dumps(held))
    with OutputLock(str(root)):
        pass


def test_renewal_pushes_the_expiry(tmp_path):
    lock = OutputLock(str(tmp_path), ttl_s=0.6)
    lock.acquire()
    first = lock.info.expires_at
    time.sleep(0.3)
    lock.maybe_renew()  # more than a third of the ttl has passed
    assert lock.info.expires_at > first
    with pytest.raises(OutputLocked):
        OutputLock(str(tmp_path)).acquire()
