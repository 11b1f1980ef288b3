"""``Mesh``: one registry, the current snapshot, and the state that outlives snapshots.

The registry delivers documents; ``parse_documents`` validates them and
``compile_snapshot`` turns them into lookup tables for this workload. A valid update
replaces the snapshot by one reference swap (requests in flight keep theirs); an invalid
one is rejected whole, logged, reported in ``status``, and the last good snapshot stays.
Per-endpoint and per-cluster state (active requests, ejections, budgets, pool limits)
lives in ``state``, keyed by endpoint and cluster, so a config push resets nothing it
need not.

``import inmesh`` must stay cheap (the pytest plugin imports it), so httpx, the YAML
loader and the file watcher are imported when a Mesh first needs them.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inmesh.endpoints import Locality
from inmesh.exceptions import ConfigError, MissingExtraError, Problem, RegistryError

if TYPE_CHECKING:
    import httpx

    from inmesh.balancing import StatsTable
    from inmesh.registry import Registry
    from inmesh.resilience.breaker import Breaker
    from inmesh.snapshot import Caller, Snapshot
    from inmesh.state import MeshState
    from inmesh.transports.grpc import MeshChannel
    from inmesh.transports.grpc_aio import MeshAioChannel
    from inmesh.transports.http import AsyncMeshTransport, MeshTransport

__all__ = ["Mesh", "MeshStatus"]

log = logging.getLogger("inmesh")

# httpx.Client arguments that configure the transport: the mesh's transport takes them
# (a Client given `transport=` would silently ignore them).
_TRANSPORT_OPTIONS = frozenset(
    {"verify", "cert", "http1", "http2", "limits", "proxy", "local_address"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshStatus:
    """How the last configuration update went.

    ``version`` is the snapshot in force; ``ok`` is False when the latest update was
    rejected, and then ``problems`` (or ``error``) say why while the old version serves.
    """

    version: int
    ok: bool
    source: str
    updated_at: float
    problems: tuple[Problem, ...] = ()
    error: str | None = None
    rejected: int = field(default=0)  # updates rejected since the last good one


class Mesh:
    """A service mesh inside this process, configured from ``source``.

    ``source`` is a YAML/JSON file, a folder of them (watched for changes), or a
    ``Registry`` (``MemoryRegistry`` for tests and embedding). ``workload``, ``labels``
    and ``locality`` describe the calling workload: ``sourceLabels`` routes and
    locality-aware balancing look at them. With a workload and no labels, the labels are
    ``{"app": workload}``, as in Istio's examples.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Registry,
        *,
        workload: str | None = None,
        labels: Mapping[str, str] | None = None,
        locality: str | None = None,
        namespace: str = "default",
        seed: int | None = None,
        watch: bool = True,
    ) -> None:
        from inmesh.registry import open_registry
        from inmesh.snapshot import Caller
        from inmesh.state import MeshState

        if labels is None:
            labels = {"app": workload} if workload else {}
        self.workload = workload
        self.source_id = workload or socket.gethostname()
        self.state: MeshState = MeshState()
        self._caller: Caller = Caller(
            workload=workload,
            namespace=namespace,
            labels=dict(labels),
            locality=Locality.parse(locality) if locality else None,
        )
        self._seed = seed
        self._seeds = random.Random(seed)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[MeshStatus], None]] = []
        self._transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self._breakers: dict[str, tuple[Breaker, dict[str, Any]]] = {}
        self._closed = False
        self._registry = open_registry(source)
        # A registry the caller handed us may serve other Meshes: we only stop listening.
        self._owns_registry = self._registry is not source
        self._ready = False
        self._missed = False
        try:
            if watch:
                # Watch before the first read, so a save in between is not missed (a change
                # seen before the first snapshot exists is covered by that read).
                self._registry.watch(self._on_change)
            self._snapshot: Snapshot = self._load(version=1)
        except BaseException:
            self._release_registry()
            raise
        self._status = MeshStatus(
            version=1, ok=True, source=self._registry.name, updated_at=time.time()
        )
        self._ready = True
        if self._missed:  # a change landed while the first read was under way
            self._update()

    # ------------------------------------------------------------------ configuration

    @property
    def snapshot(self) -> Snapshot:
        """The configuration in force (an immutable value; hold it for a consistent view)."""
        return self._snapshot

    @property
    def stats(self) -> StatsTable:
        """Per-endpoint load figures (requests in flight), shared by all this Mesh's clients."""
        return self.state.stats

    @property
    def status(self) -> MeshStatus:
        return self._status

    @property
    def registry(self) -> Registry:
        return self._registry

    def on_update(self, listener: Callable[[MeshStatus], None]) -> None:
        """Call ``listener(status)`` after every update, accepted or rejected."""
        self._listeners.append(listener)

    def reload(self) -> MeshStatus:
        """Read the registry now (watching does this by itself) and return the outcome."""
        return self._update()

    def _load(self, *, version: int) -> Snapshot:
        from inmesh.config.parse import parse_documents
        from inmesh.snapshot import compile_snapshot

        resources = parse_documents(self._registry.read())
        return compile_snapshot(resources, caller=self._caller, state=self.state, version=version)

    def _on_change(self) -> None:
        if not self._ready:
            self._missed = True
        elif not self._closed:
            self._update()

    def _update(self) -> MeshStatus:
        with self._lock:
            current = self._snapshot
            try:
                snapshot = self._load(version=current.version + 1)
            except (ConfigError, RegistryError) as exc:
                problems = exc.problems if isinstance(exc, ConfigError) else ()
                status = MeshStatus(
                    version=current.version,
                    ok=False,
                    source=self._registry.name,
                    updated_at=time.time(),
                    problems=problems,
                    error=str(exc),
                    rejected=self._status.rejected + 1,
                )
                log.error(
                    "configuration update from %s rejected; version %d stays in force:\n%s",
                    self._registry.name,
                    current.version,
                    exc,
                )
            else:
                self._snapshot = snapshot
                self.state.retain({c.name for c in snapshot.clusters}, snapshot.endpoint_keys)
                status = MeshStatus(
                    version=snapshot.version,
                    ok=True,
                    source=self._registry.name,
                    updated_at=time.time(),
                )
                log.info(
                    "configuration version %d from %s in force",
                    snapshot.version,
                    self._registry.name,
                )
            self._status = status
        for listener in list(self._listeners):
            try:
                listener(status)
            except Exception:
                log.exception("mesh update listener %r failed", listener)
        return status

    # ------------------------------------------------------------------ clients

    def _next_seed(self) -> int | None:
        # Each transport draws from its own generator, seeded from the Mesh's seed, so a
        # seeded Mesh makes the same choices run after run.
        return None if self._seed is None else self._seeds.randrange(2**63)

    def transport(self, **options: Any) -> MeshTransport:
        """An ``httpx.BaseTransport`` for a client you build yourself."""
        from inmesh.transports.http import MeshTransport

        transport = MeshTransport(self, seed=self._next_seed(), **options)
        self._transports.add(transport)
        return transport

    def async_transport(self, **options: Any) -> AsyncMeshTransport:
        """An ``httpx.AsyncBaseTransport`` for a client you build yourself."""
        from inmesh.transports.http import AsyncMeshTransport

        transport = AsyncMeshTransport(self, seed=self._next_seed(), **options)
        self._transports.add(transport)
        return transport

    def client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` whose transport is the mesh; ``kwargs`` go to httpx."""
        import httpx

        transport_options, client_options = _split_options(kwargs)
        return httpx.Client(transport=self.transport(**transport_options), **client_options)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose transport is the mesh; ``kwargs`` go to httpx."""
        import httpx

        transport_options, client_options = _split_options(kwargs)
        return httpx.AsyncClient(
            transport=self.async_transport(**transport_options), **client_options
        )

    # ------------------------------------------------------------------ gRPC

    def grpc_channel(
        self, target: str, *, options: Sequence[tuple[str, Any]] = (), credentials: Any = None
    ) -> MeshChannel:
        """A ``grpc.Channel`` to the logical ``target`` (``"ratings:9090"``) routed, balanced
        and retried by the mesh; generated stubs work unchanged. ``options`` and
        ``credentials`` go to the per-endpoint channels (insecure without credentials)."""
        _require_grpc()
        from inmesh.transports.grpc import MeshChannel

        channel = MeshChannel(
            self, target, options=options, credentials=credentials, seed=self._next_seed()
        )
        self._transports.add(channel)
        return channel

    def grpc_aio_channel(
        self, target: str, *, options: Sequence[tuple[str, Any]] = (), credentials: Any = None
    ) -> MeshAioChannel:
        """The ``grpc.aio.Channel`` counterpart of ``grpc_channel``."""
        _require_grpc()
        from inmesh.transports.grpc_aio import MeshAioChannel

        channel = MeshAioChannel(
            self, target, options=options, credentials=credentials, seed=self._next_seed()
        )
        self._transports.add(channel)
        return channel

    # ------------------------------------------------------------------ breakers

    def breaker(self, name: str, **options: Any) -> Breaker:
        """The circuit breaker ``name`` of this Mesh, for any call: a decorator (sync or
        async), a context manager, or ``call()``; pybreaker's state machine, listeners and
        storage, without its limits (see ``inmesh.resilience.breaker``). The first call
        with a name creates it with ``options``; later calls return the same breaker and
        refuse different options."""
        from inmesh.resilience.breaker import Breaker

        with self._lock:
            found = self._breakers.get(name)
            if found is None:
                found = self._breakers[name] = (Breaker(name, **options), options)
        breaker, made_with = found
        if options and options != made_with:
            raise ValueError(f"breaker {name!r} already exists with other options ({made_with!r})")
        return breaker

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop watching the registry and close this Mesh's sync transports and channels.

        Async transports and channels are closed by their owners (``await client.aclose()``,
        ``await channel.close()``) or by ``await mesh.aclose()``.
        """
        if self._closed:
            return
        self._closed = True
        self._release_registry()
        for transport in list(self._transports):
            close = getattr(transport, "close", None)
            if close is not None and not inspect.iscoroutinefunction(close):
                close()

    def _release_registry(self) -> None:
        if self._owns_registry:
            self._registry.close()
        else:
            self._registry.unwatch(self._on_change)

    async def aclose(self) -> None:
        """``close()``, and the async transports and channels too."""
        self.close()
        for transport in list(self._transports):
            aclose = getattr(transport, "aclose", None)
            if aclose is None and inspect.iscoroutinefunction(getattr(transport, "close", None)):
                aclose = transport.close
            if aclose is not None:
                await aclose()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        version = self._snapshot.version
        return f"<Mesh {self._registry.name} workload={self.workload!r} version={version}>"


def _require_grpc() -> None:
    try:
        import grpc  # type: ignore[import-untyped]  # noqa: F401 - grpcio ships no types
    except ImportError as exc:
        raise MissingExtraError("gRPC channels", "grpc", "grpcio") from exc


def _split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    transport = {k: v for k, v in kwargs.items() if k in _TRANSPORT_OPTIONS}
    client = {k: v for k, v in kwargs.items() if k not in _TRANSPORT_OPTIONS}
    if "trust_env" in client:
        # The Client keeps it too (netrc); httpx mounts no environment proxies when it is
        # given a transport, so mesh traffic is never sent through HTTP_PROXY.
        transport["trust_env"] = client["trust_env"]
    return transport, client
