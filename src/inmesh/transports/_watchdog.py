"""A deadline watchdog for blocking reads: one daemon thread, a heap of timers.

httpx's read timeout is per read, so an upstream that trickles its body byte by byte is
never cut off by it. The sync transport arms a timer at the attempt's deadline; when it
fires, the connection's socket is shut down and the blocked read returns at once. Arming
and cancelling are O(log n) under a lock; the thread starts on first use.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable

__all__ = ["Timer", "Watchdog", "watchdog"]


class Timer:
    __slots__ = ("callback", "deadline", "owner")

    def __init__(self, deadline: float, callback: Callable[[], None], owner: Watchdog) -> None:
        self.deadline = deadline
        self.callback: Callable[[], None] | None = callback
        self.owner = owner

    @property
    def done(self) -> bool:
        """Cancelled, or fired (or about to: the thread has taken the callback)."""
        return self.callback is None

    def cancel(self) -> None:
        """Never fire, unless the thread has already taken the callback: a caller whose
        cleanup must not race a late callback guards the callback itself. The callback
        (and all it holds: a response, its connection) is let go at once; the heap entry
        goes when the thread or a compaction reaches it."""
        if self.callback is not None:
            self.callback = None
            self.owner._cancelled()


class Watchdog:
    """One daemon thread firing timers at their deadlines.

    Most timers are cancelled long before they fire (an attempt's deadline is seconds
    away; its response is read in microseconds), so cancelled entries are counted and the
    heap is rebuilt without them once they are the majority: the heap stays about as
    large as the number of timers live, rather than one per request of the last deadline.
    """

    _COMPACT_AT = 256  # cancelled entries before a rebuild is worth its O(n)

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._lock = threading.Lock()  # taken directly: a Condition's own `with` is Python
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._dead = 0  # cancelled entries still in the heap
        # When the sleeping thread wakes on its own (inf: not until notified; -inf: it is
        # awake and reads the heap before it sleeps again). A timer due no earlier needs
        # no notify: most arms then cost no wake-up, and no thread switch for the GIL.
        self._wakes_at = math.inf

    def __len__(self) -> int:
        """Entries in the heap, cancelled ones included (for tests and benchmarks)."""
        return len(self._heap)

    def arm(self, deadline: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` at ``deadline`` (time.monotonic) unless cancelled first."""
        timer = Timer(deadline, callback, self)
        with self._lock:
            heapq.heappush(self._heap, (deadline, next(self._counter), timer))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="inmesh-watchdog", daemon=True
                )
                self._thread.start()
            if deadline < self._wakes_at:
                self._wake.notify()
        return timer

    def _cancelled(self) -> None:
        # Counted without the lock: the count only decides when to compact, and a lost
        # increment just delays that (each compaction starts the count afresh).
        self._dead += 1
        dead = self._dead
        if dead >= self._COMPACT_AT and dead * 2 >= len(self._heap):
            self._compact()

    def _compact(self) -> None:
        with self._lock:
            heap = self._heap
            if self._dead * 2 >= len(heap):
                heap[:] = [entry for entry in heap if entry[2].callback is not None]
                heapq.heapify(heap)
                self._dead = 0

    def _run(self) -> None:
        while True:
            with self._lock:
                heap = self._heap
                while not heap or heap[0][2].callback is None:
                    if heap:
                        heapq.heappop(heap)
                        self._dead = max(0, self._dead - 1)
                        continue
                    self._wakes_at = math.inf
                    self._wake.wait()
                    self._wakes_at = -math.inf
                deadline, _, timer = heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._wakes_at = deadline
                    self._wake.wait(delay)
                    self._wakes_at = -math.inf
                    continue
                heapq.heappop(heap)
                callback, timer.callback = timer.callback, None
            if callback is not None:
                with contextlib.suppress(Exception):  # a failed cut must not stop the thread
                    callback()


watchdog = Watchdog()
