"""The httpx transports: the mesh as an ``httpx.BaseTransport`` and ``AsyncBaseTransport``.

Every decision comes from the core (``plan`` and the cluster's balancer) through
``_Exchange``, which both transports share; the two classes differ only in how they send
and close. Each upstream endpoint gets its own httpcore connection pool, so a slow
endpoint cannot take the connections another needs; pools of endpoints that left the
registry are closed once their last response is.

The request is not copied: we build the httpcore request for the chosen endpoint
directly from the caller's ``httpx.Request`` (URL parts, raw headers, the body stream), as
httpx's own ``HTTPTransport`` does, so the per-request cost stays a few microseconds.
The upstream sees the logical ``Host``; the caller's response keeps the logical URL.
"""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import httpcore
import httpx

from inmesh.balancing import EndpointStats, PickContext
from inmesh.endpoints import Endpoint, EndpointKey
from inmesh.exceptions import UpstreamError
from inmesh.plan import LocalReply, Passthrough, Upstream, plan
from inmesh.routing import apply_header_ops

if TYPE_CHECKING:
    from inmesh.mesh import Mesh
    from inmesh.snapshot import Snapshot

__all__ = ["AsyncMeshTransport", "MeshTransport", "RouteInfo"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class RouteInfo(NamedTuple):
    """Where the mesh sent a request: ``response.extensions["inmesh"]``.

    ``virtual_service`` and ``route`` (the rule's field path, e.g. ``spec.http[1]``) are
    None when the host has no VirtualService.
    """

    host: str
    cluster: str
    endpoint: Endpoint
    virtual_service: str | None
    route: str | None
    snapshot: int


class _View:
    """``RequestView`` over an ``httpx.Request``, computing each attribute once, on demand."""

    __slots__ = ("_request", "host", "method", "path", "port", "query", "scheme")

    def __init__(self, request: httpx.Request) -> None:
        url = request.url
        self._request = request
        self.method = request.method
        self.scheme = url.scheme
        self.host = url.host
        self.port = url.port or _DEFAULT_PORTS.get(self.scheme, 80)
        raw = url.raw_path.decode("latin-1")
        path, _, query = raw.partition("?")
        self.path = path
        self.query = query

    @property
    def authority(self) -> str:
        return self._request.headers.get("host") or f"{self.host}:{self.port}"

    def header(self, name: str) -> str | None:
        value: str | None = self._request.headers.get(name)
        return value


_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    # Most specific first: the first isinstance hit wins.
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def _translate(exc: Exception, request: httpx.Request, where: str) -> Exception | None:
    """httpcore's error as httpx's with the mesh's reason chained; None if not httpcore's."""
    for source, target in _EXCEPTIONS:
        if isinstance(exc, source):
            reason = UpstreamError(f"{where}: {exc or type(exc).__name__}")
            reason.__cause__ = exc
            error = target(f"{exc or type(exc).__name__} ({where})", request=request)
            error.__cause__ = reason
            return error
    return None


def _local_response(reply: LocalReply) -> httpx.Response:
    headers = [("content-type", "text/plain; charset=utf-8")]
    if reply.location is not None:
        headers.append(("location", reply.location))
    return httpx.Response(reply.status, headers=headers, content=f"{reply.reason}\n".encode())


class _Pool:
    """One endpoint's connection pool, and how many of its responses are still open."""

    __slots__ = ("active", "pool", "retired")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.active = 0
        self.retired = False


PoolKey = tuple[str, str, int]  # (scheme, address, port)


class _Exchange:
    """The decisions of one request, shared by both transports; no I/O of its own."""

    __slots__ = ("core_request", "info", "key", "plan", "stats")

    def __init__(
        self,
        request: httpx.Request,
        upstream: Upstream,
        endpoint: Endpoint,
        stats: EndpointStats,
        snapshot: Snapshot,
    ) -> None:
        url = request.url
        scheme = url.scheme
        cluster = upstream.cluster
        self.plan = upstream
        self.stats = stats
        self.key: PoolKey = (scheme, endpoint.address, endpoint.port)
        headers = request.headers.raw
        if upstream.request_ops or upstream.authority is not None:
            headers = list(headers)
            if upstream.authority is not None:
                headers = [(k, v) for k, v in headers if k.lower() != b"host"]
                headers.insert(0, (b"Host", upstream.authority.encode()))
            for ops in upstream.request_ops:
                headers = apply_header_ops(headers, ops)
        extensions: dict[str, Any] = request.extensions
        if scheme == "https":
            # Verify the upstream's certificate against the logical host, not the address.
            extensions = {**extensions, "sni_hostname": upstream.authority or url.host}
        target = url.raw_path if upstream.path is None else upstream.path.encode()
        self.core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme,
                host=endpoint.address.encode(),
                port=endpoint.port,
                target=target,
            ),
            headers=headers,
            content=request.stream,
            extensions=extensions,
        )
        forward, table = upstream.forward, upstream.table
        self.info = RouteInfo(
            url.host,
            cluster.name,
            endpoint,
            None if table is None else table.name,
            None if forward is None else forward.route.spec.path,
            snapshot.version,
        )

    def where(self) -> str:
        return f"{self.info.host} via {self.info.cluster} at {self.info.endpoint}"

    def response(self, status: int, headers: Any, stream: Any, extensions: Any) -> httpx.Response:
        if self.plan.response_ops:
            headers = list(headers)
            for ops in self.plan.response_ops:
                headers = apply_header_ops(headers, ops)
        extensions["inmesh"] = self.info  # httpcore's dict, made for this response alone
        return httpx.Response(status, headers=headers, stream=stream, extensions=extensions)


