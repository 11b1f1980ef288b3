"""The resource models: Istio's traffic API as frozen values.

Only what inmesh implements has a field here; the parser rejects everything else by
name. Field names are the snake_case of Istio's camelCase. Durations are seconds as
floats (Istio's are whole milliseconds, which a float holds exactly enough). Every
resource keeps its ``origin`` (file and line) so that compile-time problems can point at
the document that caused them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "ConsistentHash",
    "CookieHashKey",
    "Destination",
    "DestinationRule",
    "Distribute",
    "Failover",
    "HTTPMatch",
    "HTTPRedirect",
    "HTTPRewrite",
    "HTTPRoute",
    "HeaderHashKey",
    "HeaderOperations",
    "Headers",
    "LoadBalancerSettings",
    "LocalityLbSetting",
    "Maglev",
    "MeshConfig",
    "Origin",
    "OutboundMode",
    "Port",
    "QueryHashKey",
    "Resource",
    "RingHash",
    "RouteDestination",
    "ServiceEntry",
    "SimpleLB",
    "SourceIpHashKey",
    "StringMatch",
    "Subset",
    "TrafficPolicy",
    "VirtualService",
    "WorkloadEntry",
    "WorkloadSpec",
]

EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    # A shared read-only empty mapping. dataclasses refuse an unhashable default such as a
    # mappingproxy ("mutable default"), so it is handed out by a factory instead.
    return EMPTY_LABELS


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a resource came from: a file (or registry key), its line, its document index."""

    source: str
    line: int | None = None

    def __str__(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"


# --------------------------------------------------------------------------- common


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio's StringMatch oneof: exact, prefix or (full-match, RE2) regex."""

    kind: Literal["exact", "prefix", "regex"]
    value: str


# --------------------------------------------------------------------------- services


@dataclass(frozen=True, slots=True, kw_only=True)
class Port:
    number: int
    name: str
    protocol: str = "HTTP"
    target_port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSpec:
    """An endpoint as ServiceEntry ``endpoints`` and WorkloadEntry ``spec`` both write it."""

    address: str
    ports: Mapping[str, int] = field(default_factory=_empty)
    labels: Mapping[str, str] = field(default_factory=_empty)
    locality: str = ""
    weight: int = 1
    service_account: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEntry:
    name: str
    namespace: str
    origin: Origin
    hosts: tuple[str, ...]
    ports: tuple[Port, ...]
    resolution: Literal["STATIC", "DNS"] = "STATIC"
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] = "MESH_EXTERNAL"
    endpoints: tuple[WorkloadSpec, ...] = ()
    workload_selector: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadEntry:
    name: str
    namespace: str
    origin: Origin
    spec: WorkloadSpec


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPMatch:
    """One match block: every condition set here must hold (AND)."""

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    # None as a value means "present, any value" (Istio's `{}`).
    headers: Mapping[str, StringMatch | None] = field(default_factory=_empty)
    without_headers: Mapping[str, StringMatch | None] = field(default_factory=_empty)
    query_params: Mapping[str, StringMatch | None] = field(default_factory=_empty)
    ignore_uri_case: bool = False
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderOperations:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    host: str
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDestination:
    destination: Destination
    weight: int
    headers: Headers | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    scheme: str | None = None
    redirect_code: int = 301


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex: tuple[str, str] | None = None  # (match, rewrite) of uriRegexRewrite


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatch, ...] = ()  # empty: matches every request
    route: tuple[RouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    rewrite: HTTPRewrite | None = None
    headers: Headers | None = None
    path: str = ""  # the field path of this route in its resource, for explain and errors


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualService:
    name: str
    namespace: str
    origin: Origin
    hosts: tuple[str, ...]
    http: tuple[HTTPRoute, ...]


# --------------------------------------------------------------------------- destination rules


class SimpleLB(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"


@dataclass(frozen=True, slots=True)
class HeaderHashKey:
    name: str  # lower-case


@dataclass(frozen=True, slots=True)
class CookieHashKey:
    name: str


@dataclass(frozen=True, slots=True)
class QueryHashKey:
    name: str


@dataclass(frozen=True, slots=True)
class SourceIpHashKey:
    pass


HashKey = HeaderHashKey | CookieHashKey | QueryHashKey | SourceIpHashKey


@dataclass(frozen=True, slots=True)
class RingHash:
    minimum_ring_size: int = 1024


@dataclass(frozen=True, slots=True)
class Maglev:
    table_size: int = 65537


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistentHash:
    key: HashKey
    table: RingHash | Maglev = field(default_factory=RingHash)


@dataclass(frozen=True, slots=True, kw_only=True)
class Distribute:
    from_: str  # "region/zone/subzone", each part may be "*"
    to: tuple[tuple[str, int], ...]  # locality pattern → weight (percent)


@dataclass(frozen=True, slots=True, kw_only=True)
class Failover:
    from_: str  # region
    to: str  # region


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityLbSetting:
    enabled: bool = True
    distribute: tuple[Distribute, ...] = ()
    failover: tuple[Failover, ...] = ()
    failover_priority: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancerSettings:
    """``simple`` and ``consistent_hash`` are a oneof; neither set means LEAST_REQUEST."""

    simple: SimpleLB | None = None
    consistent_hash: ConsistentHash | None = None
    locality: LocalityLbSetting | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None

    def overridden_by(self, other: TrafficPolicy | None) -> TrafficPolicy:
        """Field by field, ``other``'s settings win (a subset's policy over the rule's)."""
        if other is None:
            return self
        return TrafficPolicy(load_balancer=other.load_balancer or self.load_balancer)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subset:
    name: str
    labels: Mapping[str, str] = field(default_factory=_empty)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationRule:
    name: str
    namespace: str
    origin: Origin
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()


# --------------------------------------------------------------------------- mesh config


class OutboundMode(enum.Enum):
    ALLOW_ANY = "ALLOW_ANY"
    REGISTRY_ONLY = "REGISTRY_ONLY"


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """What Istio keeps outside the traffic resources. Grows with each capability."""

    name: str = "default"
    origin: Origin = field(default_factory=lambda: Origin("<defaults>"))
    outbound_traffic_policy: OutboundMode = OutboundMode.ALLOW_ANY


Resource = ServiceEntry | WorkloadEntry | VirtualService | DestinationRule | MeshConfig
