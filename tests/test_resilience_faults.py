"""Fault injection decisions: route faults, percentages drawn from a seeded generator, and
the x-envoy-fault-* request headers with their caps.

Pure tests. Shares are measured over many seeded draws with tolerances far wider than the
seeded runs need, so only a change of rule can fail them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inmesh.config.model import FaultAbort, FaultDelay, HTTPFault
from inmesh.resilience.faults import FaultPlan, decide, fires
from inmesh.resilience.retry import GRPC_STATUS_NAMES

SEED = 99
DRAWS = 20_000


def headers(values: Mapping[str, str]) -> Callable[[str], str | None]:
    return values.get


def share(
    fault: HTTPFault | None,
    *,
    values: Mapping[str, str] | None = None,
    what: Callable[[FaultPlan | None], bool] = lambda plan: plan is not None,
) -> float:
    rng = random.Random(SEED)
    header = headers(values) if values is not None else None
    return sum(1 for _ in range(DRAWS) if what(decide(fault, rng, header))) / DRAWS


def delayed(plan: FaultPlan | None) -> bool:
    return plan is not None and plan.delay is not None


def aborted(plan: FaultPlan | None) -> bool:
    return plan is not None and (plan.abort_status is not None or plan.grpc_status is not None)


# --------------------------------------------------------------------------- route faults


def test_no_fault_no_plan() -> None:
    """Nothing configured, nothing injected."""
    rng = random.Random(SEED)
    assert decide(None, rng) is None
    assert decide(HTTPFault(), rng) is None


def test_fault_without_percentage_never_fires() -> None:
    """Istio: a delay or abort with no percentage injects nothing."""
    fault = HTTPFault(delay=FaultDelay(fixed_delay=1.0), abort=FaultAbort(http_status=503))
    assert share(fault) == 0.0


def test_full_percentages_always_fire_without_drawing() -> None:
    """100% fires every time, 0% never, and neither consumes the generator."""
    fault = HTTPFault(
        delay=FaultDelay(fixed_delay=0.5, percentage=100.0),
        abort=FaultAbort(http_status=503, percentage=100.0),
    )
    rng = random.Random(SEED)
    before = rng.getstate()
    assert decide(fault, rng) == FaultPlan(0.5, 503, None)
    assert decide(HTTPFault(abort=FaultAbort(http_status=500, percentage=0.0)), rng) is None
    assert rng.getstate() == before


@pytest.mark.parametrize("percentage", [0.1, 5.0, 25.0, 50.0, 90.0])
def test_abort_share_matches_percentage(percentage: float) -> None:
    """A seeded run aborts close to the configured share of requests."""
    fault = HTTPFault(abort=FaultAbort(http_status=503, percentage=percentage))
    assert share(fault, what=aborted) == pytest.approx(percentage / 100, abs=0.01)


def test_delay_and_abort_draw_independently() -> None:
    """Delay and abort are separate coin flips: at 50% each, a quarter get both."""
    fault = HTTPFault(
        delay=FaultDelay(fixed_delay=0.1, percentage=50.0),
        abort=FaultAbort(http_status=500, percentage=50.0),
    )
    both = share(fault, what=lambda p: delayed(p) and aborted(p))
    assert share(fault, what=delayed) == pytest.approx(0.5, abs=0.015)
    assert share(fault, what=aborted) == pytest.approx(0.5, abs=0.015)
    assert both == pytest.approx(0.25, abs=0.015)


def test_grpc_abort_from_the_route() -> None:
    """An abort with grpcStatus answers with that gRPC status."""
    fault = HTTPFault(abort=FaultAbort(grpc_status="UNAVAILABLE", percentage=100.0))
    assert decide(fault, random.Random(SEED)) == FaultPlan(None, None, "UNAVAILABLE")


def test_same_seed_same_decisions() -> None:
    """Decisions are a pure function of the generator's state."""
    fault = HTTPFault(abort=FaultAbort(http_status=503, percentage=30.0))
    first, second = random.Random(5), random.Random(5)
    assert [decide(fault, first) for _ in range(200)] == [decide(fault, second) for _ in range(200)]


def test_fires_edges() -> None:
    """None never fires; out-of-range percentages clamp."""
    rng = random.Random(SEED)
    assert not fires(None, rng)
    assert not fires(-5.0, rng)
    assert fires(250.0, rng)


# --------------------------------------------------------------------------- header faults


def test_header_faults_need_the_header_lookup() -> None:
    """Without ``header`` (MeshConfig allowHeaderFaults off) headers are never consulted."""
    assert decide(None, random.Random(SEED)) is None
    plan = decide(None, random.Random(SEED), headers({"x-envoy-fault-abort-request": "503"}))
    assert plan == FaultPlan(None, 503, None)


def test_header_delay_in_milliseconds() -> None:
    """x-envoy-fault-delay-request is milliseconds; it fires at 100% with no route cap."""
    plan = decide(None, random.Random(SEED), headers({"x-envoy-fault-delay-request": "250"}))
    assert plan == FaultPlan(0.25, None, None)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("14", "UNAVAILABLE"),
        ("unavailable", "UNAVAILABLE"),
        ("4", "DEADLINE_EXCEEDED"),
        ("16", "UNAUTHENTICATED"),
    ],
)
def test_header_grpc_abort_by_number_or_name(value: str, name: str) -> None:
    """x-envoy-fault-abort-grpc-request takes a code 0-16 or its name."""
    plan = decide(None, random.Random(SEED), headers({"x-envoy-fault-abort-grpc-request": value}))
    assert plan == FaultPlan(None, None, name)


