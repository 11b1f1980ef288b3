"""Load balancing through the httpx transports against real loopback upstreams."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest

from inmesh import Mesh
from inmesh.testing.upstream import Upstream

from .conftest import service_yaml


def rule(policy: str, host: str = "reviews") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
  trafficPolicy:
    loadBalancer: {policy}
"""


def names(
    mesh: Mesh,
    mode: str,
    count: int,
    headers: dict[str, str] | None = None,
    url: str = "http://reviews:9080/",
) -> list[str]:
    """Which upstream answered each of ``count`` sequential requests."""
    if mode == "sync":
        with mesh.client() as client:
            return [client.get(url, headers=headers).headers["x-upstream"] for _ in range(count)]

    async def run() -> list[str]:
        async with mesh.async_client() as client:
            return [
                (await client.get(url, headers=headers)).headers["x-upstream"] for _ in range(count)
            ]

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_round_robin_rotates(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """ROUND_ROBIN visits every endpoint once per turn."""
    ups = upstreams("r1", "r2", "r3")
    mesh = make_mesh(service_yaml("reviews", ups), rule("{simple: ROUND_ROBIN}"))
    seen = names(mesh, mode, 9)
    assert Counter(seen) == {"r1": 3, "r2": 3, "r3": 3}
    assert len(set(seen[:3])) == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_weighted_round_robin_honours_endpoint_weights(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """Endpoint weights 3:1 under ROUND_ROBIN give exactly 3:1 over whole cycles."""
    heavy, light = upstreams("heavy", "light")
    services = service_yaml("reviews", [heavy, light])
    services = services.replace("labels: {name: heavy}", "labels: {name: heavy}, weight: 3")
    mesh = make_mesh(services, rule("{simple: ROUND_ROBIN}"))
    assert Counter(names(mesh, mode, 40)) == {"heavy": 30, "light": 10}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_random_spreads_over_all_endpoints(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """RANDOM with a seeded mesh spreads 300 requests with every endpoint above 60."""
    ups = upstreams("x1", "x2", "x3")
    mesh = make_mesh(service_yaml("reviews", ups), rule("{simple: RANDOM}"))
    counts = Counter(names(mesh, mode, 300))
    assert set(counts) == {"x1", "x2", "x3"}
    assert min(counts.values()) > 60


def test_least_request_avoids_busy_endpoint(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """LEAST_REQUEST (the default) steers away from an endpoint with requests in flight."""
    busy, idle = upstreams("busy", "idle")
    mesh = make_mesh(service_yaml("reviews", [busy, idle]))
    stats = mesh.stats.get((busy.address, busy.port))
    for _ in range(5):
        stats.begin()  # five requests "in flight" to busy
    try:
        assert Counter(names(mesh, "sync", 20)) == {"idle": 20}
    finally:
        for _ in range(5):
            stats.end()


@pytest.mark.parametrize(
    ("policy", "headers", "url"),
    [
        ("{consistentHash: {httpHeaderName: x-user}}", {"x-user": "{key}"}, "http://reviews:9080/"),
        (
            "{consistentHash: {httpCookie: {name: session}}}",
            {"cookie": "a=b; session={key}"},
            "http://reviews:9080/",
        ),
        ("{consistentHash: {httpQueryParameterName: user}}", {}, "http://reviews:9080/?user={key}"),
        (
            "{consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}",
            {"x-user": "{key}"},
            "http://reviews:9080/",
        ),
        (
            "{consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 64}}}",
            {"x-user": "{key}"},
            "http://reviews:9080/",
        ),
    ],
)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_consistent_hash_sticks_to_one_endpoint(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
    mode: str,
    policy: str,
    headers: dict[str, str],
    url: str,
) -> None:
    """The same hash key always reaches the same endpoint; different keys reach several."""
    ups = upstreams("h1", "h2", "h3", "h4")
    mesh = make_mesh(service_yaml("reviews", ups), rule(policy))
    homes = {}
    for key in [f"user-{i}" for i in range(12)]:
        h = {k: v.format(key=key) for k, v in headers.items()}
        seen = set(names(mesh, mode, 4, h, url.format(key=key)))
        assert len(seen) == 1, f"{key} went to {seen}"
        homes[key] = seen.pop()
    assert len(set(homes.values())) >= 2


def test_use_source_ip_pins_this_workload(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """useSourceIp hashes the calling workload: every request of this process lands together."""
    ups = upstreams("s1", "s2", "s3")
    mesh = make_mesh(
        service_yaml("reviews", ups),
        rule("{consistentHash: {useSourceIp: true}}"),
        workload="productpage",
    )
    assert len(set(names(mesh, "sync", 20))) == 1


def test_subset_traffic_policy_overrides_the_rule(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A subset's own loadBalancer wins over the rule's for traffic to that subset."""
    a, b, c = upstreams("a", "b", "c")
    services = service_yaml(
        "reviews", [a, b, c], labels=[{"version": "v1"}, {"version": "v1"}, {"version": "v2"}]
    )
    mesh = make_mesh(
        services,
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
""",
    )
    cluster = mesh.snapshot.resolve(None, "reviews", 9080)
    assert "RANDOM" in cluster.balancer.describe()  # type: ignore[union-attr]
    seen = set(names(mesh, "sync", 10, {"x-user": "ann"}))
    assert len(seen) == 1 and seen <= {"a", "b"}


def test_locality_distribute_shares(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """localityLbSetting.distribute sends 80/20 from the caller's zone, within tolerance."""
    west, east = upstreams("west", "east")
    services = service_yaml("reviews", [west, east])
    services = services.replace("labels: {name: west}", "labels: {name: west}, locality: us/west")
    services = services.replace("labels: {name: east}", "labels: {name: east}, locality: us/east")
    mesh = make_mesh(
        services,
        rule("""
      localityLbSetting:
        distribute:
        - from: us/west/*
          to: {"us/west/*": 80, "us/east/*": 20}"""),
        locality="us/west/a",
    )
    counts = Counter(names(mesh, "sync", 500))
    assert abs(counts["west"] - 400) <= 40
    assert counts["west"] + counts["east"] == 500
