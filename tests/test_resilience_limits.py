"""Connection-pool admission (circuit breaking) per endpoint, and the cluster retry limit.

Pure tests; hypothesis drives arbitrary admit/release sequences, and threads check that
the counters stay exact under contention.
"""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from inmesh.config.model import ConnectionPoolSettings, HTTPSettings, TCPSettings
from inmesh.resilience.limits import EndpointLimits, RetryLimit

THREADS = 8


def pool(
    connections: int | None = None, pending: int | None = None, requests: int | None = None
) -> ConnectionPoolSettings:
    return ConnectionPoolSettings(
        tcp=TCPSettings(max_connections=connections),
        http=HTTPSettings(http1_max_pending_requests=pending, http2_max_requests=requests),
    )


def admit_many(limits: EndpointLimits, count: int) -> int:
    return sum(1 for _ in range(count) if limits.try_admit())


def test_unset_limits_admit_everything() -> None:
    """Istio's defaults are 2^32-1 everywhere: effectively no limit."""
    limits = EndpointLimits(ConnectionPoolSettings())
    assert limits.cap is None
    assert admit_many(limits, 10_000) == 10_000
    assert limits.pending == 0


def test_connections_plus_pending_then_overflow() -> None:
    """maxConnections 2 and http1MaxPendingRequests 1: three in flight, the fourth overflows
    (503 at once). The third is the one waiting for a connection."""
    limits = EndpointLimits(pool(connections=2, pending=1))
    assert admit_many(limits, 3) == 3
    assert limits.pending == 1
    assert not limits.try_admit()
    limits.release()
    assert limits.pending == 0
    assert limits.try_admit()
    assert limits.in_flight == 3


def test_unlimited_pending_leaves_connections_unbounded() -> None:
    """maxConnections alone only decides what counts as pending."""
    limits = EndpointLimits(pool(connections=2))
    assert limits.cap is None
    assert admit_many(limits, 10) == 10
    assert limits.pending == 8


def test_http2_max_requests_caps_concurrency() -> None:
    """http2MaxRequests bounds the requests in flight, alone or with the HTTP/1.1 limits."""
    assert admit_many(EndpointLimits(pool(requests=2)), 5) == 2
    assert admit_many(EndpointLimits(pool(connections=5, pending=5, requests=3)), 9) == 3
    assert admit_many(EndpointLimits(pool(connections=1, pending=1, requests=10)), 9) == 2


def test_zero_pending_means_one_request_per_connection() -> None:
    """http1MaxPendingRequests 0 admits no more than the connections."""
    assert admit_many(EndpointLimits(pool(connections=4, pending=0)), 9) == 4


def test_update_keeps_requests_in_flight_and_drains_to_new_limits() -> None:
    """A config push lowering the limit overflows new requests until the old ones drain."""
    limits = EndpointLimits(pool(requests=10))
    assert admit_many(limits, 5) == 5
    limits.update(pool(requests=2))
    assert limits.in_flight == 5
    assert not limits.try_admit()
    for _ in range(4):
        limits.release()
    assert limits.try_admit()
    assert not limits.try_admit()
    limits.update(ConnectionPoolSettings())
    assert limits.try_admit()


def test_stray_release_does_not_open_room() -> None:
    """Releasing more than was admitted floors at zero instead of raising the cap."""
    limits = EndpointLimits(pool(requests=1))
    limits.release()
    assert limits.in_flight == 0
    assert limits.try_admit()
    assert not limits.try_admit()


def test_retry_limit() -> None:
    """connectionPool.http.maxRetries: concurrent retries to the cluster; None: unlimited."""
    limit = RetryLimit(2)
    assert limit.try_begin()
    assert limit.try_begin()
    assert not limit.try_begin()
    limit.end()
    assert limit.try_begin()
    limit.update(None)
    assert all(limit.try_begin() for _ in range(100))
    assert limit.active == 102
    limit.update(1)
    assert not limit.try_begin()
    for _ in range(200):
        limit.end()
    assert limit.active == 0
    assert limit.try_begin()
    assert RetryLimit(0).try_begin() is False


@given(
    connections=st.none() | st.integers(0, 5),
    pending=st.none() | st.integers(0, 5),
    requests=st.none() | st.integers(0, 8),
    ops=st.lists(st.booleans(), max_size=200),
)
def test_in_flight_never_exceeds_the_cap(
    connections: int | None, pending: int | None, requests: int | None, ops: list[bool]
) -> None:
    """Under any admit/release sequence, in flight stays within the cap and matches a model;
    an admit fails exactly when the cap is reached."""
    limits = EndpointLimits(pool(connections, pending, requests))
    queue = None if connections is None or pending is None else connections + pending
    caps = [c for c in (requests, queue) if c is not None]
    cap = min(caps) if caps else None
    model = 0
    for admit in ops:
        if admit:
            expected = cap is None or model < cap
            assert limits.try_admit() == expected
            model += expected
        else:
            limits.release()
            model = max(0, model - 1)
        assert limits.in_flight == model
        assert cap is None or limits.in_flight <= cap
        assert limits.pending == (0 if connections is None else max(0, model - connections))


def test_threads_hammering_limits_never_overshoot() -> None:
    """Many threads admitting and releasing never hold more than the cap at once, and all
    places are returned at the end."""
    limits = EndpointLimits(pool(connections=3, pending=2))
    retry_limit = RetryLimit(4)
    held = [0]
    peak = [0]
    retries = [0]
    retry_peak = [0]
    guard = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def work() -> None:
        barrier.wait()
        for _ in range(3000):
            if limits.try_admit():
                with guard:
                    held[0] += 1
                    peak[0] = max(peak[0], held[0])
                with guard:
                    held[0] -= 1
                limits.release()
            if retry_limit.try_begin():
                with guard:
                    retries[0] += 1
                    retry_peak[0] = max(retry_peak[0], retries[0])
                    retries[0] -= 1
                retry_limit.end()

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limits.in_flight == 0
    assert retry_limit.active == 0
    assert peak[0] <= 5
    assert retry_peak[0] <= 4
