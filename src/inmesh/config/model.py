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

from inmesh.grpc_status import GRPC_STATUS_NAMES

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_RETRY_ON",
    "GRPC_STATUS_NAMES",
    "ConnectionPoolSettings",
    "ConsistentHash",
    "CookieHashKey",
    "Destination",
    "DestinationRule",
    "Distribute",
    "Failover",
    "FaultAbort",
    "FaultDelay",
    "HTTPFault",
    "HTTPMatch",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HTTPSettings",
    "HeaderHashKey",
    "HeaderOperations",
    "Headers",
    "LoadBalancerSettings",
    "LocalityLbSetting",
    "Maglev",
    "MeshConfig",
    "Origin",
    "OutboundMode",
    "OutlierDetection",
    "Port",
    "QueryHashKey",
    "RatioRetryBudget",
    "Resource",
    "RetryBudget",
    "RingHash",
    "RouteDestination",
    "ServiceEntry",
    "SimpleLB",
    "SourceIpHashKey",
    "StringMatch",
    "Subset",
    "TCPSettings",
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


# --------------------------------------------------------------------------- failure management

# Istio's default retry policy since 1.x: 2 retries on these conditions, no status codes
# (503 was dropped after retries duplicated non-idempotent requests).
DEFAULT_RETRY_ON = (
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRetry:
    """VirtualService ``retries``. ``attempts`` counts retries, not tries (Istio's meaning)."""

    attempts: int = 2
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON  # condition names, lower-case, no codes
    retry_status_codes: tuple[int, ...] = ()  # plain codes written in retryOn ("503,429")


DEFAULT_RETRY = HTTPRetry()


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDelay:
    fixed_delay: float
    percentage: float | None = None  # 0-100; None: the fault never fires (Istio)


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: str | None = None  # upper-case name, e.g. "UNAVAILABLE"
    percentage: float | None = None  # 0-100; None: the fault never fires (Istio)


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPFault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatch, ...] = ()  # empty: matches every request
    route: tuple[RouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    rewrite: HTTPRewrite | None = None
    headers: Headers | None = None
    timeout: float | None = None  # seconds; None: no overall timeout (Istio's default)
    retries: HTTPRetry | None = None  # None: the mesh default (Istio's: 2 retries, see above)
    fault: HTTPFault | None = None
    mirror: Destination | None = None
    mirror_percentage: float | None = None  # 0-100; None with a mirror: 100
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
class TCPSettings:
    max_connections: int | None = None  # None: unlimited (Istio: 2^32-1)
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None  # None: unlimited
    http2_max_requests: int | None = None  # max concurrent requests; None: unlimited
    max_requests_per_connection: int | None = None  # 1: no keep-alive; None: unlimited
    max_retries: int | None = None  # concurrent retries to the cluster; None: unlimited
    idle_timeout: float | None = None  # None: the client's keep-alive expiry


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPoolSettings:
    tcp: TCPSettings = field(default_factory=TCPSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    # Part of the transports' per-endpoint pool keys, hashed on every request: hashed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.tcp, self.http)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt, not restored: a hash is only good in the process that made it.
        return (_pool_settings, (self.tcp, self.http))


def _pool_settings(tcp: TCPSettings, http: HTTPSettings) -> ConnectionPoolSettings:
    return ConnectionPoolSettings(tcp=tcp, http=http)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    """Envoy's outlier detection as Istio configures it (defaults are Istio's)."""

    consecutive_5xx_errors: int | None = 5  # 0 or None: off
    consecutive_gateway_errors: int | None = None  # 502/503/504 and connect failures
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0  # Envoy's cap on base × times ejected
    max_ejection_percent: float = 10.0  # at least one endpoint may be ejected regardless
    min_health_percent: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudget:
    """DestinationRule ``retryBudget`` (Istio 1.27): Envoy's concurrent-retry budget."""

    percent: float = 20.0  # of active (and pending) requests that may be retries at once
    min_retry_concurrency: int = 3
    budget_interval: float | None = None  # None/0: active requests only; else a window


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    retry_budget: RetryBudget | None = None

    def overridden_by(self, other: TrafficPolicy | None) -> TrafficPolicy:
        """Field by field, ``other``'s settings win (a subset's policy over the rule's)."""
        if other is None:
            return self
        return TrafficPolicy(
            load_balancer=other.load_balancer or self.load_balancer,
            connection_pool=other.connection_pool or self.connection_pool,
            outlier_detection=other.outlier_detection or self.outlier_detection,
            retry_budget=other.retry_budget or self.retry_budget,
        )


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
class RatioRetryBudget:
    """The mesh-wide retry budget, in the style of Finagle and Linkerd: retries may add
    ``retry_ratio`` of the requests seen over ``ttl`` seconds, plus a floor of
    ``min_retries_per_second``."""

    retry_ratio: float = 0.2
    min_retries_per_second: float = 10.0
    ttl: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """What Istio keeps outside the traffic resources. Grows with each capability."""

    name: str = "default"
    origin: Origin = field(default_factory=lambda: Origin("<defaults>"))
    outbound_traffic_policy: OutboundMode = OutboundMode.ALLOW_ANY
    # Istio's meshConfig.defaultHttpRetryPolicy: routes without `retries` use it.
    default_http_retry_policy: HTTPRetry = DEFAULT_RETRY
    # None: the mesh-wide ratio budget is off (a DestinationRule retryBudget still applies).
    retry_budget: RatioRetryBudget | None = field(default_factory=RatioRetryBudget)
    # x-envoy-fault-* request headers inject faults only when this is on.
    allow_header_faults: bool = False
    mirror_max_in_flight: int = 64


Resource = ServiceEntry | WorkloadEntry | VirtualService | DestinationRule | MeshConfig
