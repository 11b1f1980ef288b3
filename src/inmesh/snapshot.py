"""Compile validated resources into an immutable ``Snapshot`` of lookup tables.

A snapshot answers, for one calling workload: which route table serves a host, which
service and port a destination names, and which endpoints make up a cluster (service +
port + subset) with which traffic policy. A Mesh replaces its snapshot by a single
reference swap; a request keeps the snapshot it started with.

Problems that only show across resources (two VirtualServices claiming one host, two
ServiceEntries declaring one) are found here and reported like validation problems.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from inmesh.balancing import Balancer, build_balancer
from inmesh.config.model import (
    ConsistentHash,
    Destination,
    DestinationRule,
    MeshConfig,
    Port,
    Resource,
    ServiceEntry,
    TrafficPolicy,
    VirtualService,
    WorkloadEntry,
    WorkloadSpec,
)
from inmesh.endpoints import Endpoint, EndpointKey, Locality
from inmesh.exceptions import ConfigError, Problem
from inmesh.routing import NoRoute, RouteTable, compile_route
from inmesh.state import ClusterState, MeshState

__all__ = ["Caller", "Cluster", "ClusterKey", "Service", "Snapshot", "compile_snapshot"]

_EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """The workload a Mesh speaks for: what ``sourceLabels`` and locality LB look at."""

    workload: str | None = None
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY_LABELS)
    locality: Locality | None = None


@dataclass(frozen=True, slots=True)
class ClusterKey:
    host: str
    port: int
    subset: str | None = None

    def __str__(self) -> str:  # Envoy's cluster name
        return f"outbound|{self.port}|{self.subset or ''}|{self.host}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A host of a ServiceEntry with its ports and workloads."""

    host: str
    entry: ServiceEntry
    ports: Mapping[int, Port]
    workloads: tuple[WorkloadSpec, ...]

    def port_for(self, requested: int | None, request_port: int) -> Port | None:
        """The service port a destination means: its own, else the request's, else the only one."""
        if requested is not None:
            return self.ports.get(requested)
        if request_port in self.ports:
            return self.ports[request_port]
        if len(self.ports) == 1:
            return next(iter(self.ports.values()))
        return None


class Cluster:
    """Endpoints of one service port (optionally one subset) and the policy that applies.

    The balancer is built on first use: most clusters of a large registry are never
    called by a given workload, and some balancers (Maglev) are costly to build.
    """

    __slots__ = (
        "_balancer",
        "_caller",
        "_ejected",
        "_stats",
        "endpoints",
        "hash_policy",
        "key",
        "name",
        "policy",
        "port",
        "rule",
        "state",
    )

    def __init__(
        self,
        *,
        key: ClusterKey,
        port: Port,
        endpoints: tuple[Endpoint, ...],
        policy: TrafficPolicy,
        rule: DestinationRule | None,
        caller: Caller,
        state: MeshState,
        mesh_config: MeshConfig,
    ) -> None:
        self.key = key
        self.name = str(key)
        self.port = port
        self.endpoints = endpoints
        self.policy = policy
        lb = policy.load_balancer
        self.hash_policy: ConsistentHash | None = None if lb is None else lb.consistent_hash
        self.rule = rule
        self._caller = caller
        self._stats = state.stats
        self.state: ClusterState = state.cluster(self.name)
        self.state.configure(policy, mesh_config.retry_budget, frozenset(e.key for e in endpoints))
        self._balancer: Balancer | None = None
        self._ejected: frozenset[EndpointKey] | None = None

    def _build(self, *, failover: bool, unhealthy: frozenset[EndpointKey]) -> Balancer:
        return build_balancer(
            self.endpoints,
            self.policy.load_balancer,
            stats=self._stats,
            caller_locality=self._caller.locality,
            caller_labels=self._caller.labels,
            failover=failover,
            unhealthy=unhealthy,
        )

    @property
    def balancer(self) -> Balancer:
        """The balancer with every endpoint in play (what ``explain`` shows)."""
        balancer = self._balancer
        if balancer is None:
            # Two threads may both build it; both results are equivalent, one wins.
            balancer = self._balancer = self._build(
                failover=self.policy.outlier_detection is not None, unhealthy=frozenset()
            )
        return balancer

    def balancer_at(self, now: float) -> Balancer:
        """The balancer for a request at ``now``: without the endpoints outlier detection
        has ejected. Ejections are rare, so the balancer is rebuilt when they change."""
        outlier = self.state.outlier
        if outlier is None:
            return self.balancer
        ejected = outlier.ejected(now)
        if ejected == self._ejected and self._balancer is not None:
            return self._balancer
        detection = self.policy.outlier_detection
        assert detection is not None
        mine = frozenset(e.key for e in self.endpoints) & ejected
        total = len(self.endpoints)
        if total and (total - len(mine)) * 100 < detection.min_health_percent * total:
            mine = frozenset()  # below minHealthPercent outlier detection stands aside
        if total and len(mine) == total:
            # Everything ejected and no panic threshold (Istio's minHealthPercent 0 turns
            # Envoy's panic mode off): no healthy upstream, 503, until an ejection ends.
            balancer = self._balancer = build_balancer(
                (), self.policy.load_balancer, stats=self._stats
            )
        else:
            balancer = self._balancer = self._build(failover=True, unhealthy=mine)
        self._ejected = ejected
        return balancer


