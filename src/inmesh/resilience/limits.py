"""Connection-pool admission: a DestinationRule's ``connectionPool`` as circuit breaking.

Istio documents these limits per upstream host, and inmesh applies them so: one
``EndpointLimits`` per endpoint. A request is admitted while

- ``in_flight < max_connections + http1_max_pending_requests``: an HTTP/1.1 connection
  carries one request at a time, so the requests beyond ``max_connections`` wait for a
  connection, and those are the pending requests; and
- ``in_flight < http2_max_requests``: the cap on concurrent requests.

``None`` is unlimited (Istio's default is 2³²-1 for each). A request that is not admitted
overflows: the caller answers 503 at once and sends nothing, as Envoy does (response flag
``UO``). A config push changes the limits in place; requests already in flight stay
counted and drain under the new limits.

``RetryLimit`` is ``connectionPool.http.maxRetries``: concurrent retries to the whole
cluster (Envoy's ``max_retries`` breaker). When a ``retryBudget`` is configured, Envoy
lets the budget replace this breaker.

Bookkeeping only, O(1); the caller pairs every admitted ``try_admit()`` with one
``release()``, every granted ``try_begin()`` with one ``end()``. ``EndpointLimits`` runs on
every request, so it takes no lock: a request takes its place first (an append to a list
whose length is the count, atomic) and then looks at the cap, taking the place back if it
went over. Every admitted request saw itself within the cap with all those admitted
before it still counted, so the cap is never exceeded; requests racing for the last
place may all be refused (each saw the others' places), which errs on the side Envoy's
breakers exist for. ``RetryLimit`` (retries only) keeps its lock.
"""

from __future__ import annotations

import threading

from inmesh.config.model import ConnectionPoolSettings

__all__ = ["EndpointLimits", "RetryLimit"]


def _sum_limit(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _min_limit(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


class EndpointLimits:
    """Admission to one endpoint under a ``connectionPool`` policy."""

    __slots__ = ("_cap", "_lock", "_max_connections", "_places", "_settings")

    def __init__(self, settings: ConnectionPoolSettings) -> None:
        self._lock = threading.Lock()  # for update(): admission itself takes none
        self._places: list[None] = []  # one item per admitted request (see the module)
        self._settings = settings
        self._max_connections: int | None = None
        self._cap: int | None = None
        self._configure(settings)

    def _configure(self, settings: ConnectionPoolSettings) -> None:
        connections = settings.tcp.max_connections
        queue_cap = _sum_limit(connections, settings.http.http1_max_pending_requests)
        self._settings = settings
        self._max_connections = connections
        self._cap = _min_limit(queue_cap, settings.http.http2_max_requests)

    def update(self, settings: ConnectionPoolSettings) -> None:
        """Adopt new limits; the requests in flight stay counted."""
        with self._lock:
            self._configure(settings)

    @property
    def settings(self) -> ConnectionPoolSettings:
        return self._settings

    @property
    def cap(self) -> int | None:
        """The most requests admitted at once; ``None``: unlimited."""
        return self._cap

    @property
    def in_flight(self) -> int:
        """Admitted requests not yet released."""
        return len(self._places)

    @property
    def pending(self) -> int:
        """Admitted requests beyond ``max_connections``: those waiting for a connection."""
        connections = self._max_connections
        if connections is None:
            return 0
        return max(0, len(self._places) - connections)

    def try_admit(self) -> bool:
        """Take a place for one request; ``False`` is an overflow: answer 503, send nothing."""
        places = self._places
        places.append(None)  # take a place, then look (see the module docstring)
        cap = self._cap
        if cap is not None and len(places) > cap:
            places.pop()
            return False
        return True

    def release(self) -> None:
        """The admitted request is over (answered, failed or cancelled)."""
        try:  # noqa: SIM105 -- contextlib.suppress is a ``with``: twice the cost of the rest
            self._places.pop()
        except IndexError:  # a stray release must not open room for good
            pass

    def __repr__(self) -> str:
        return f"EndpointLimits(in_flight={len(self._places)}, cap={self._cap})"


class RetryLimit:
    """``connectionPool.http.maxRetries``: retries in flight to one cluster at once."""

    __slots__ = ("_active", "_limit", "_lock")

    def __init__(self, max_retries: int | None) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._limit = max_retries

    def update(self, max_retries: int | None) -> None:
        """Adopt a new limit; retries in flight stay counted."""
        with self._lock:
            self._limit = max_retries

    @property
    def limit(self) -> int | None:
        """The most retries in flight at once; ``None``: unlimited."""
        return self._limit

    @property
    def active(self) -> int:
        """Retries in flight."""
        return self._active

    def try_begin(self) -> bool:
        """Take a place for one retry; ``False``: the limit is reached, do not retry."""
        with self._lock:
            limit = self._limit
            if limit is not None and self._active >= limit:
                return False
            self._active += 1
            return True

    def end(self) -> None:
        """The retry ``try_begin`` let through is over."""
        with self._lock:
            if self._active > 0:
                self._active -= 1

    def __repr__(self) -> str:
        return f"RetryLimit(active={self._active}, limit={self._limit})"
