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
    """Fired by the watchdog's thread at ``deadline``, unless cancelled first. ``arm``
    makes one that calls a callback; a subclass says what firing does itself (``fire``)
    and is armed with ``add``: one object per deadline rather than a timer and a bound
    method. Its fields are ``deadline``, ``owner`` and ``live`` (True until cancelled or
    taken), which each subclass's ``__init__`` sets itself: a call fewer on every
    request than a base constructor would cost. The heap keeps a cancelled timer until
    the thread or a compaction reaches it: a subclass lets go of what it holds (a
    response, its connection) when it is cancelled or before."""

    __slots__ = ("deadline", "live", "owner")

    deadline: float
    owner: Watchdog
    live: bool

    @property
    def done(self) -> bool:
        """Cancelled, or fired (or about to: the thread has taken it)."""
        return not self.live

    def cancel(self) -> None:
        """Never fire, unless the thread has already taken the timer: a caller whose
        cleanup must not race a late firing guards ``fire`` itself."""
        if self.live:
            self.live = False
            self.owner._cancelled()

    def fire(self) -> None:
        raise NotImplementedError


class _Callback(Timer):
    __slots__ = ("callback",)

    def __init__(self, deadline: float, owner: Watchdog, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.owner = owner
        self.live = True
        self.callback: Callable[[], None] | None = callback

    def fire(self) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()

    def cancel(self) -> None:
        self.callback = None  # let go of it (and all it holds) at once
        Timer.cancel(self)


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
        timer = _Callback(deadline, self, callback)
        self.add(timer)
        return timer

    def add(self, timer: Timer) -> None:
        """Fire ``timer`` (made for this watchdog) at its deadline unless cancelled first."""
        deadline = timer.deadline
        with self._lock:
            heapq.heappush(self._heap, (deadline, next(self._counter), timer))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="inmesh-watchdog", daemon=True
                )
                self._thread.start()
            if deadline < self._wakes_at:
                self._wake.notify()

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
                heap[:] = [entry for entry in heap if entry[2].live]
                heapq.heapify(heap)
                self._dead = 0

    def _run(self) -> None:
        while True:
            with self._lock:
                heap = self._heap
                while not heap or not heap[0][2].live:
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
                taken, timer.live = timer.live, False
            if taken:
                with contextlib.suppress(Exception):  # a failed cut must not stop the thread
                    timer.fire()


watchdog = Watchdog()
