"""State that outlives snapshots: per endpoint and per cluster, carried over config pushes.

A ``Mesh`` holds one ``MeshState``. Each compiled ``Cluster`` is bound to the
``ClusterState`` of its name (``outbound|9080|v1|reviews``), which keeps the outlier
detector, the retry budgets, the retry limit and the per-endpoint connection-pool limits.
A config push re-configures them in place: counters, ejections and budgets go on.
"""

from __future__ import annotations

import threading

from inmesh.balancing import StatsTable
from inmesh.config.model import RatioRetryBudget, TrafficPolicy
from inmesh.endpoints import EndpointKey
from inmesh.resilience.budget import ConcurrencyBudget, RatioBudget
from inmesh.resilience.limits import EndpointLimits, RetryLimit
from inmesh.resilience.outlier import OutlierDetector

__all__ = ["ClusterState", "MeshState"]


class ClusterState:
    """Failure-management state of one cluster. Parts a policy does not ask for are None,
    so the request path pays nothing for them."""

    __slots__ = ("_limits", "_lock", "_pool", "budget", "name", "outlier", "ratio", "retry_limit")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.outlier: OutlierDetector | None = None
        self.budget: ConcurrencyBudget | None = None
        self.ratio: RatioBudget | None = None
        self.retry_limit: RetryLimit | None = None
        self._pool = None  # the ConnectionPoolSettings the limits were made for
        self._limits: dict[EndpointKey, EndpointLimits] = {}

    def configure(
        self,
        policy: TrafficPolicy,
        mesh_budget: RatioRetryBudget | None,
        endpoints: frozenset[EndpointKey],
    ) -> None:
        """Adopt a new policy and endpoint set, keeping what they still ask for (and its
        state: counters, ejections, budgets)."""
        with self._lock:
            detection = policy.outlier_detection
            if detection is None:
                self.outlier = None
            elif self.outlier is None:
                self.outlier = OutlierDetector(detection)
            else:
                self.outlier.update(detection)
                # Departed endpoints no longer count against maxEjectionPercent.
                self.outlier.retain(endpoints)

            retry_budget = policy.retry_budget
            if retry_budget is None:
                self.budget = None
            elif self.budget is None or self.budget.settings != retry_budget:
                self.budget = ConcurrencyBudget(retry_budget)

            if mesh_budget is None:
                self.ratio = None
            elif self.ratio is None or self.ratio.settings != mesh_budget:
                self.ratio = RatioBudget(mesh_budget)

            pool = policy.connection_pool
            max_retries = None if pool is None else pool.http.max_retries
            if max_retries is None:
                self.retry_limit = None
            elif self.retry_limit is None:
                self.retry_limit = RetryLimit(max_retries)
            else:
                self.retry_limit.update(max_retries)

            if pool != self._pool:
                self._pool = pool  # type: ignore[assignment]
                if pool is None:
                    self._limits = {}
                else:
                    for limits in self._limits.values():
                        limits.update(pool)
            for key in [
                k for k, v in self._limits.items() if k not in endpoints and not v.in_flight
            ]:
                del self._limits[key]  # departed endpoints with nothing in flight

    def limits(self, key: EndpointKey) -> EndpointLimits | None:
        """The admission limits of one endpoint, or None when the cluster sets none."""
        pool = self._pool
        if pool is None:
            return None
        limits = self._limits.get(key)
        if limits is None:
            with self._lock:
                limits = self._limits.get(key)
                if limits is None:
                    limits = self._limits[key] = EndpointLimits(pool)
        return limits


class MeshState:
    """Everything of a Mesh that must survive a snapshot swap."""

    def __init__(self) -> None:
        self.stats = StatsTable()
        self._clusters: dict[str, ClusterState] = {}
        self._lock = threading.Lock()
        self.mirrors_sent = 0
        self.mirrors_dropped = 0

    def cluster(self, name: str) -> ClusterState:
        state = self._clusters.get(name)
        if state is None:
            with self._lock:
                state = self._clusters.setdefault(name, ClusterState(name))
        return state

    def retain(self, names: set[str], endpoints: frozenset[EndpointKey]) -> None:
        """Forget clusters and endpoints the configuration no longer has."""
        with self._lock:
            for name in [n for n in self._clusters if n not in names]:
                del self._clusters[name]
        self.stats.retain(endpoints)
