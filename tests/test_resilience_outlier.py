"""Outlier detection: consecutive 5xx and gateway errors, ejection timing on the interval
sweep, the ejection multiplier and its decay, max ejection percent, config pushes.

Pure tests on virtual time. The lazy, closed-form sweep evaluation is checked against a
reference model that walks every sweep one by one.
"""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inmesh.config.model import OutlierDetection
from inmesh.endpoints import EndpointKey
from inmesh.resilience.outlier import OutlierDetector, Result, classify
from inmesh.resilience.retry import Failure, Outcome

DEFAULTS = OutlierDetection()  # Istio's: 5 consecutive 5xx, 10 s, 30 s, 300 s, 10%
ALL = OutlierDetection(max_ejection_percent=100.0)

A: EndpointKey = ("10.0.0.1", 80)
B: EndpointKey = ("10.0.0.2", 80)
C: EndpointKey = ("10.0.0.3", 80)


def key(i: int) -> EndpointKey:
    return (f"10.0.1.{i}", 80)


def fail(
    detector: OutlierDetector,
    endpoint: EndpointKey,
    now: float,
    *,
    times: int = 5,
    total: int = 3,
    result: Result = Result.SERVER_ERROR,
) -> bool:
    """Record ``times`` failures; True if the last one changed the ejected set."""
    changed = False
    for _ in range(times):
        changed = detector.record(endpoint, result, now, total=total)
    return changed


def detector(config: OutlierDetection = ALL, start: float = 0.0) -> OutlierDetector:
    return OutlierDetector(config, start=start)


# --------------------------------------------------------------------------- detection


def test_five_consecutive_5xx_eject_at_once() -> None:
    """Istio's default: the fifth consecutive 5xx ejects immediately, bumping the version."""
    od = detector()
    assert not fail(od, A, 1.0, times=4)
    assert od.ejected(1.0) == frozenset()
    version = od.version
    assert od.record(A, Result.SERVER_ERROR, 1.0, total=3)
    assert od.ejected(1.0) == {A}
    assert od.version == version + 1


def test_success_resets_the_run() -> None:
    """Consecutive means consecutive: a success in between starts the count over."""
    od = detector()
    fail(od, A, 1.0, times=4)
    od.record(A, Result.SUCCESS, 1.0, total=3)
    fail(od, A, 1.0, times=4)
    assert od.ejected(1.0) == frozenset()
    assert fail(od, A, 1.0, times=1)


def test_consecutive_gateway_errors() -> None:
    """502/503/504 count for consecutiveGatewayErrors; a plain 500 breaks that run (but
    still counts as a 5xx)."""
    od = detector(replace(ALL, consecutive_5xx_errors=None, consecutive_gateway_errors=3))
    for result in (Result.GATEWAY_ERROR, Result.SERVER_ERROR, Result.GATEWAY_ERROR):
        od.record(A, result, 1.0, total=3)
    od.record(A, Result.GATEWAY_ERROR, 1.0, total=3)
    assert od.ejected(1.0) == frozenset()
    assert od.record(A, Result.GATEWAY_ERROR, 1.0, total=3)
    assert od.ejected(1.0) == {A}
    fail(od, B, 1.0, times=10, result=Result.SERVER_ERROR)
    assert B not in od.ejected(1.0)  # 5xx detection is off


def test_connect_failures_count_as_5xx_and_gateway_errors() -> None:
    """Local-origin failures land in both counters (split_external_local_origin_errors off)."""
    for config in (
        replace(ALL, consecutive_5xx_errors=3),
        replace(ALL, consecutive_5xx_errors=None, consecutive_gateway_errors=3),
    ):
        od = detector(config)
        assert fail(od, A, 1.0, times=3, result=Result.CONNECT_FAILURE)


def test_gateway_errors_count_toward_5xx() -> None:
    """Every gateway error is a 5xx too: mixed 500s and 503s eject at five."""
    od = detector()
    for result in [Result.SERVER_ERROR, Result.GATEWAY_ERROR] * 2:
        od.record(A, result, 1.0, total=3)
    assert od.record(A, Result.GATEWAY_ERROR, 1.0, total=3)


@pytest.mark.parametrize("threshold", [0, None])
def test_zero_or_unset_threshold_is_off(threshold: int | None) -> None:
    """consecutive5xxErrors 0 disables the detector (Istio)."""
    od = detector(replace(ALL, consecutive_5xx_errors=threshold))
    fail(od, A, 1.0, times=50, result=Result.CONNECT_FAILURE)
    assert od.ejected(1.0) == frozenset()


# --------------------------------------------------------------------------- timing