@pytest.mark.parametrize(
    "values",
    [
        {"x-envoy-fault-abort-request": "abc"},
        {"x-envoy-fault-abort-request": "199"},
        {"x-envoy-fault-abort-request": "600"},
        {"x-envoy-fault-abort-request": "-503"},
        {"x-envoy-fault-abort-request": "503.0"},
        {"x-envoy-fault-abort-grpc-request": "17"},
        {"x-envoy-fault-abort-grpc-request": "0"},
        {"x-envoy-fault-abort-grpc-request": "OK"},
        {"x-envoy-fault-abort-grpc-request": "NOPE"},
        {"x-envoy-fault-delay-request": "soon"},
        {"x-envoy-fault-delay-request": "-100"},
        {"x-envoy-fault-delay-request": "0"},
        {"x-envoy-fault-delay-request": "inf"},
        {"x-envoy-fault-abort-request-percentage": "100"},  # alone it does nothing
        {"x-envoy-fault-delay-request-percentage": "100"},
    ],
    ids=lambda values: "=".join(next(iter(values.items()))),
)
def test_malformed_header_values_are_ignored(values: dict[str, str]) -> None:
    """A bad value is as if the header were absent."""
    assert decide(None, random.Random(SEED), headers(values)) is None


def test_header_percentage() -> None:
    """The percentage headers set the share, up to 100 when the route sets no cap."""
    values = {
        "x-envoy-fault-abort-request": "503",
        "x-envoy-fault-abort-request-percentage": "30",
    }
    assert share(None, values=values, what=aborted) == pytest.approx(0.30, abs=0.015)
    values["x-envoy-fault-abort-request-percentage"] = "0"
    assert share(None, values=values) == 0.0
    values["x-envoy-fault-abort-request-percentage"] = "junk"  # ignored: the cap, 100
    assert share(None, values=values) == 1.0


def test_header_percentage_is_capped_by_the_route() -> None:
    """A header may not fault more requests than the route's own percentage for that fault;
    without a percentage header the route's percentage applies to the header's fault."""
    route = HTTPFault(
        delay=FaultDelay(fixed_delay=2.0, percentage=20.0),
        abort=FaultAbort(http_status=500, percentage=10.0),
    )
    values = {
        "x-envoy-fault-abort-request": "503",
        "x-envoy-fault-abort-request-percentage": "50",
        "x-envoy-fault-delay-request": "100",
        "x-envoy-fault-delay-request-percentage": "5",
    }
    assert share(route, values=values, what=aborted) == pytest.approx(0.10, abs=0.01)
    assert share(route, values=values, what=delayed) == pytest.approx(0.05, abs=0.01)
    del values["x-envoy-fault-abort-request-percentage"]
    assert share(route, values=values, what=aborted) == pytest.approx(0.10, abs=0.01)


def test_header_fault_replaces_the_route_fault() -> None:
    """The header's status and duration win over the route's."""
    route = HTTPFault(
        delay=FaultDelay(fixed_delay=2.0, percentage=100.0),
        abort=FaultAbort(http_status=500, percentage=100.0),
    )
    values = {"x-envoy-fault-abort-request": "429", "x-envoy-fault-delay-request": "10"}
    assert decide(route, random.Random(SEED), headers(values)) == FaultPlan(0.01, 429, None)
    assert decide(route, random.Random(SEED), headers({})) == FaultPlan(2.0, 500, None)


def test_header_http_and_grpc_aborts_together() -> None:
    """Both abort headers: the plan carries both, for the adapter of either protocol."""
    values = {"x-envoy-fault-abort-request": "503", "x-envoy-fault-abort-grpc-request": "14"}
    assert decide(None, random.Random(SEED), headers(values)) == FaultPlan(None, 503, "UNAVAILABLE")


@given(
    values=st.dictionaries(
        st.sampled_from(
            [
                "x-envoy-fault-delay-request",
                "x-envoy-fault-delay-request-percentage",
                "x-envoy-fault-abort-request",
                "x-envoy-fault-abort-grpc-request",
                "x-envoy-fault-abort-request-percentage",
            ]
        ),
        st.text(max_size=8) | st.integers(-1000, 1000).map(str),
    ),
    seed=st.integers(0, 2**32),
)
def test_any_header_values_give_a_valid_plan(values: dict[str, str], seed: int) -> None:
    """Whatever a caller sends, decide never raises and every plan is well formed."""
    plan = decide(None, random.Random(seed), headers(values))
    if plan is None:
        return
    assert plan.delay is not None or plan.abort_status is not None or plan.grpc_status is not None
    assert plan.delay is None or plan.delay > 0
    assert plan.abort_status is None or 200 <= plan.abort_status < 600
    assert plan.grpc_status is None or plan.grpc_status in GRPC_STATUS_NAMES[1:]
