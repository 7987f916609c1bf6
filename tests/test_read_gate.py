"""The gate on local reads (pipeline/read_gate.py): quick reads a few at a time, slow or blocked ones not held back."""

from __future__ import annotations

import threading
import time

from blipbatch.pipeline.read_gate import ReadGate


def test_quick_reads_go_a_few_at_a_time():
    gate = ReadGate(places=2, wait_s=5.0)
    lock = threading.Lock()
    in_flight, most = 0, 0

    def read() -> None:
        nonlocal in_flight, most
        with gate.place():
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            time.sleep(0.05)
            with lock:
                in_flight -= 1

    threads = [threading.Thread(target=read) for _ in range(6)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 2
    assert time.monotonic() - start >= 0.15  # three rounds of two


def test_a_read_held_up_past_the_wait_goes_all_the_same():
    """A place held by a blocked read (a hung mount) keeps the next read waiting `wait_s`, not for ever."""
    gate = ReadGate(places=1, wait_s=0.1)
    blocked, release = threading.Event(), threading.Event()

    def hung_read() -> None:
        with gate.place():
            blocked.set()
            release.wait(10)

    hung = threading.Thread(target=hung_read)
    hung.start()
    blocked.wait(5)
    start = time.monotonic()
    with gate.place():
        waited = time.monotonic() - start
    release.set()
    hung.join()
    assert 0.09 <= waited < 2