def test_ejected_endpoint_returns_at_the_first_sweep_after_its_time() -> None:
    """Ejected at 5 s for 30 s: due at 35 s, back at the 40 s sweep -- not a moment sooner."""
    od = detector()
    fail(od, A, 5.0)
    assert od.ejected(35.0) == {A}
    assert od.ejected(39.999) == {A}
    version = od.version
    assert od.ejected(40.0) == frozenset()
    assert od.version == version + 1


def test_ejection_on_a_sweep_boundary() -> None:
    """Ejected exactly at the 10 s sweep: 30 s later is exactly the 40 s sweep."""
    od = detector()
    fail(od, A, 10.0)
    assert od.ejected(39.9) == {A}
    assert od.ejected(40.0) == frozenset()


def test_sweeps_count_from_start_or_first_clock_reading() -> None:
    """Without ``start`` the first ``now`` seen anchors the sweeps."""
    od = OutlierDetector(ALL)
    assert od.ejected(3.0) == frozenset()  # sweeps at 13, 23, 33, 43, ...
    fail(od, A, 5.0)
    assert od.ejected(42.9) == {A}
    assert od.ejected(43.0) == frozenset()


def test_failures_while_ejected_do_not_restart_the_clock() -> None:
    """An ejected endpoint is not re-ejected: its return time stays."""
    od = detector()
    fail(od, A, 5.0)
    assert not fail(od, A, 20.0, times=10)
    assert od.multiplier(A) == 1
    assert od.ejected(40.0) == frozenset()


def test_multiplier_lengthens_repeat_ejections() -> None:
    """Ejected again before the multiplier decays: base × 2 = 60 s."""
    od = detector()
    fail(od, A, 5.0)  # back at 40
    assert od.ejected(40.0) == frozenset()
    fail(od, A, 45.0)  # before the 50 s sweep could decay the multiplier
    assert od.multiplier(A) == 2
    assert od.ejected(109.9) == {A}  # due at 105, back at the 110 s sweep
    assert od.ejected(110.0) == frozenset()


def test_multiplier_decays_one_per_healthy_sweep() -> None:
    """Each sweep at least one interval after the return lowers the multiplier by one."""
    od = detector()
    fail(od, A, 5.0)  # m=1, back at 40
    assert od.ejected(49.0) == frozenset()
    assert od.multiplier(A) == 1  # the return sweep itself does not decay
    od.ejected(50.0)
    assert od.multiplier(A) == 0
    fail(od, A, 51.0)  # so this ejection is a first one again: 30 s
    assert od.multiplier(A) == 1
    assert od.ejected(89.9) == {A}
    assert od.ejected(90.0) == frozenset()


