"""Plan one request: what the mesh does with it, decided before any I/O.

``plan(snapshot, request, rng)`` is a pure function: the host's route table picks a route
and a weighted destination, the destination names a cluster, the cluster's policy says
how to hash. The answer is a local reply (no route, redirect, unknown subset, registry
only), a passthrough (a host the mesh does not know, under ALLOW_ANY), or an ``Upstream``
for the transport to send. ``inmesh explain`` prints the same decision.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import NamedTuple

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

__all__ = ["PASSTHROUGH", "LocalReply", "Passthrough", "Plan", "Upstream", "plan"]


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

    path = authority = None
    mirror: Cluster | None = None
    request_ops: tuple[HeaderOperations, ...] = ()
    response_ops: tuple[HeaderOperations, ...] = ()
    if forward is not None:
        spec = forward.route.spec
        if spec.mirror is not None:
            share = 100.0 if spec.mirror_percentage is None else spec.mirror_percentage
            if share >= 100.0 or rng.random() * 100.0 < share:
                target = snapshot.resolve(spec.mirror, host, request.port)
                mirror = None if isinstance(target, NoRoute) else target
        rewrite = spec.rewrite
        if rewrite is not None:
            new_path = rewrite_path(request.path, rewrite, forward.block)
            if new_path != request.path:
                path = f"{new_path}?{request.query}" if request.query else new_path
            authority = rewrite.authority
        _, request_ops, response_ops = forward.destination

    hashing = cluster.hash_policy
    key = None if hashing is None else hash_key(hashing, request, source)
    return Upstream(
        cluster, table, forward, path, authority, request_ops, response_ops, key, mirror
    )