T = TypeVar("T")


class _HostIndex(Generic[T]):
    """Exact hosts first, then ``*.suffix`` wildcards, the longest suffix winning."""

    __slots__ = ("exact", "wildcards")

    def __init__(self, items: Iterable[tuple[str, T]]) -> None:
        self.exact: dict[str, T] = {}
        wildcards: list[tuple[str, T]] = []
        for host, value in items:
            if host.startswith("*"):
                wildcards.append((host[1:], value))  # "*.example.com" -> ".example.com"
            else:
                self.exact[host] = value
        wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        self.wildcards = tuple(wildcards)

    def lookup(self) -> Callable[[str], T | None]:
        """``get``, or with no wildcard hosts the exact dict's own ``get`` (no Python call)."""
        return self.get if self.wildcards else self.exact.get

    def get(self, host: str) -> T | None:
        found = self.exact.get(host)
        if found is not None or not self.wildcards:
            return found
        for suffix, value in self.wildcards:
            if host.endswith(suffix):
                return value
        return None


_RESOLVED_CAP: Final = 4096


class Snapshot:
    """One immutable view of the mesh configuration, compiled for one caller."""

    def __init__(
        self,
        *,
        version: int,
        resources: tuple[Resource, ...],
        mesh_config: MeshConfig,
        services: _HostIndex[Service],
        routes: _HostIndex[RouteTable],
        rules: _HostIndex[DestinationRule],
        clusters: dict[tuple[str, int, str | None], Cluster],
    ) -> None:
        self.version = version
        self.resources = resources
        self.mesh_config = mesh_config
        self._services = services
        self._routes = routes
        self._rules = rules
        self.service: Callable[[str], Service | None] = services.lookup()
        self.route_table: Callable[[str], RouteTable | None] = routes.lookup()
        self.rule: Callable[[str], DestinationRule | None] = rules.lookup()
        self._clusters = clusters
        self._resolved: dict[tuple[int, str | None, int], tuple[Destination | None, Cluster]] = {}
        self.endpoint_keys: frozenset[EndpointKey] = frozenset(
            e.key for c in clusters.values() for e in c.endpoints
        )

    # service(host), route_table(host) and rule(host) are the indexes' own lookups, bound
    # in __init__: they run on every request, and a wrapper method would add a call.

    @property
    def clusters(self) -> Sequence[Cluster]:
        return tuple(self._clusters.values())

    def resolve(
        self, destination: Destination | None, host: str, request_port: int
    ) -> Cluster | NoRoute:
        """The cluster a destination (or, with none, the requested host itself) names."""
        # Memoized: every request resolves, and the answer only changes with the snapshot.
        # Keyed by the destination's identity, which is cheaper to hash than its value;
        # the entry holds the destination, so the identity cannot pass to another object.
        # A destination names its host, so the request's counts only without one.
        # Bounded (the request port and host are the caller's to choose): when full, it
        # starts afresh.
        key = (id(destination), host if destination is None else None, request_port)
        resolved = self._resolved
        found = resolved.get(key)
        if found is not None:
            return found[1]
        cluster = self._resolve(destination, host, request_port)
        if isinstance(cluster, Cluster):
            if len(resolved) >= _RESOLVED_CAP:
                resolved.clear()
            resolved[key] = (destination, cluster)
        return cluster

    def _resolve(
        self, destination: Destination | None, host: str, request_port: int
    ) -> Cluster | NoRoute:
        if destination is not None:
            host, subset, port_number = destination.host, destination.subset, destination.port
        else:
            subset, port_number = None, None
        service = self._services.get(host)
        if service is None:
            return NoRoute(status=503, reason=f"no service {host} in the registry")
        port = service.port_for(port_number, request_port)
        if port is None:
            wanted = port_number if port_number is not None else request_port
            return NoRoute(status=503, reason=f"service {host} has no port {wanted}")
        cluster = self._clusters.get((service.host, port.number, subset))
        if cluster is None:
            return NoRoute(
                status=503,
                reason=f"subset {subset!r} of {host} is not defined by a DestinationRule",
            )
        return cluster


