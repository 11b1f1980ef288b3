"""inmesh: a service mesh inside the Python process.

Istio's traffic configuration (ServiceEntry, VirtualService, DestinationRule, ...)
applied inside the httpx clients (and, later, grpcio channels) a service already uses:
no sidecar, no extra hop, no Kubernetes.

    mesh = inmesh.Mesh("mesh.d/", workload="productpage")
    with mesh.client() as http:
        http.get("http://reviews:9080/reviews/0", headers={"end-user": "jason"})

Only the names in ``__all__`` are public. Importing this package is cheap: httpx, the
YAML loader and the file watcher load when a Mesh first needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inmesh.exceptions import (
    ConfigError,
    MeshError,
    MissingExtraError,
    Problem,
    RegistryError,
    UpstreamError,
)
from inmesh.mesh import Mesh, MeshStatus

if TYPE_CHECKING:
    from inmesh.registry import FileRegistry, MemoryRegistry, Registry
    from inmesh.resilience.breaker import Breaker, CircuitOpenError
    from inmesh.transports.grpc import MeshChannel
    from inmesh.transports.grpc_aio import MeshAioChannel
    from inmesh.transports.http import AsyncMeshTransport, MeshTransport, RouteInfo

__version__ = "0.1.0"

__all__ = [
    "AsyncMeshTransport",
    "Breaker",
    "CircuitOpenError",
    "ConfigError",
    "FileRegistry",
    "MemoryRegistry",
    "Mesh",
    "MeshAioChannel",
    "MeshChannel",
    "MeshError",
    "MeshStatus",
    "MeshTransport",
    "MissingExtraError",
    "Problem",
    "Registry",
    "RegistryError",
    "RouteInfo",
    "UpstreamError",
    "__version__",
]

_LAZY = {
    "Breaker": "inmesh.resilience.breaker",
    "MeshAioChannel": "inmesh.transports.grpc_aio",
    "MeshChannel": "inmesh.transports.grpc",
    "CircuitOpenError": "inmesh.resilience.breaker",
    "FileRegistry": "inmesh.registry",
    "MemoryRegistry": "inmesh.registry",
    "Registry": "inmesh.registry",
    "AsyncMeshTransport": "inmesh.transports.http",
    "MeshTransport": "inmesh.transports.http",
    "RouteInfo": "inmesh.transports.http",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'inmesh' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
