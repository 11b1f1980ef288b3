"""Plan one request: what the mesh does with it, decided before any I/O.

``plan(snapshot, request, rng)`` is a pure function: the host's route table picks a route
and a weighted destination, the destination names a cluster, the cluster's policy says
how to hash. The answer is a local reply (no route, redirect, unknown subset, registry
only), a passthrough (a host the mesh does not know, under ALLOW_ANY), or an ``Upstream``
for the transport to send. ``inmesh explain`` prints the same decision.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import NamedTuple

from inmesh._namedtuples import build as _tuple
from inmesh.config.model import (
    ConsistentHash,
    CookieHashKey,
    HeaderHashKey,
    HeaderOperations,
    OutboundMode,
    QueryHashKey,
)
from inmesh.routing import (
    Forward,
    NoRoute,
    Redirect,
    RequestView,
    RouteTable,
    query_value,
    redirect_location,
    rewrite_path,
)
from inmesh.snapshot import Cluster, Snapshot

__all__ = [
    "PASSTHROUGH",
    "LocalReply",
    "Passthrough",
    "Plan",
    "Prepared",
    "Upstream",
    "plan",
    "prepare",
]


class LocalReply(NamedTuple):
    """Answered by the mesh itself, without an upstream call."""

    status: int
    reason: str
    location: str | None = None
    grpc_status: str | None = None  # for gRPC callers (fault aborts)
    overloaded: bool = False  # circuit breaking: answered with x-envoy-overloaded: true


@dataclass(frozen=True, slots=True)
class Passthrough:
    """A host outside the registry, sent as the caller addressed it (Istio's ALLOW_ANY)."""


PASSTHROUGH = Passthrough()


class Upstream(NamedTuple):
    """Send to an endpoint of ``cluster`` (a NamedTuple: one is built per request)."""

    cluster: Cluster
    table: RouteTable | None
    forward: Forward | None
    path: str | None  # the rewritten path (with query), None when unchanged
    authority: str | None  # the rewritten authority, None when unchanged
    request_ops: tuple[HeaderOperations, ...]
    response_ops: tuple[HeaderOperations, ...]
    hash_key: bytes | None
    mirror: Cluster | None  # where a copy goes (fire-and-forget), if the route mirrors


Plan = LocalReply | Passthrough | Upstream


def hash_key(policy: ConsistentHash, request: RequestView, source: str) -> bytes | None:
    """The consistent-hash input a request carries, or None (then the balancer picks at random)."""
    key = policy.key
    value: str | None
    if isinstance(key, HeaderHashKey):
        value = request.header(key.name)
    elif isinstance(key, CookieHashKey):
        value = _cookie(request.header("cookie"), key.name)
    elif isinstance(key, QueryHashKey):
        value = query_value(request, key.name)
    else:  # the calling workload: every request of this process hashes alike
        value = source
    return None if value is None else value.encode()


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:
        return None
    morsel = jar.get(name)
    return None if morsel is None else morsel.value


def plan(snapshot: Snapshot, request: RequestView, rng: random.Random, *, source: str = "") -> Plan:
    host = request.host
    table = snapshot.route_table(host)
    forward: Forward | None = None
    if table is not None:
        decision = table.decide(request, rng)
        if isinstance(decision, NoRoute):
            return LocalReply(decision.status, decision.reason)
        if isinstance(decision, Redirect):
            location = redirect_location(request, decision.redirect)
            return LocalReply(decision.redirect.redirect_code, "redirect", location)
        forward = decision
    elif snapshot.service(host) is None:
        if snapshot.mesh_config.outbound_traffic_policy is OutboundMode.REGISTRY_ONLY:
            return LocalReply(
                502, f"{host} is not in the mesh registry (outboundTrafficPolicy REGISTRY_ONLY)"
            )
        return PASSTHROUGH

    cluster = snapshot.resolve(
        forward.destination.spec.destination if forward else None, host, request.port
    )
    if isinstance(cluster, NoRoute):
        return LocalReply(cluster.status, cluster.reason)

    mirror: Cluster | None = None
    if forward is not None:
        spec = forward.route.spec
        if spec.mirror is not None:
            share = 100.0 if spec.mirror_percentage is None else spec.mirror_percentage
            if share >= 100.0 or rng.random() * 100.0 < share:
                target = snapshot.resolve(spec.mirror, host, request.port)
                mirror = None if isinstance(target, NoRoute) else target
    return _upstream(cluster, request, table, forward, mirror=mirror, source=source)


def _upstream(
    cluster: Cluster,
    request: RequestView,
    table: RouteTable | None,
    forward: Forward | None,
    *,
    mirror: Cluster | None,
    source: str,
) -> Upstream:
    """The rest of an upstream plan: what follows from the request alone (no draws)."""
    path = authority = None
    request_ops: tuple[HeaderOperations, ...] = ()
    response_ops: tuple[HeaderOperations, ...] = ()
    if forward is not None:
        rewrite = forward.route.spec.rewrite
        if rewrite is not None:
            new_path = rewrite_path(request.path, rewrite, forward.block)
            if new_path != request.path:
                path = f"{new_path}?{request.query}" if request.query else new_path
            authority = rewrite.authority
        _, request_ops, response_ops = forward.destination

    hashing = cluster.hash_policy
    key = None if hashing is None else hash_key(hashing, request, source)
    return _tuple(
        Upstream,
        (cluster, table, forward, path, authority, request_ops, response_ops, key, mirror),
    )


class Prepared:
    """The plan of a request whose routing inputs never change, made once per snapshot.

    A gRPC call without metadata is such a request: its host, port, method path and
    (absent) headers are the same on every call, so the route match, cluster resolution,
    rewrites and hash key are too. What is left per call is what ``plan()`` draws at
    random, the weighted destination and the mirror share, drawn here with the same calls
    on the same ``rng`` in the same order, so a seeded Mesh decides alike either way.
    """

    __slots__ = (
        "_cumulative",
        "_fixed",
        "_mirror_share",
        "_mirrored",
        "_total",
        "_unmirrored",
        "snapshot",
    )

    def __init__(self, snapshot: Snapshot, request: RequestView, *, source: str) -> None:
        self.snapshot = snapshot
        self._fixed: Plan | None = None
        # By the index of the destination drawn, in the route's order (the weights' running
        # sums are the route's own): the plan without a mirrored copy, and the plan with
        # one (None when the route does not mirror or the destination does not resolve).
        # Flat tuples, not the route's objects: a call touches as few objects as it can.
        self._unmirrored: tuple[Plan, ...] = ()
        self._mirrored: tuple[Upstream | None, ...] = ()
        self._cumulative: tuple[int, ...] = ()
        self._total = 0
        self._mirror_share = 100.0
        table = snapshot.route_table(request.host)
        # The route and block matched are the request's; the destination is drawn per call.
        decision = None if table is None else table.decide(request, _ANY_DRAW)
        if not isinstance(decision, Forward):
            # No route table, no route (all weights zero included), or a redirect: plan()
            # draws nothing for these, so its answer is the same on every call.
            self._fixed = plan(snapshot, request, _NO_DRAWS, source=source)
            return
        route = decision.route
        spec = route.spec
        unmirrored: list[Plan] = []
        mirrored: list[Upstream | None] = []
        for destination in route.destinations:
            cluster = snapshot.resolve(destination.spec.destination, request.host, request.port)
            if isinstance(cluster, NoRoute):
                unmirrored.append(LocalReply(cluster.status, cluster.reason))
                mirrored.append(None)
                continue
            forward = Forward(route, decision.block, destination)
            upstream = _upstream(cluster, request, table, forward, mirror=None, source=source)
            unmirrored.append(upstream)
            if spec.mirror is None:
                mirrored.append(None)
            else:
                target = snapshot.resolve(spec.mirror, request.host, request.port)
                mirror = None if isinstance(target, NoRoute) else target
                mirrored.append(upstream._replace(mirror=mirror))
        self._unmirrored, self._mirrored = tuple(unmirrored), tuple(mirrored)
        self._cumulative, self._total = route.cumulative, route.total_weight
        if spec.mirror_percentage is not None:
            self._mirror_share = spec.mirror_percentage

    def upstreams(self) -> list[Upstream]:
        """Every upstream plan a call may get (each the same object every time)."""
        plans = [self._fixed, *self._unmirrored, *self._mirrored]
        return [p for p in plans if isinstance(p, Upstream)]

    def __call__(self, rng: random.Random) -> Plan:
        """This call's plan (see ``plan()``)."""
        fixed = self._fixed
        if fixed is not None:
            return fixed
        # ``CompiledRoute.pick``'s draw: none for one destination; a weight is positive,
        # else the route would not have matched (``_fixed`` above).
        cumulative = self._cumulative
        index = 0 if len(cumulative) == 1 else bisect_right(cumulative, rng.random() * self._total)
        mirrored = self._mirrored[index]
        if mirrored is not None:
            share = self._mirror_share
            if share >= 100.0 or rng.random() * 100.0 < share:
                return mirrored
        return self._unmirrored[index]


class _NoDraws(random.Random):
    """A ``Random`` for decisions that do not draw: a draw would be a bug in ``Prepared``."""

    def random(self) -> float:
        raise AssertionError("a prepared plan drew at random while preparing")


class _AnyDraw(random.Random):
    """A ``Random`` for a match whose draw is not used (each call draws its own)."""

    def random(self) -> float:
        return 0.0


_NO_DRAWS = _NoDraws(0)
_ANY_DRAW = _AnyDraw(0)


def prepare(snapshot: Snapshot, request: RequestView, *, source: str = "") -> Prepared:
    """A ``Prepared`` plan for ``request`` (whose routing inputs never change)."""
    return Prepared(snapshot, request, source=source)
