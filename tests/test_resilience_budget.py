"""Retry budgets: Envoy's concurrent-retry budget and the Finagle-style ratio budget.

Pure tests on virtual time: the clock is an argument. The arithmetic is checked exactly,
window edges included; hypothesis checks the budget bounds over arbitrary runs.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inmesh.config.model import RatioRetryBudget, RetryBudget
from inmesh.resilience.budget import ConcurrencyBudget, RatioBudget

THREADS = 8


def started(budget: ConcurrencyBudget, count: int, now: float = 0.0) -> None:
    for _ in range(count):
        budget.request_started(now)


def admitted(try_once: object, attempts: int) -> int:
    assert callable(try_once)
    return sum(1 for _ in range(attempts) if try_once())


# --------------------------------------------------------------------------- ConcurrencyBudget


def test_min_retry_concurrency_is_the_floor() -> None:
    """With no traffic, Envoy still allows min_retry_concurrency retries at once (3)."""
    budget = ConcurrencyBudget(RetryBudget())
    assert admitted(lambda: budget.try_begin_retry(0.0), 10) == 3
    budget.end_retry()
    assert budget.try_begin_retry(0.0)
    assert not budget.try_begin_retry(0.0)


def test_percent_of_active_requests() -> None:
    """20% of 50 active requests: 10 concurrent retries."""
    budget = ConcurrencyBudget(RetryBudget(percent=20.0, min_retry_concurrency=3))
    started(budget, 50)
    assert budget.limit(0.0) == 10
    assert admitted(lambda: budget.try_begin_retry(0.0), 20) == 10
    assert budget.retries == 10


def test_share_is_truncated_like_envoy() -> None:
    """Envoy converts percent × active to an integer by truncation: 20% of 24 is 4, and the
    product is computed so that 29% of 100 is 29, not 28.999..."""
    budget = ConcurrencyBudget(RetryBudget(percent=20.0, min_retry_concurrency=0))
    started(budget, 24)
    assert budget.limit(0.0) == 4
    exact = ConcurrencyBudget(RetryBudget(percent=29.0, min_retry_concurrency=0))
    started(exact, 100)
    assert exact.limit(0.0) == 29
    small = ConcurrencyBudget(RetryBudget(percent=20.0, min_retry_concurrency=3))
    started(small, 14)  # 2.8 -> 2, below the floor
    assert small.limit(0.0) == 3


def test_finished_requests_shrink_the_active_budget() -> None:
    """Without an interval only requests in flight count; a retry already running keeps
    its place when the base shrinks, but no new one starts."""
    budget = ConcurrencyBudget(RetryBudget(percent=50.0, min_retry_concurrency=0))
    started(budget, 4)
    assert admitted(lambda: budget.try_begin_retry(0.0), 5) == 2
    for _ in range(4):
        budget.request_finished(1.0)
    assert budget.active == 0
    assert budget.retries == 2
    assert not budget.try_begin_retry(1.0)
    budget.request_finished(1.0)  # a stray finish does not go negative
    assert budget.active == 0


def test_interval_counts_requests_started_within_it() -> None:
    """With budget_interval, requests started in the last interval count (ten buckets of a
    tenth: an event stays counted for 9 to 10 seconds of a 10 s interval), and finishing
    them does not shrink the base."""
    budget = ConcurrencyBudget(
        RetryBudget(percent=20.0, min_retry_concurrency=1, budget_interval=10.0)
    )
    started(budget, 50, now=0.5)
    for _ in range(50):
        budget.request_finished(0.6)
    assert budget.limit(0.6) == 10
    assert budget.limit(9.99) == 10  # bucket [0, 1) still in the window
    assert budget.limit(10.0) == 1  # and out at 10 s: back to the floor
    started(budget, 20, now=12.0)
    assert budget.limit(12.0) == 4


def test_interval_budget_admits_against_retries_in_flight() -> None:
    """The windowed base sets the limit; what it limits is retries in flight."""
    budget = ConcurrencyBudget(
        RetryBudget(percent=10.0, min_retry_concurrency=0, budget_interval=5.0)
    )
    started(budget, 30, now=0.0)
    assert admitted(lambda: budget.try_begin_retry(1.0), 10) == 3
    budget.end_retry()
    assert budget.try_begin_retry(2.0)
    assert budget.limit(6.0) == 0
    assert not budget.try_begin_retry(6.0)


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["start", "finish", "retry", "end"]), st.integers(0, 3)),
        max_size=200,
    ),
    percent=st.floats(0, 100),
    floor=st.integers(0, 5),
)
def test_concurrent_retries_never_exceed_the_budget(
    ops: list[tuple[str, int]], percent: float, floor: int
) -> None:
    """Over any sequence, a retry is admitted only while retries in flight are below
    max(floor, ⌊percent × active⌋), and the counters match a plain model."""
    budget = ConcurrencyBudget(RetryBudget(percent=percent, min_retry_concurrency=floor))
    active = retries = 0
    now = 0.0
    for op, dt in ops:
        now += dt
        if op == "start":
            budget.request_started(now)
            active += 1
        elif op == "finish":
            budget.request_finished(now)
            active = max(0, active - 1)
        elif op == "retry":
            limit = max(floor, int(percent * active / 100 + 1e-9))
            assert budget.try_begin_retry(now) == (retries < limit)
            retries += retries < limit
        else:
            budget.end_retry()
            retries = max(0, retries - 1)
        assert (budget.active, budget.retries) == (active, retries)


def test_threads_hammering_the_concurrency_budget_end_consistent() -> None:
    """Many threads starting, retrying and finishing leave nothing counted behind."""
    budget = ConcurrencyBudget(RetryBudget(percent=20.0, min_retry_concurrency=3))
    barrier = threading.Barrier(THREADS)

    def work() -> None:
        barrier.wait()
        for i in range(2000):
            budget.request_started(float(i))
            if budget.try_begin_retry(float(i)):
                budget.end_retry()
            budget.request_finished(float(i))

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (budget.active, budget.retries) == (0, 0)


# --------------------------------------------------------------------------- RatioBudget


def test_reserve_allows_retries_without_requests() -> None:
    """min_retries_per_second × ttl: 1/s over 10 s is 10 retries with no traffic at all."""
    budget = RatioBudget(RatioRetryBudget(retry_ratio=0.2, min_retries_per_second=1.0, ttl=10.0))
    assert admitted(lambda: budget.try_withdraw(0.0), 20) == 10
    assert budget.balance(0.0) == pytest.approx(0.0)


def test_each_request_adds_the_ratio() -> None:
    """0.2 per request: 5 requests buy one retry on top of the reserve, 100 buy 20."""
    budget = RatioBudget(RatioRetryBudget(retry_ratio=0.2, min_retries_per_second=1.0, ttl=10.0))
    assert admitted(lambda: budget.try_withdraw(0.0), 10) == 10
    for _ in range(4):
        budget.deposit(0.0)
    assert not budget.try_withdraw(0.0)  # 0.8 of a retry is not a retry
    budget.deposit(0.0)
    assert budget.try_withdraw(0.0)
    for _ in range(100):
        budget.deposit(0.0)
    assert admitted(lambda: budget.try_withdraw(0.0), 50) == 20


def test_ratio_only_budget_is_exact() -> None:
    """No floor: retries ≤ ratio × requests, counting the retry asked for; no float drift
    (ten deposits at 0.1 make one whole retry)."""
    half = RatioBudget(RatioRetryBudget(retry_ratio=0.5, min_retries_per_second=0.0, ttl=10.0))
    assert not half.try_withdraw(0.0)
    half.deposit(0.0)
    assert not half.try_withdraw(0.0)
    half.deposit(0.0)
    assert half.try_withdraw(0.0)
    half.deposit(0.0)
    assert not half.try_withdraw(0.0)
    half.deposit(0.0)
    assert half.try_withdraw(0.0)
    tenth = RatioBudget(RatioRetryBudget(retry_ratio=0.1, min_retries_per_second=0.0, ttl=10.0))
    for _ in range(10):
        tenth.deposit(0.0)
    assert tenth.try_withdraw(0.0)
    assert not tenth.try_withdraw(0.0)


def test_ratio_window_expires_deposits_and_withdrawals() -> None:
    """Both expire after the ttl (between 9 and 10 s of a 10 s ttl: ten buckets)."""
    budget = RatioBudget(RatioRetryBudget(retry_ratio=1.0, min_retries_per_second=0.0, ttl=10.0))
    for _ in range(3):
        budget.deposit(0.5)
    assert admitted(lambda: budget.try_withdraw(0.5), 5) == 3
    assert not budget.try_withdraw(9.99)  # still the same window
    assert budget.balance(10.0) == 0  # deposits and withdrawals of [0, 1) are gone together
    budget.deposit(10.0)
    assert budget.try_withdraw(10.0)
    assert budget.balance(25.0) == 0  # a long idle gap empties every bucket


def test_a_clock_read_that_lost_a_race_counts_now() -> None:
    """A ``now`` slightly older than the newest bucket is counted in the newest bucket."""
    budget = RatioBudget(RatioRetryBudget(retry_ratio=1.0, min_retries_per_second=0.0, ttl=10.0))
    budget.deposit(5.0)
    budget.deposit(4.0)  # another thread's earlier clock read
    assert budget.balance(5.0) == 2
    assert budget.balance(14.99) == 2
    assert budget.balance(15.0) == 0


@settings(deadline=None)
@given(
    events=st.lists(
        st.tuples(st.booleans(), st.integers(0, 3000)),  # (is a retry, ms since previous)
        max_size=300,
    ),
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    floor=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    ttl=st.sampled_from([1.0, 2.0, 10.0]),
)
def test_ratio_budget_bounds_retries_over_any_run(
    events: list[tuple[bool, int]], ratio: float, floor: float, ttl: float
) -> None:
    """At every admitted retry, the retries of the last 0.9 × ttl are at most ratio × the
    requests of the last ttl plus the reserve; over the whole run, retries stay within
    ratio × requests plus the reserve once per 0.9 × ttl of elapsed time."""
    budget = RatioBudget(RatioRetryBudget(retry_ratio=ratio, min_retries_per_second=floor, ttl=ttl))
    reserve = floor * ttl
    now = 0
    requests: list[float] = []
    retries: list[float] = []
    for is_retry, dt in events:
        now += dt
        t = now / 1000
        if not is_retry:
            budget.deposit(t)
            requests.append(t)
        elif budget.try_withdraw(t):
            retries.append(t)
            recent = sum(1 for r in retries if r > t - 0.9 * ttl)
            seen = sum(1 for r in requests if r > t - ttl)
            assert recent <= ratio * seen + reserve + 1e-9
    elapsed = now / 1000
    periods = int(elapsed // (0.9 * ttl)) + 1
    assert len(retries) <= 2 * ratio * len(requests) + reserve * periods + 1e-9


def test_threads_hammering_the_ratio_budget_spend_it_exactly() -> None:
    """Concurrent withdrawals never overspend: exactly the reserve plus the ratio's share."""
    budget = RatioBudget(RatioRetryBudget(retry_ratio=0.25, min_retries_per_second=10.0, ttl=10.0))
    for _ in range(400):
        budget.deposit(1.0)
    wins: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def work() -> None:
        barrier.wait()
        mine = sum(1 for _ in range(200) if budget.try_withdraw(1.0))
        with lock:
            wins.append(mine)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(wins) == 100 + 100  # reserve 10/s × 10 s, plus 0.25 × 400
