"""Prepared plans: a request whose routing inputs never change (a gRPC call without
metadata) is planned once per snapshot, and each call then decides exactly as ``plan()``
would, with the same draws from the same seeded generator.

Pure tests over snapshots compiled from registry YAML: no server is needed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from inmesh import Mesh
from inmesh.plan import Plan, Upstream, plan, prepare
from inmesh.registry import MemoryRegistry

SERVICES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  ports: [{{number: 9090, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 10.0.0.1, labels: {{version: v1}}}}
  - {{address: 10.0.0.2, labels: {{version: v2}}}}
  - {{address: 10.0.0.3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: {hash_header}}}}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
"""

ROUTES = {
    "three-way split, mirrored to a share": """
  - match: [{uri: {prefix: /ratings.Admin/}}]
    route: [{destination: {host: ratings, subset: v3}}]
  - route:
    - {destination: {host: ratings, subset: v1}, weight: 50}
    - {destination: {host: ratings, subset: v2}, weight: 30}
    - {destination: {host: ratings, subset: v3}, weight: 20}
    mirror: {host: ratings, subset: v3}
    mirrorPercentage: {value: 25}
""",
    "one destination, mirrored always": """
  - route: [{destination: {host: ratings, subset: v1}}]
    mirror: {host: ratings, subset: v2}
""",
    "a split with an undefined subset and a zero weight": """
  - route:
    - {destination: {host: ratings, subset: v1}, weight: 60}
    - {destination: {host: ratings, subset: nope}, weight: 40}
    - {destination: {host: ratings, subset: v2}, weight: 0}
    mirror: {host: ratings, subset: nope}
    mirrorPercentage: {value: 50}
""",
    "a rewrite of path and authority": """
  - match: [{uri: {prefix: /ratings.Ratings/}}]
    rewrite: {uri: /ratings.v2.Ratings/, authority: ratings-v2}
    route:
    - {destination: {host: ratings, subset: v1}, weight: 1}
    - {destination: {host: ratings, subset: v2}, weight: 1}
""",
    "all weights zero": """
  - route: [{destination: {host: ratings, subset: v1}, weight: 0}]
""",
    "no route matches": """
  - match: [{uri: {exact: /other.Service/Method}}]
    route: [{destination: {host: ratings, subset: v1}}]
""",
    "a redirect": """
  - redirect: {uri: /ratings.v2.Ratings/Get, authority: ratings-v2}
""",
    "no VirtualService": None,
}


@dataclass(frozen=True)
class Call:
    """A call without metadata: only the method path varies between requests."""

    path: str
    host: str = "ratings"
    port: int = 9090
    method: str = "POST"
    scheme: str = "http"
    query: str = ""

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def header(self, name: str) -> str | None:
        return "application/grpc" if name == "content-type" else None


def snapshot_for(routes: str | None, hash_header: str = "end-user") -> Mesh:
    documents = SERVICES.format(hash_header=hash_header)
    if routes is not None:
        documents += (
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:" + routes
        )
    return Mesh(MemoryRegistry({"mesh.yaml": documents}), seed=1)


def described(decision: Plan) -> object:
    """What a plan decides, comparable across two computations of it."""
    if not isinstance(decision, Upstream):
        return decision
    return (
        decision.cluster.name,
        decision.table is None,
        None if decision.forward is None else decision.forward.destination.spec,
        decision.path,
        decision.authority,
        decision.request_ops,
        decision.response_ops,
        decision.hash_key,
        None if decision.mirror is None else decision.mirror.name,
    )


@pytest.mark.parametrize("routes", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("path", ["/ratings.Ratings/Get", "/ratings.Admin/Reset"])
@pytest.mark.parametrize("hash_header", ["end-user", "content-type"])
def test_prepared_plan_decides_as_plan_does(
    routes: str | None, path: str, hash_header: str
) -> None:
    """Over many seeded calls, a prepared plan gives what ``plan()`` gives for the same
    request, and leaves the generator in the same state (the same draws were made).
    Hashing on ``content-type`` (which a gRPC call always has) gives every plan a key."""
    mesh = snapshot_for(routes, hash_header)
    snapshot = mesh.snapshot
    call = Call(path)
    prepared = prepare(snapshot, call, source="caller")
    mine, theirs = random.Random(7), random.Random(7)
    seen = set()
    for _ in range(400):
        expected = described(plan(snapshot, call, theirs, source="caller"))
        assert described(prepared(mine)) == expected
        assert mine.getstate() == theirs.getstate()
        seen.add(repr(expected))
    mesh.close()
    if routes is not None and "split" in routes:
        assert len(seen) > 1, "a split must give more than one plan over 400 calls"


def test_prepared_plan_belongs_to_its_snapshot() -> None:
    """A prepared plan names the snapshot it was made from (callers re-prepare on a swap)."""
    mesh = snapshot_for(ROUTES["one destination, mirrored always"])
    prepared = prepare(mesh.snapshot, Call("/ratings.Ratings/Get"))
    assert prepared.snapshot is mesh.snapshot
    decision = prepared(random.Random(1))
    assert isinstance(decision, Upstream)
    assert decision.mirror is not None
    assert decision.mirror.name == "outbound|9090|v2|ratings"
    mesh.close()