def _endpoint(spec: WorkloadSpec, port: Port) -> Endpoint:
    number = spec.ports.get(port.name) or port.target_port or port.number
    return Endpoint(
        address=spec.address,
        port=number,
        weight=spec.weight,
        labels=spec.labels,
        locality=Locality.parse(spec.locality),
        service_account=spec.service_account,
    )


def _workloads(
    entry: ServiceEntry, host: str, entries: Sequence[WorkloadEntry]
) -> tuple[WorkloadSpec, ...]:
    if entry.workload_selector is not None:
        selector = entry.workload_selector
        return tuple(
            w.spec
            for w in entries
            if w.namespace == entry.namespace
            and all(w.spec.labels.get(k) == v for k, v in selector.items())
        )
    if entry.endpoints:
        return entry.endpoints
    if entry.resolution == "DNS" and not host.startswith("*"):
        return (WorkloadSpec(address=host),)  # DNS with no endpoints: the host itself
    return ()


def _problem(origin_source: str, line: int | None, path: str, message: str) -> Problem:
    return Problem(source=origin_source, line=line, path=path, message=message)


def compile_snapshot(
    resources: Sequence[Resource],
    *,
    caller: Caller,
    state: MeshState,
    version: int = 1,
) -> Snapshot:
    """Build the lookup tables; raise ``ConfigError`` for conflicts between resources."""
    problems: list[Problem] = []
    entries: list[ServiceEntry] = []
    workload_entries: list[WorkloadEntry] = []
    virtual_services: list[VirtualService] = []
    rules: list[DestinationRule] = []
    mesh_configs: list[MeshConfig] = []
    seen_names: dict[tuple[str, str, str], str] = {}
    for resource in resources:
        kind = type(resource).__name__
        namespace = getattr(resource, "namespace", "")
        name_key = (kind, namespace, resource.name)
        where = str(resource.origin)
        if name_key in seen_names:
            problems.append(
                _problem(
                    resource.origin.source,
                    resource.origin.line,
                    "metadata.name",
                    f"{kind} {namespace}/{resource.name} is also defined at {seen_names[name_key]}",
                )
            )
            continue
        seen_names[name_key] = where
        match resource:
            case ServiceEntry():
                entries.append(resource)
            case WorkloadEntry():
                workload_entries.append(resource)
            case VirtualService():
                virtual_services.append(resource)
            case DestinationRule():
                rules.append(resource)
            case MeshConfig():
                mesh_configs.append(resource)

    if len(mesh_configs) > 1:
        second = mesh_configs[1]
        problems.append(
            _problem(
                second.origin.source,
                second.origin.line,
                "kind",
                f"only one MeshConfig is allowed; another is at {mesh_configs[0].origin}",
            )
        )
    mesh_config = mesh_configs[0] if mesh_configs else MeshConfig()

    def claim(
        owner_kind: str, items: Iterable[tuple[str, T, Resource, str]]
    ) -> list[tuple[str, T]]:
        owners: dict[str, Resource] = {}
        kept: list[tuple[str, T]] = []
        for host, value, resource, path in items:
            first = owners.get(host)
            if first is not None and first is not resource:
                problems.append(
                    _problem(
                        resource.origin.source,
                        resource.origin.line,
                        path,
                        f"host {host!r} is already claimed by {owner_kind} "
                        f"{first.name} at {first.origin}",
                    )
                )
                continue
            if first is None:
                owners[host] = resource
                kept.append((host, value))
        return kept

    service_items: list[tuple[str, Service, Resource, str]] = []
    for entry in entries:
        ports = MappingProxyType({p.number: p for p in entry.ports})
        for i, host in enumerate(entry.hosts):
            service = Service(
                host=host,
                entry=entry,
                ports=ports,
                workloads=_workloads(entry, host, workload_entries),
            )
            service_items.append((host, service, entry, f"spec.hosts[{i}]"))
    services = claim("ServiceEntry", service_items)

    route_items: list[tuple[str, RouteTable, Resource, str]] = []
    for vs in virtual_services:
        table = RouteTable(
            name=vs.name,
            namespace=vs.namespace,
            origin=str(vs.origin),
            routes=tuple(compile_route(r, caller.labels) for r in vs.http),
        )
        for i, host in enumerate(vs.hosts):
            route_items.append((host, table, vs, f"spec.hosts[{i}]"))
    routes = claim("VirtualService", route_items)

    rule_items = [(r.host, r, r, "spec.host") for r in rules]
    rule_index = _HostIndex(claim("DestinationRule", rule_items))

    if problems:
        raise ConfigError(problems)

    clusters: dict[tuple[str, int, str | None], Cluster] = {}
    for host, service in services:
        rule = rule_index.get(host)
        base_policy = TrafficPolicy()
        if rule is not None and rule.traffic_policy is not None:
            base_policy = rule.traffic_policy
        by_port: dict[int, list[Endpoint]] = defaultdict(list)
        for port in service.ports.values():
            endpoints = tuple(_endpoint(w, port) for w in service.workloads)
            by_port[port.number] = list(endpoints)
            clusters[(host, port.number, None)] = Cluster(
                key=ClusterKey(host, port.number),
                port=port,
                endpoints=endpoints,
                policy=base_policy,
                rule=rule,
                caller=caller,
                state=state,
                mesh_config=mesh_config,
            )
            if rule is None:
                continue
            for subset in rule.subsets:
                members = tuple(
                    e
                    for e in endpoints
                    if all(e.labels.get(k) == v for k, v in subset.labels.items())
                )
                clusters[(host, port.number, subset.name)] = Cluster(
                    key=ClusterKey(host, port.number, subset.name),
                    port=port,
                    endpoints=members,
                    policy=base_policy.overridden_by(subset.traffic_policy),
                    rule=rule,
                    caller=caller,
                    state=state,
                    mesh_config=mesh_config,
                )

    return Snapshot(
        version=version,
        resources=tuple(resources),
        mesh_config=mesh_config,
        services=_HostIndex(services),
        routes=_HostIndex(routes),
        rules=rule_index,
        clusters=clusters,
    )
