"""``inmesh explain``: which rule matched a request, and why, and where it would go.

Pure: it replays the same decision the transports make (``plan`` and the routing table)
on a request described by plain values, and renders every step as text: each route
tried and the condition that turned it down, the destinations and their weight shares,
the subset, the balancer and its endpoints.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from inmesh.plan import LocalReply, Passthrough, Upstream, plan
from inmesh.routing import CompiledRoute, RouteTable
from inmesh.snapshot import Snapshot

__all__ = ["StaticRequest", "explain"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticRequest:
    """A ``RequestView`` made of plain values (header names lower-case)."""

    method: str = "GET"
    scheme: str = "http"
    host: str
    port: int
    path: str = "/"
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_url(
        cls, url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None
    ) -> StaticRequest:
        parts = urlsplit(url)
        scheme = parts.scheme or "http"
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        host = (parts.hostname or "").lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme, 80)
        headers.setdefault("host", parts.netloc)
        return cls(
            method=method.upper(),
            scheme=scheme,
            host=host,
            port=port,
            path=parts.path or "/",
            query=parts.query,
            headers=headers,
        )

    @property
    def authority(self) -> str:
        return self.headers.get("host") or f"{self.host}:{self.port}"

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def _route_lines(
    table: RouteTable, request: StaticRequest
) -> tuple[list[str], CompiledRoute | None]:
    lines = [f"VirtualService {table.namespace}/{table.name} ({table.origin})"]
    for route in table.routes:
        label = f"  {route.spec.path}" + (f" {route.spec.name!r}" if route.spec.name else "")
        if not route.matches:
            lines.append(f"{label}: matches (no match conditions)")
            return lines, route
        reasons = []
        for block in route.matches:
            failure = block.first_failure(request)
            if failure is None:
                lines.append(f"{label}: matches (match[{block.index}])")
                return lines, route
            reasons.append(f"match[{block.index}] {failure} does not match")
        lines.append(f"{label}: skipped — " + "; ".join(reasons))
    return lines, None


def explain(snapshot: Snapshot, request: StaticRequest, *, source: str = "") -> str:
    """A human-readable account of where ``request`` goes under ``snapshot``."""
    lines = [
        f"request: {request.method} {request.scheme}://{request.authority}{request.path}"
        + (f"?{request.query}" if request.query else "")
    ]
    table = snapshot.route_table(request.host)
    chosen: CompiledRoute | None = None
    if table is not None:
        route_lines, chosen = _route_lines(table, request)
        lines += route_lines
    elif snapshot.service(request.host) is not None:
        lines.append(f"no VirtualService for {request.host}: every endpoint of the service")

    decision = plan(snapshot, request, random.Random(0), source=source)
    if isinstance(decision, Passthrough):
        lines.append(f"{request.host} is not in the registry: passed through unchanged (ALLOW_ANY)")
        return "\n".join(lines)
    if isinstance(decision, LocalReply):
        where = f" → {decision.location}" if decision.location else ""
        lines.append(f"answered by the mesh: {decision.status} {decision.reason}{where}")
        return "\n".join(lines)
    assert isinstance(decision, Upstream)

    if chosen is not None and chosen.destinations:
        lines.append("destinations:")
        for dest in chosen.destinations:
            d = dest.spec.destination
            target = (
                d.host
                + (f" subset {d.subset}" if d.subset else "")
                + (f" port {d.port}" if d.port else "")
            )
            resolved = snapshot.resolve(d, request.host, request.port)
            state = (
                ""
                if not hasattr(resolved, "status")
                else f"  ({resolved.status}: {getattr(resolved, 'reason', '')})"
            )
            lines.append(
                f"  {chosen.share(dest):6.1%}  weight {dest.spec.weight:<4} {target}{state}"
            )
    if decision.path is not None or decision.authority is not None:
        lines.append(
            f"rewrite: path {decision.path or request.path}, "
            f"authority {decision.authority or request.authority}"
        )

    cluster = decision.cluster
    lines.append(
        f"cluster: {cluster.key} (for this draw)"
        if chosen and len(chosen.destinations) > 1
        else f"cluster: {cluster.key}"
    )
    if cluster.rule is not None:
        lines.append(
            f"DestinationRule {cluster.rule.namespace}/{cluster.rule.name} ({cluster.rule.origin})"
        )
    balancer = cluster.balancer
    lines.append(f"balancer: {balancer.describe()}")
    if decision.hash_key is not None:
        lines.append(f"hash key: {decision.hash_key.decode(errors='replace')!r}")
    if not cluster.endpoints:
        lines.append("endpoints: none — the request would get 503 no healthy upstream")
    else:
        lines.append(f"endpoints ({len(cluster.endpoints)}):")
        for endpoint in cluster.endpoints[:50]:
            extra = []
            if endpoint.weight != 1:
                extra.append(f"weight {endpoint.weight}")
            if str(endpoint.locality):
                extra.append(f"locality {endpoint.locality}")
            if endpoint.labels:
                extra.append(",".join(f"{k}={v}" for k, v in sorted(endpoint.labels.items())))
            lines.append(f"  {endpoint}" + (f"  ({'; '.join(extra)})" if extra else ""))
        if len(cluster.endpoints) > 50:
            lines.append(f"  ... and {len(cluster.endpoints) - 50} more")
    return "\n".join(lines)
