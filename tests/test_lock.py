"""The output lock: one run at a time per output, with an expiry; local disk and S3 (moto)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

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


def race_takeovers(root: str, rounds: int) -> Counter:
    """Two runs take over the same stale lock at the same moment, `rounds` times: exactly one may win each time."""
    outcomes: Counter = Counter()
    for n in range(rounds):
        stale = OutputLock(root, ttl_s=0.05)
        stale.acquire()
        time.sleep(0.06)
        barrier = threading.Barrier(2)
        contenders = [OutputLock(root), OutputLock(root)]

        def take(lock: OutputLock) -> str:
            barrier.wait(timeout=10)  # noqa: B023 - both threads join before the loop goes on
            try:
                lock.acquire()
            except OutputLocked as e:
                return "lost at the swap" if "same moment" in str(e) else "lost: saw the winner's lock"
            return "won"

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(take, contenders))
        assert sorted(results)[-1] == "won" and results.count("won") == 1, (n, results)
        winner = contenders[results.index("won")]
        assert winner.holder() == winner.info  # the lock holds the winner's token, not the loser's
        with pytest.raises(OutputLocked, match="taken over"):
            stale.renew()
        winner.release()
        assert winner.holder() is None
        outcomes.update(results)
    return outcomes


def test_two_takeovers_of_a_stale_lock_race_and_one_wins_local(tmp_path):
    outcomes = race_takeovers(str(tmp_path / "out"), 50)
    assert outcomes["won"] == 50


def test_two_takeovers_of_a_stale_lock_race_and_one_wins_s3(tmp_path, s3fs_clean):
    if not s3fs_clean.exists("locks"):
        s3fs_clean.mkdir("locks")
    outcomes = race_takeovers(f"s3://locks/race-{tmp_path.name}", 50)
    assert outcomes["won"] == 50
    # The race was real: some losers had read the stale lock too, and the store refused their swap.
    assert outcomes["lost at the swap"] > 0, outcomes