def test_ejection_time_is_capped_at_max_ejection_time() -> None:
    """30, 60, ..., 300, then 300 s again: the multiplier stops one step past the cap
    (Envoy raises it while m × base < max + base), and decays from there."""
    od = detector()
    now = 5.0
    returns = []
    for _ in range(12):
        fail(od, A, now)
        sweep = (now // 10 + 1) * 10
        while A in od.ejected(sweep):
            sweep += 10
        returns.append(sweep - now)
        now = sweep + 1  # fail again right after the return, before any decay
    # Back at the first sweep (every 10 s) after base × m: 30 s after 5 s is the 40 s sweep;
    # later ejections start 1 s after a sweep, so m × 30 s ends 1 s before one.
    assert returns == [35, 69, 99, 129, 159, 189, 219, 249, 279, 309, 309, 309]
    assert od.multiplier(A) == 11
    back = now - 1  # the last return's sweep; each later sweep takes one off
    od.ejected(back + 10 * 10)
    assert od.multiplier(A) == 1
    od.ejected(back + 10 * 11)
    assert od.multiplier(A) == 0


def test_long_idle_applies_every_missed_sweep() -> None:
    """An hour without calls: the return and the full decay happen in one lazy pass."""
    od = detector()
    fail(od, A, 5.0)
    fail(od, A, 45.0)  # m=2, back at 110
    assert od.ejected(3600.0) == frozenset()
    assert od.multiplier(A) == 0


# --------------------------------------------------------------------------- the cap


def test_max_ejection_percent_caps_the_share() -> None:
    """10% of 20 endpoints: two ejected; the third stays in, and its run starts over."""
    od = detector(DEFAULTS)
    assert fail(od, key(1), 1.0, total=20)
    assert fail(od, key(2), 1.0, total=20)
    assert not fail(od, key(3), 1.0, total=20)
    assert od.ejected(1.0) == {key(1), key(2)}
    assert not fail(od, key(3), 1.0, total=20, times=4)  # needs a whole new run
    od.ejected(40.0)  # the first two return
    assert fail(od, key(3), 41.0, total=20, times=1)  # the fifth of the new run


def test_one_endpoint_may_always_be_ejected() -> None:
    """10% of 3 endpoints is 0.3 of one: the first ejection is still allowed, a second not."""
    od = detector(DEFAULTS)
    assert fail(od, A, 1.0, total=3)
    assert not fail(od, B, 1.0, total=3)
    assert od.ejected(1.0) == {A}


def test_zero_percent_ejects_nothing_and_hundred_ejects_all() -> None:
    """maxEjectionPercent 0 turns ejection off; 100 lets every endpoint go."""
    off = detector(replace(DEFAULTS, max_ejection_percent=0.0))
    assert not fail(off, A, 1.0)
    everything = detector(ALL)
    for endpoint in (A, B, C):
        assert fail(everything, endpoint, 1.0)
    assert everything.ejected(1.0) == {A, B, C}


def test_retain_forgets_endpoints_that_left_the_cluster() -> None:
    """A removed endpoint's ejection ends with it and frees its share of the cap."""
    od = detector(DEFAULTS)
    fail(od, A, 1.0, total=3)
    assert not fail(od, B, 1.0, total=3)
    version = od.version
    assert od.retain({B, C})
    assert od.version == version + 1
    assert od.ejected(1.0) == frozenset()
    assert fail(od, B, 1.0, total=2)
    assert not od.retain([B, C])


# --------------------------------------------------------------------------- config pushes


def test_update_keeps_counters_and_ejections() -> None:
    """A config push resets nothing: the run of errors and the ejections go on."""
    od = detector()
    fail(od, A, 1.0)
    fail(od, B, 1.0, times=4)
    od.update(replace(ALL, base_ejection_time=60.0))
    assert od.ejected(1.0) == {A}
    assert fail(od, B, 2.0, times=1)
    assert od.ejected(50.0) == {A, B}  # 60 s now applies to both
    assert od.ejected(70.0) == frozenset()


def test_update_with_a_new_interval_reanchors_the_sweeps() -> None:
    """A new interval starts counting from the last sweep applied."""
    od = detector()
    od.ejected(20.0)  # sweeps 10 and 20 applied
    od.update(replace(ALL, interval=7.0))  # next sweeps: 27, 34, 41, ...
    fail(od, A, 21.0)  # due at 51
    assert od.ejected(54.9) == {A}
    assert od.ejected(55.0) == frozenset()


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("outcome", "result"),
    [
        (Outcome(status=200), Result.SUCCESS),
        (Outcome(status=404), Result.SUCCESS),
        (Outcome(status=429), Result.SUCCESS),
        (Outcome(status=500), Result.SERVER_ERROR),
        (Outcome(status=501), Result.SERVER_ERROR),
        (Outcome(status=502), Result.GATEWAY_ERROR),
        (Outcome(status=503), Result.GATEWAY_ERROR),
        (Outcome(status=504), Result.GATEWAY_ERROR),
        (Outcome(failure=Failure.CONNECT), Result.CONNECT_FAILURE),
        (Outcome(failure=Failure.RESET), Result.CONNECT_FAILURE),
        (Outcome(failure=Failure.REFUSED_STREAM), Result.CONNECT_FAILURE),
        (Outcome(failure=Failure.TIMEOUT), Result.CONNECT_FAILURE),
        (Outcome(status=200, grpc_status="OK"), Result.SUCCESS),
        (Outcome(status=200, grpc_status="NOT_FOUND"), Result.SUCCESS),
        (Outcome(status=200, grpc_status="UNAVAILABLE"), Result.GATEWAY_ERROR),
        (Outcome(status=200, grpc_status="14"), Result.GATEWAY_ERROR),
        (Outcome(status=200, grpc_status="DEADLINE_EXCEEDED"), Result.GATEWAY_ERROR),
        (Outcome(status=200, grpc_status="INTERNAL"), Result.SERVER_ERROR),
        (Outcome(status=200, grpc_status="UNIMPLEMENTED"), Result.SERVER_ERROR),
        (Outcome(status=200, grpc_status="99"), Result.SERVER_ERROR),
    ],
)
def test_classify(outcome: Outcome, result: Result) -> None:
    """Attempts map to results as Envoy's router reports them (gRPC via grpcToHttpStatus)."""
    assert classify(outcome) is result


# --------------------------------------------------------------------------- properties


