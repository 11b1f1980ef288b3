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
import threading
import time
from collections.abc import Callable

__all__ = ["Timer", "Watchdog", "watchdog"]


class Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True  # the heap entry stays; the thread skips it


class Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` at ``deadline`` (time.monotonic) unless cancelled first."""
        timer = Timer(deadline, callback)
        with self._wake:
            heapq.heappush(self._heap, (deadline, next(self._counter), timer))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="inmesh-watchdog", daemon=True
                )
                self._thread.start()
            if self._heap[0][2] is timer:
                self._wake.notify()
        return timer

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][2].cancelled:
                    if self._heap:
                        heapq.heappop(self._heap)
                        continue
                    self._wake.wait()
                deadline, _, timer = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._heap)
            if not timer.cancelled:
                with contextlib.suppress(Exception):  # a failed cut must not stop the thread
                    timer.callback()


watchdog = Watchdog()
