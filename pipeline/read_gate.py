"""How many local-file reads of one process run at once.

A local read is a dozen system calls (the root-checked, link-refusing open of pipeline.guard, fstat, read, close),
each of which gives up Python's GIL and takes it back. With the fetch pool's 16 threads all reading page-cached
files, each hand-back waits behind the other threads, and a read took 2-3 times the CPU it takes alone, taken from
the decoding it feeds (bench/RESULTS.md, "The feed"). Two reads at once keep ahead of any decode rate one process
reaches: a page-cached 100 KB file reads in about 0.1 ms.

A read waits for a place at most `wait_s`, then goes all the same: places held that long belong to reads bound by
latency, not CPU (a network file system, a disk), or blocked (a hung mount, whose reads end at their deadlines),
and those should overlap as widely as the fetch pool allows. The cost, by this rule (computed, not measured): reads
of 5 ms each (a busy network file system) go about 1,000 a second instead of the fetch pool's 3,200.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

QUICK_READS = 2  # reads at once, while places come free within WAIT_S
WAIT_S = 0.02  # the longest a read waits for a place (5 ms was too short beside busy decoding: the gain was lost)


class ReadGate:
    """At most `places` reads at once, unless a read has waited `wait_s` for a place."""

    def __init__(self, places: int = QUICK_READS, wait_s: float = WAIT_S) -> None:
        self.places = places
        self.wait_s = wait_s
        self._free: queue.SimpleQueue[None] = queue.SimpleQueue()  # one item a free place: waits in C, no Condition
        for _ in range(places):
            self._free.put(None)

    @contextmanager
    def place(self) -> Iterator[None]:
        """Hold a place for one read; waits at most `wait_s` for one, then goes without."""
        try:
            self._free.get(timeout=self.wait_s)
        except queue.Empty:
            yield  # a read past the limit: no place to give back
            return
        try:
            yield
        finally:
            self._free.put(None)
