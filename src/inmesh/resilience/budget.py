"""Retry budgets: retries may add a bounded share of load, so they cannot multiply an outage.

Two budgets, both per cluster, both thread-safe, both fed the clock by the caller:

``ConcurrencyBudget``
    Envoy's ``retry_budget`` circuit breaker, which Istio configures from a
    DestinationRule's ``trafficPolicy.retryBudget``. A retry may start while the retries in
    flight are fewer than ``max(min_retry_concurrency, ⌊percent% × active requests⌋)``
    (Envoy truncates the product to an integer, ``ResourceManagerImpl::RetryBudgetImpl``).
    With ``budget_interval`` set, the requests *started* in the last ``budget_interval``
    seconds take the place of the active ones. Envoy lets a configured retry budget
    override the cluster's ``maxRetries`` breaker; callers should do the same.

``RatioBudget``
    The Finagle / Linkerd budget that inmesh's MeshConfig ``retryBudget`` configures: every
    original request deposits one token, every retry withdraws one, tokens expire after
    ``ttl`` seconds, and a reserve of ``min_retries_per_second × ttl`` lets a quiet client
    retry at all. A retry is allowed when, counting itself, the retries of the last ``ttl``
    are at most ``retry_ratio × requests of the last ttl + reserve``.

Both windows are bucketed (``_Window``): ten buckets of a tenth of the window each, so a
count costs O(1) and memory is fixed. An event stays counted for between 0.9 and 1.0 of
the window, the same approximation Finagle's ``WindowedAdder`` makes.

Counting convention (what the attempt loop does): ``request_started`` / ``deposit`` once
per call, not per attempt; ``try_begin_retry`` / ``try_withdraw`` once per retry, and for
the concurrency budget ``end_retry`` when that retry's attempt is over.
"""

from __future__ import annotations

import math
import threading
from typing import Final

from inmesh.config.model import RatioRetryBudget, RetryBudget

__all__ = ["ConcurrencyBudget", "RatioBudget"]

_BUCKETS: Final = 10
_MIN_SPAN: Final = 0.001  # seconds; a zero window would divide by zero
_EPSILON: Final = 1e-9  # 0.07 × 100 is 7.000000000000001: compare with a hair of slack


class _Window:
    """A count of events over the last ``span`` seconds, in ``_BUCKETS`` time buckets.

    Not locked: its owner's lock covers it, except ``add_current``. A ``now`` older than
    the newest bucket (a clock read that lost a race with another thread's) counts in the
    newest bucket.
    """

    __slots__ = ("_counts", "_newest", "_slice")

    def __init__(self, span: float) -> None:
        self._slice = max(span, _MIN_SPAN) / _BUCKETS
        self._counts = [0] * _BUCKETS
        self._newest: int | None = None  # absolute bucket number of the newest bucket

    def _advance(self, now: float) -> int:
        bucket = math.floor(now / self._slice)
        newest = self._newest
        if newest is None:
            self._newest = bucket
            return bucket
        if bucket <= newest:
            return newest
        counts = self._counts
        for step in range(1, min(bucket - newest, _BUCKETS) + 1):
            counts[(newest + step) % _BUCKETS] = 0
        self._newest = bucket
        return bucket

    def add(self, now: float) -> None:
        if not self.add_current(now):  # a new bucket: drop the expired ones first
            self._counts[self._advance(now) % _BUCKETS] += 1

    def add_current(self, now: float) -> bool:
        """``add`` without the owner's lock, when ``now`` falls in the newest bucket (no
        bucket to expire); False otherwise: take the lock and ``add``."""
        bucket = int(now / self._slice)  # floor: the clock is never negative
        if bucket != self._newest:
            return False
        self._counts[bucket % _BUCKETS] += 1
        return True

    def total(self, now: float) -> int:
        self._advance(now)
        return sum(self._counts)  # ten numbers: cheaper kept than a running sum kept right