class Reference:
    """The same rules, evaluated the slow way: every sweep, one by one."""

    def __init__(self, config: OutlierDetection, start: float) -> None:
        self.config = config
        self.next_sweep = start + config.interval
        self.counts: dict[EndpointKey, list[int]] = {}
        self.multiplier: dict[EndpointKey, int] = {}
        self.ejected_at: dict[EndpointKey, float] = {}
        self.returned_at: dict[EndpointKey, float] = {}

    def sweep_to(self, now: float) -> None:
        c = self.config
        most = max(c.base_ejection_time, c.max_ejection_time)
        while self.next_sweep <= now:
            s = self.next_sweep
            for endpoint in list(self.multiplier):
                m = self.multiplier[endpoint]
                if endpoint in self.ejected_at:
                    duration = min(c.base_ejection_time * m, most)
                    if s - self.ejected_at[endpoint] >= duration:
                        del self.ejected_at[endpoint]
                        self.returned_at[endpoint] = s
                elif endpoint in self.returned_at and s - self.returned_at[endpoint] >= c.interval:
                    self.multiplier[endpoint] = max(0, m - 1)
            self.next_sweep += c.interval

    def record(self, endpoint: EndpointKey, result: Result, now: float, total: int) -> None:
        self.sweep_to(now)
        c = self.config
        five, gateway = self.counts.setdefault(endpoint, [0, 0])
        if result is Result.SUCCESS:
            self.counts[endpoint] = [0, 0]
            return
        five += 1
        gateway = 0 if result is Result.SERVER_ERROR else gateway + 1
        hit5 = bool(c.consecutive_5xx_errors) and five >= (c.consecutive_5xx_errors or 0)
        hitg = bool(c.consecutive_gateway_errors) and gateway >= (c.consecutive_gateway_errors or 0)
        self.counts[endpoint] = [0 if hit5 else five, 0 if hitg else gateway]
        if not (hit5 or hitg) or endpoint in self.ejected_at:
            return
        n = len(self.ejected_at)
        if c.max_ejection_percent <= 0 or (n and (n + 1) * 100 > c.max_ejection_percent * total):
            return
        m = self.multiplier.get(endpoint, 0)
        if m * c.base_ejection_time < c.max_ejection_time + c.base_ejection_time:
            m += 1
        self.multiplier[endpoint] = m
        self.ejected_at[endpoint] = now


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 5),  # endpoint
            st.sampled_from(list(Result)),
            st.sampled_from([0, 0, 0, 1, 5, 10, 30, 120]),  # seconds since the previous step
        ),
        max_size=250,
    ),
    total=st.integers(1, 12),
    percent=st.sampled_from([0.0, 10.0, 25.0, 50.0, 100.0]),
    threshold=st.integers(1, 4),
    gateway=st.sampled_from([None, 1, 2]),
    interval=st.sampled_from([1.0, 10.0]),
    base=st.sampled_from([1.0, 30.0]),
)
def test_lazy_detector_matches_the_sweep_by_sweep_reference(
    steps: list[tuple[int, Result, int]],
    total: int,
    percent: float,
    threshold: int,
    gateway: int | None,
    interval: float,
    base: float,
) -> None:
    """After every step the ejected set and multipliers equal the reference's, and the
    ejected count never exceeds the cap unless it is the single always-allowed one."""
    config = OutlierDetection(
        consecutive_5xx_errors=threshold,
        consecutive_gateway_errors=gateway,
        interval=interval,
        base_ejection_time=base,
        max_ejection_time=4 * base,
        max_ejection_percent=percent,
    )
    od = OutlierDetector(config, start=0.0)
    reference = Reference(config, 0.0)
    now = 0.0
    for endpoint, result, dt in steps:
        now += dt
        od.record(key(endpoint), result, now, total=total)
        reference.record(key(endpoint), result, now, total)
        ejected = od.ejected(now)
        reference.sweep_to(now)
        assert ejected == frozenset(reference.ejected_at)
        for e in range(6):
            assert od.multiplier(key(e)) == reference.multiplier.get(key(e), 0)
        cap = int(percent * total / 100)
        assert len(ejected) <= max(cap, 1 if percent > 0 else 0)


def test_threads_hammering_the_detector_end_consistent() -> None:
    """Concurrent records from many threads keep the cap and a coherent ejected set."""
    od = OutlierDetector(replace(DEFAULTS, max_ejection_percent=20.0), start=0.0)
    endpoints = [key(i) for i in range(20)]
    barrier = threading.Barrier(8)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        now = 0.0
        for _ in range(3000):
            now += rng.random() * 0.05
            result = Result.SERVER_ERROR if rng.random() < 0.7 else Result.SUCCESS
            od.record(rng.choice(endpoints), result, now, total=len(endpoints))
            assert len(od.ejected(now)) <= 4

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ejected = od.ejected(1000.0)
    assert ejected == frozenset()  # every ejection has run out by then
    assert od.version > 0