class _PoolSet:
    """Per-endpoint pools with retirement; the bookkeeping runs under a lock, I/O after it."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._pools: dict[PoolKey, _Pool] = {}
        self._lock = threading.Lock()
        self.version = -1

    def acquire(self, key: PoolKey) -> _Pool:
        with self._lock:
            entry = self._pools.get(key)
            if entry is None or entry.retired:
                entry = self._pools[key] = _Pool(self._factory())
            entry.active += 1
            return entry

    def release(self, entry: _Pool) -> bool:
        """Count a response closed; True if the pool is now retired and idle (close it)."""
        with self._lock:
            entry.active -= 1
            return entry.retired and entry.active == 0

    def retire(self, keep: frozenset[EndpointKey], version: int) -> list[Any]:
        """Retire pools of departed endpoints; return those idle now, to be closed."""
        with self._lock:
            if version <= self.version:
                return []
            self.version = version
            idle = []
            for key, entry in list(self._pools.items()):
                if (key[1], key[2]) not in keep:
                    del self._pools[key]
                    entry.retired = True
                    if entry.active == 0:
                        idle.append(entry.pool)
            return idle

    def drain(self) -> list[Any]:
        with self._lock:
            pools = [e.pool for e in self._pools.values()]
            for entry in self._pools.values():
                entry.retired = True
            self._pools.clear()
            return pools


class _TransportBase:
    def __init__(
        self,
        mesh: Mesh,
        *,
        verify: Any = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        proxy: Any = None,
        local_address: str | None = None,
        seed: int | None = None,
    ) -> None:
        self._mesh = mesh
        self._tls = (verify, cert, trust_env)
        self._ssl_context: Any = None
        self._limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._http = (http1, http2)
        self._local_address = local_address
        self._proxy = proxy
        self._rng = random.Random(seed)
        self._pick = PickContext(rng=self._rng)  # the context of every pick without a hash key
        self._source = mesh.source_id

    def _pool_options(self) -> dict[str, Any]:
        if self._ssl_context is None:
            verify, cert, trust_env = self._tls
            if isinstance(verify, bool | str):
                self._ssl_context = httpx.create_ssl_context(
                    verify=verify, cert=cert, trust_env=trust_env
                )
            else:
                self._ssl_context = verify
        limits = self._limits
        return {
            "ssl_context": self._ssl_context,
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry,
            "http1": self._http[0],
            "http2": self._http[1],
            "local_address": self._local_address,
        }

    def _passthrough_options(self) -> dict[str, Any]:
        verify, cert, trust_env = self._tls
        return {
            "verify": verify,
            "cert": cert,
            "trust_env": trust_env,
            "http1": self._http[0],
            "http2": self._http[1],
            "limits": self._limits,
            "proxy": self._proxy,
            "local_address": self._local_address,
        }

    def _decide(
        self, request: httpx.Request
    ) -> tuple[Snapshot, Upstream | LocalReply | Passthrough, Endpoint | None]:
        snapshot = self._mesh.snapshot
        decision = plan(snapshot, _View(request), self._rng, source=self._source)
        if not isinstance(decision, Upstream):
            return snapshot, decision, None
        context = self._pick
        if decision.hash_key is not None:
            context = PickContext(rng=self._rng, hash_key=decision.hash_key)
        endpoint = decision.cluster.balancer.pick(context)
        if endpoint is None:
            reply = LocalReply(503, f"no healthy upstream in {decision.cluster.name}")
            return snapshot, reply, None
        return snapshot, decision, endpoint


class MeshTransport(_TransportBase, httpx.BaseTransport):
    """An ``httpx.BaseTransport`` that routes and balances by the mesh configuration."""

    def __init__(self, mesh: Mesh, **options: Any) -> None:
        super().__init__(mesh, **options)
        self._pools = _PoolSet(lambda: httpcore.ConnectionPool(**self._pool_options()))
        self._passthrough: httpx.HTTPTransport | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        snapshot, decision, endpoint = self._decide(request)
        if snapshot.version != self._pools.version:
            for pool in self._pools.retire(snapshot.endpoint_keys, snapshot.version):
                pool.close()
        if isinstance(decision, LocalReply):
            return _local_response(decision)
        if isinstance(decision, Passthrough):
            if self._passthrough is None:
                self._passthrough = httpx.HTTPTransport(**self._passthrough_options())
            return self._passthrough.handle_request(request)
        assert endpoint is not None
        exchange = _Exchange(
            request, decision, endpoint, self._mesh.stats.get(endpoint.key), snapshot
        )
        entry = self._pools.acquire(exchange.key)
        exchange.stats.begin()
        try:
            response = entry.pool.handle_request(exchange.core_request)
        except Exception as exc:
            self._finish(exchange, entry)
            error = _translate(exc, request, exchange.where())
            if error is None:
                raise
            raise error from error.__cause__
        stream = _Stream(response.stream, self, exchange, entry, request)
        return exchange.response(response.status, response.headers, stream, response.extensions)

    def _finish(self, exchange: _Exchange, entry: _Pool) -> None:
        exchange.stats.end()
        if self._pools.release(entry):
            entry.pool.close()

    def close(self) -> None:
        for pool in self._pools.drain():
            pool.close()
        if self._passthrough is not None:
            self._passthrough.close()


class _Stream(httpx.SyncByteStream):
    __slots__ = ("_closed", "_entry", "_exchange", "_request", "_stream", "_transport")

    def __init__(
        self,
        stream: Any,
        transport: MeshTransport,
        exchange: _Exchange,
        entry: _Pool,
        request: httpx.Request,
    ) -> None:
        self._stream = stream
        self._transport = transport
        self._exchange = exchange
        self._entry = entry
        self._request = request
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except Exception as exc:
            error = _translate(exc, self._request, self._exchange.where())
            if error is None:
                raise
            raise error from error.__cause__

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stream.close()
        finally:
            self._transport._finish(self._exchange, self._entry)


class AsyncMeshTransport(_TransportBase, httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that routes and balances by the mesh configuration."""

    def __init__(self, mesh: Mesh, **options: Any) -> None:
        super().__init__(mesh, **options)
        self._pools = _PoolSet(lambda: httpcore.AsyncConnectionPool(**self._pool_options()))
        self._passthrough: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        snapshot, decision, endpoint = self._decide(request)
        if snapshot.version != self._pools.version:
            for pool in self._pools.retire(snapshot.endpoint_keys, snapshot.version):
                await pool.aclose()
        if isinstance(decision, LocalReply):
            return _local_response(decision)
        if isinstance(decision, Passthrough):
            if self._passthrough is None:
                self._passthrough = httpx.AsyncHTTPTransport(**self._passthrough_options())
            return await self._passthrough.handle_async_request(request)
        assert endpoint is not None
        exchange = _Exchange(
            request, decision, endpoint, self._mesh.stats.get(endpoint.key), snapshot
        )
        entry = self._pools.acquire(exchange.key)
        exchange.stats.begin()
        try:
            response = await entry.pool.handle_async_request(exchange.core_request)
        except Exception as exc:
            await self._finish(exchange, entry)
            error = _translate(exc, request, exchange.where())
            if error is None:
                raise
            raise error from error.__cause__
        stream = _AsyncStream(response.stream, self, exchange, entry, request)
        return exchange.response(response.status, response.headers, stream, response.extensions)

    async def _finish(self, exchange: _Exchange, entry: _Pool) -> None:
        exchange.stats.end()
        if self._pools.release(entry):
            await entry.pool.aclose()

    async def aclose(self) -> None:
        for pool in self._pools.drain():
            await pool.aclose()
        if self._passthrough is not None:
            await self._passthrough.aclose()


class _AsyncStream(httpx.AsyncByteStream):
    __slots__ = ("_closed", "_entry", "_exchange", "_request", "_stream", "_transport")

    def __init__(
        self,
        stream: Any,
        transport: AsyncMeshTransport,
        exchange: _Exchange,
        entry: _Pool,
        request: httpx.Request,
    ) -> None:
        self._stream = stream
        self._transport = transport
        self._exchange = exchange
        self._entry = entry
        self._request = request
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as exc:
            error = _translate(exc, self._request, self._exchange.where())
            if error is None:
                raise
            raise error from error.__cause__

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.aclose()
        finally:
            await self._transport._finish(self._exchange, self._entry)