class ConcurrencyBudget:
    """Envoy's ``retry_budget``: concurrent retries as a share of requests."""

    __slots__ = ("_calls", "_lock", "_retries", "_settings", "_window")

    def __init__(self, settings: RetryBudget) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        # Calls in flight: one item each, so that a call's start and end (every call) are
        # an atomic append and pop, without the lock (retries, rarer, take it).
        self._calls: list[None] = []
        self._retries = 0
        interval = settings.budget_interval
        self._window = _Window(interval) if interval else None

    @property
    def settings(self) -> RetryBudget:
        return self._settings

    @property
    def active(self) -> int:
        """Calls in flight."""
        return len(self._calls)

    @property
    def retries(self) -> int:
        """Retries in flight."""
        return self._retries

    def request_started(self, now: float) -> None:
        """A call to the cluster begins (once per call, not per attempt)."""
        self._calls.append(None)
        window = self._window
        if window is not None and not window.add_current(now):
            with self._lock:
                window.add(now)

    def request_finished(self, now: float) -> None:  # noqa: ARG002 -- symmetric with started
        """A call to the cluster is over, however it ended."""
        try:  # noqa: SIM105 -- contextlib.suppress is a ``with``: twice the cost of the rest
            self._calls.pop()
        except IndexError:  # a stray call must not drive the figure negative
            pass

    def limit(self, now: float) -> int:
        """How many retries may be in flight at ``now``."""
        with self._lock:
            return self._limit(now)

    def _limit(self, now: float) -> int:
        base = self._window.total(now) if self._window is not None else len(self._calls)
        share = math.floor(self._settings.percent * base / 100.0 + _EPSILON)
        return max(self._settings.min_retry_concurrency, share)

    def try_begin_retry(self, now: float) -> bool:
        """Take a place for one retry; ``False`` means the budget is spent: do not retry."""
        with self._lock:
            if self._retries < self._limit(now):
                self._retries += 1
                return True
            return False

    def end_retry(self) -> None:
        """The retry that ``try_begin_retry`` let through is over."""
        with self._lock:
            if self._retries > 0:
                self._retries -= 1

    def __repr__(self) -> str:
        return f"ConcurrencyBudget(active={len(self._calls)}, retries={self._retries})"


class RatioBudget:
    """Finagle's retry budget: retries as a share of recent requests, plus a floor."""

    __slots__ = ("_deposits", "_lock", "_reserve", "_settings", "_withdrawals")

    def __init__(self, settings: RatioRetryBudget) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        ttl = max(settings.ttl, _MIN_SPAN)
        self._reserve = settings.min_retries_per_second * ttl
        self._deposits = _Window(ttl)
        self._withdrawals = _Window(ttl)

    @property
    def settings(self) -> RatioRetryBudget:
        return self._settings

    def deposit(self, now: float) -> None:
        """An original request was made (once per call).

        Lock-free while the newest bucket is current (all but one deposit per bucket):
        an increment lost to a race between threads makes the budget a hair smaller,
        never larger, and a bucket is only cleared a whole window after it was newest.
        """
        window = self._deposits
        bucket = int(now / window._slice)  # ``window.add_current(now)``, one call fewer
        if bucket == window._newest:
            window._counts[bucket % _BUCKETS] += 1
        else:
            with self._lock:
                window.add(now)

    def balance(self, now: float) -> float:
        """Retries still allowed in the current window (may be fractional)."""
        with self._lock:
            return self._balance(now)

    def _balance(self, now: float) -> float:
        allowed = self._settings.retry_ratio * self._deposits.total(now) + self._reserve
        return allowed - self._withdrawals.total(now)

    def try_withdraw(self, now: float) -> bool:
        """Spend one retry; ``False`` means the budget is spent: do not retry."""
        with self._lock:
            if self._balance(now) + _EPSILON >= 1.0:
                self._withdrawals.add(now)
                return True
            return False

    def __repr__(self) -> str:
        return f"RatioBudget({self._settings!r})"
