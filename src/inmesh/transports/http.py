"""The httpx transports: the mesh as an ``httpx.BaseTransport`` and ``AsyncBaseTransport``.

Every decision comes from the core: ``plan`` routes, ``attempt_flow`` decides faults,
deadlines, endpoints, retries and budgets. The two transports only drive that flow —
send an attempt, wait, close a discarded response — and differ only in how they wait and
send, line for line. Each upstream endpoint gets its own httpcore connection pool, so a slow
endpoint cannot take the connections another needs; pools of endpoints that left the
registry are closed once their last response is.

The request is not copied: we build the httpcore request for the chosen endpoint
directly from the caller's ``httpx.Request`` (URL parts, raw headers, the body stream), as
httpx's own ``HTTPTransport`` does, so the per-request cost stays a few microseconds.
The upstream sees the logical ``Host``; the caller's response keeps the logical URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import httpcore
import httpx

from inmesh._namedtuples import build as _tuple
from inmesh.balancing import EndpointStats, PickContext
from inmesh.config.model import ConnectionPoolSettings
from inmesh.endpoints import Endpoint, EndpointKey
from inmesh.exceptions import UpstreamError
from inmesh.flow import TIMEOUT_BODY, Attempted, Finish, Send, Wait, attempt_flow, fault_abort
from inmesh.plan import LocalReply, Plan, Upstream, plan
from inmesh.resilience.retry import Failure, Outcome
from inmesh.routing import apply_header_ops
from inmesh.testing.faults import OVERLAY, CallRecord
from inmesh.transports._resources import EndpointResources, Entry, MirrorGate
from inmesh.transports._watchdog import Timer, watchdog

if TYPE_CHECKING:
    from inmesh.mesh import Mesh
    from inmesh.snapshot import Snapshot

__all__ = ["AsyncMeshTransport", "MeshTransport", "RouteInfo"]

log = logging.getLogger("inmesh.transport")

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
    attempts: int


UrlParts = tuple[str, str, int | None, str, str, bytes]


def _public_url_parts(url: httpx.URL) -> UrlParts:
    """(scheme, host, port, path, query, raw path with query) through httpx's properties."""
    raw_path = url.raw_path
    path, _, query = raw_path.decode("ascii").partition("?")
    return url.scheme, url.host, url.port, path, query, raw_path


def _parsed_url_parts(url: httpx.URL) -> UrlParts:
    """The same parts from the parse result behind those properties: a tenth of the cost
    (each property is a Python call, and the raw path is built and then split again).
    ``_url_parts`` is this only while it agrees with the properties (checked at import)."""
    parsed = url._uri_reference
    host = parsed.host
    if host.startswith("xn--"):  # an IDNA name: httpx's property decodes it
        host = url.host
    path = parsed.path or "/"
    query = parsed.query
    raw_path = (path if query is None else f"{path}?{query}").encode("ascii")
    return parsed.scheme, host, parsed.port, path, query or "", raw_path


def _same_url_parts() -> bool:
    samples = (
        "http://reviews:9080/reviews/0?a=1&b=%20",
        "https://Example.COM",
        "http://[::1]:8080/x?",
        "http://xn--fiqs8s.icom.museum/p",
        "http://h/a%2Fb;c",
    )
    try:
        return all(
            _parsed_url_parts(httpx.URL(u)) == _public_url_parts(httpx.URL(u)) for u in samples
        )
    except Exception:  # httpx's internals changed shape: keep its properties
        return False


_url_parts = _parsed_url_parts if _same_url_parts() else _public_url_parts


class _View:
    """``RequestView`` over an ``httpx.Request``, computing each attribute once, on demand."""

    __slots__ = ("_request", "host", "method", "path", "port", "query", "raw_path", "scheme")

    def __init__(self, request: httpx.Request) -> None:
        self._request = request
        method = request.method
        # httpx keeps a method given as bytes as bytes: routing matches it as text.
        self.method = method if isinstance(method, str) else method.decode("ascii")
        self.scheme, self.host, port, self.path, self.query, self.raw_path = _url_parts(request.url)
        self.port = port or _DEFAULT_PORTS.get(self.scheme, 80)

    @property
    def authority(self) -> str:
        return self._request.headers.get("host") or f"{self.host}:{self.port}"

    def header(self, name: str) -> str | None:
        # Most lookups (route matches, x-envoy-* probes) miss. A miss is one scan of the
        # headers' (name, lower-case name, value) list, comparing bytes: httpx's own ``in``
        # builds a list of names first, ``get`` raises and catches a KeyError, and
        # ``get_list`` decodes (each several times the cost). A hit is httpx's own.
        headers = self._request.headers
        if _HEADER_ENTRIES and name.isascii():  # header names are tokens: ASCII
            key = name.lower().encode()
            for entry in headers._list:
                if entry[1] == key:
                    return ", ".join(headers.get_list(name))
            return None
        if name not in headers:
            return None
        return ", ".join(headers.get_list(name))


def _header_entries() -> bool:
    """Whether ``httpx.Headers`` keeps its (name, lower-case name, value) list as ``_list``
    (it has since httpx 0.18); if a release changes that, ``_View`` uses ``in``."""
    entries = getattr(httpx.Headers([(b"X-A", b"b")]), "_list", None)
    return entries == [(b"X-A", b"x-a", b"b")]


_HEADER_ENTRIES = _header_entries()


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
    if reply.overloaded:
        headers.append(("x-envoy-overloaded", "true"))
    return httpx.Response(reply.status, headers=headers, content=f"{reply.reason}\n".encode())


# (scheme, address, port, the cluster's connectionPool settings): clusters with different
# pool settings for one endpoint (subsets) get pools of their own.
PoolKey = tuple[str, str, int, ConnectionPoolSettings | None]


def _pool_endpoint(key: PoolKey) -> EndpointKey:
    return (key[1], key[2])


class _Failed(NamedTuple):
    """An attempt that raised: the error and where it happened, translated on delivery."""

    error: Exception
    where: str


_PHASES = (
    (httpcore.ConnectTimeout, "connect"),
    (httpcore.ReadTimeout, "read"),
    (httpcore.WriteTimeout, "write"),
    (httpcore.PoolTimeout, "pool"),
)


def _outcome(exc: Exception, mesh_phases: frozenset[str]) -> Outcome:
    """How a transport error counts for retries and outlier detection (Envoy's terms).

    ``mesh_phases`` are the timeout phases the mesh's deadline set (it was tighter than
    the caller's): a timeout there is the mesh's per-try timeout; a timeout of the
    caller's own is the caller's decision and ends the call.
    """
    if isinstance(exc, TimeoutError):  # anyio's deadline around the whole attempt
        return _TIMED_OUT
    for kind, phase in _PHASES:
        if isinstance(exc, kind):
            if phase in mesh_phases:
                return _TIMED_OUT
            return Outcome(failure=Failure.CONNECT) if phase == "connect" else Outcome()
    if isinstance(exc, httpcore.ConnectError):
        return Outcome(failure=Failure.CONNECT)
    if isinstance(exc, httpcore.RemoteProtocolError | httpcore.ReadError | httpcore.WriteError):
        return Outcome(failure=Failure.RESET)
    return Outcome()


def _hostname(authority: str | None) -> str | None:
    """The host of an authority, without its port: what TLS verifies."""
    if not authority:
        return None
    if authority.startswith("["):
        return authority[1 : authority.find("]")]
    host, _, port = authority.rpartition(":")
    return host if host and port.isdigit() else authority


def _record(
    view: _View,
    subset: str | None,
    endpoint: Endpoint | None,
    status: int | None,
    attempts: int,
    *,
    injected: bool,
    error: str | None,
) -> None:
    """Tell the pytest plugin's overlay about a finished call (only while it records)."""
    OVERLAY.record(
        CallRecord(
            host=view.host,
            method=view.method,
            path=view.path,
            subset=subset,
            endpoint=None if endpoint is None else str(endpoint),
            status=status,
            grpc_status=None,
            attempts=attempts,
            injected=injected,
            error=error,
        )
    )


def _replayable(request: httpx.Request) -> bool:
    # Bytes given up front can be sent again; a generator or file stream cannot.
    return isinstance(request.stream, httpx.ByteStream)


# The outcome of an answer, built once per status code rather than once per attempt.
_STATUS_LIMIT = 1000
_OUTCOMES = tuple(Outcome(status) for status in range(_STATUS_LIMIT))
_TIMED_OUT = Outcome(failure=Failure.TIMEOUT)


_COUNTS = tuple(str(n).encode() for n in range(10))
_SCHEMES = {"http": b"http", "https": b"https"}
_NO_PHASES: frozenset[str] = frozenset()
_PHASE_BITS = ((1, "connect"), (2, "read"), (4, "write"), (8, "pool"))
# Every set of phases the mesh's deadline can set, made once: indexed by a bit mask.
_PHASE_SETS = tuple(
    frozenset(phase for bit, phase in _PHASE_BITS if mask & bit) for mask in range(16)
)


_METHODS = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

# An httpcore URL's parts: scheme, host, port, target.
CoreUrl = tuple[bytes, bytes, int, bytes]
_new = object.__new__


def _checked_request(
    method: bytes,
    url: CoreUrl,
    headers: list[tuple[bytes, bytes]],
    stream: Any,
    extensions: dict[str, Any],
) -> httpcore.Request:
    """The httpcore request, through httpcore's own constructor and its checks."""
    scheme, host, port, target = url
    return httpcore.Request(
        method=method,
        url=httpcore.URL(scheme=scheme, host=host, port=port, target=target),
        headers=headers,
        content=stream,
        extensions=extensions,
    )


def _assembled_request(
    method: bytes,
    url: CoreUrl,
    headers: list[tuple[bytes, bytes]],
    stream: Any,
    extensions: dict[str, Any],
) -> httpcore.Request:
    """The same request with the constructor's checks skipped: every part is already the
    bytes those checks would make of it (httpx validated the caller's URL and headers,
    the registry's validation the route's), and the checks cost 5 µs, a fifth of the
    mesh's own work per request. ``_core_request`` falls back to ``_checked_request``
    if httpcore's request ever holds other attributes than these."""
    if "target" in extensions:  # httpcore's own override of the request target
        return _checked_request(method, url, headers, stream, extensions)
    core_url = _new(httpcore.URL)
    core_url.scheme, core_url.host, core_url.port, core_url.target = url
    core = _new(httpcore.Request)
    core.method = method
    core.url = core_url
    core.headers = headers
    core.stream = stream
    core.extensions = extensions
    return core


def _same_attributes() -> bool:
    """Whether an assembled request has exactly the attributes a constructed one has."""
    url: CoreUrl = (b"http", b"h", 80, b"/")
    headers, stream, extensions = [(b"a", b"b")], httpx.ByteStream(b""), {"trace": None}
    try:
        built = _checked_request(b"GET", url, headers, stream, extensions)
        made = _assembled_request(b"GET", url, headers, stream, extensions)
    except Exception:  # httpcore changed beyond recognition: keep its constructor
        return False
    return vars(built) == vars(made) and vars(built.url) == vars(made.url)


_core_request = _assembled_request if _same_attributes() else _checked_request


def _assembled_headers(raw: list[tuple[bytes, bytes]]) -> httpx.Headers:
    """``httpx.Headers(raw)`` for a list of bytes pairs (httpcore's response headers),
    without the per-header type checks of its constructor (a third of the cost)."""
    headers = _new(httpx.Headers)
    headers._list = [(key, key.lower(), value) for key, value in raw]
    headers._encoding = None
    return headers


def _same_headers() -> bool:
    raw = [(b"Content-Type", b"text/plain"), (b"x-a", b"1"), (b"X-A", b"2")]
    try:
        return vars(_assembled_headers(raw)) == vars(httpx.Headers(raw))
    except Exception:  # httpx changed beyond recognition: keep its constructor
        return False


_headers: Any = _assembled_headers if _same_headers() else httpx.Headers


def _shadow(authority: bytes) -> bytes:
    """Envoy marks mirrored requests by suffixing the host with ``-shadow``."""
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit() and not host.endswith(b"]"):
        return host + b"-shadow:" + port
    return authority + b"-shadow"


class _Exchange:
    """One attempt: its httpcore request, built from the caller's ``httpx.Request``, and
    what it holds until its response is closed (a pool use, an active-request count, a
    connection-pool admission, a deadline timer)."""

    __slots__ = (
        "_endpoint",
        "_host",
        "cluster",
        "core_request",
        "entry",
        "key",
        "limits",
        "mesh_phases",
        "stats",
        "timer",
    )

    def __init__(
        self,
        request: httpx.Request,
        view: _View,
        upstream: Upstream,
        send: Send,
        *,
        shadow: bool = False,
    ) -> None:
        endpoint, attempt, timeout, self.limits = send
        self.timer: Timer | asyncio.TimerHandle | None = None
        self.entry: Entry[Any]
        self.stats: EndpointStats
        scheme = view.scheme
        cluster = upstream.cluster
        pool = cluster.policy.connection_pool
        self.key: PoolKey = (scheme, endpoint.address, endpoint.port, pool)
        headers = request.headers.raw  # a fresh list on every access: ours to extend
        if upstream.authority is not None or shadow:
            authority = upstream.authority.encode() if upstream.authority else request.url.netloc
            headers = [(k, v) for k, v in headers if k.lower() != b"host"]
            headers.insert(0, (b"Host", _shadow(authority) if shadow else authority))
        for ops in upstream.request_ops:
            headers = apply_header_ops(headers, ops)
        headers.append(
            (b"x-envoy-attempt-count", _COUNTS[attempt] if attempt < 10 else b"%d" % attempt)
        )
        extensions: dict[str, Any] = request.extensions
        connect = None if pool is None else pool.tcp.connect_timeout
        self.mesh_phases: frozenset[str] = _NO_PHASES
        if timeout is not None or connect is not None or scheme == "https":
            extensions = dict(extensions)
            caller = extensions.get("timeout") or {}
            limits = dict(caller)
            if timeout is not None:
                # The tighter of the caller's timeout and the mesh's wins, per operation.
                mask = 0
                for bit, phase in _PHASE_BITS:
                    own = caller.get(phase)
                    if own is None or timeout < own:
                        limits[phase] = timeout
                        mask |= bit
                self.mesh_phases = _PHASE_SETS[mask]
            if connect is not None and (limits.get("connect") or connect + 1) > connect:
                limits["connect"] = connect
            extensions["timeout"] = limits
            if scheme == "https":
                # Verify the upstream's certificate against the logical host, not the address.
                extensions["sni_hostname"] = _hostname(upstream.authority) or view.host
        target = view.raw_path if upstream.path is None else upstream.path.encode()
        self.core_request = _core_request(
            _METHODS.get(view.method) or view.method.encode("ascii"),
            (
                _SCHEMES.get(scheme) or scheme.encode("ascii"),
                endpoint.address.encode(),
                endpoint.port,
                target,
            ),
            headers,
            request.stream,
            extensions,
        )
        self._host = view.host
        self.cluster = cluster.name
        self._endpoint = endpoint

    @property
    def where(self) -> str:
        """Where this attempt went, for error messages (built only when one is raised)."""
        return f"{self._host} via {self.cluster} at {self._endpoint}"


def _exchange(request: httpx.Request, view: _View, upstream: Upstream, send: Send) -> _Exchange:
    """The attempt's exchange; if it cannot be built (a method httpcore cannot send), the
    connection-pool admission the flow took for it is given back before the error goes
    to the caller."""
    try:
        return _Exchange(request, view, upstream, send)
    except BaseException:
        if send.limits is not None:
            send.limits.release()
        raise


class _TransportBase:
    _pools: EndpointResources[PoolKey, Any]  # httpcore pools, sync or async: the drivers'

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
        self._mirrors = MirrorGate(mesh.state)
        self._stats = mesh.stats

    def _pool_options(self, settings: ConnectionPoolSettings | None) -> dict[str, Any]:
        if self._ssl_context is None:
            verify, cert, trust_env = self._tls
            if isinstance(verify, bool | str):
                self._ssl_context = httpx.create_ssl_context(
                    verify=verify, cert=cert, trust_env=trust_env
                )
            else:
                self._ssl_context = verify
        limits = self._limits
        options = {
            "ssl_context": self._ssl_context,
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry,
            "http1": self._http[0],
            "http2": self._http[1],
            "local_address": self._local_address,
        }
        if settings is not None:
            # DestinationRule connectionPool: per endpoint, as Istio documents the limits.
            cap = settings.tcp.max_connections
            if cap is not None:
                options["max_connections"] = min(cap, options["max_connections"] or cap)
            if settings.http.max_requests_per_connection == 1:
                options["max_keepalive_connections"] = 0  # a new connection per request
            if settings.http.idle_timeout is not None:
                options["keepalive_expiry"] = settings.http.idle_timeout
        return options

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

    def _start(self, request: httpx.Request) -> tuple[Snapshot, _View, Plan, Any]:
        """The request's snapshot, view and plan; for an upstream, its attempt flow too
        (else None). One call for all four: this runs for every request. (The flow is
        typed Any: the drivers test the plan, not the flow, and mypy cannot tie the two.)"""
        snapshot = self._mesh.snapshot
        view = _View(request)
        decision = plan(snapshot, view, self._rng, source=self._source)
        if not isinstance(decision, Upstream):
            return snapshot, view, decision, None
        pick = self._pick
        if decision.hash_key is not None:
            pick = PickContext(rng=self._rng, hash_key=decision.hash_key)
        flow = attempt_flow(
            decision,
            view,
            rng=self._rng,
            now=time.monotonic(),
            replayable=_replayable(request),
            mesh_config=snapshot.mesh_config,
            pick=pick,
        )
        return snapshot, view, decision, flow

    def _passthrough_fault(self, view: _View) -> Any:
        if not OVERLAY.active:
            return None
        return OVERLAY.match(
            host=view.host, method=view.method, path=view.path, header=view.header, subset=None
        )

    def _passed(self, view: _View, injection: Any, outcome: Any) -> httpx.Response:
        """A passthrough call's end: the fault abort's reply, or the outcome, recorded."""
        if outcome is None:
            outcome = _local_response(fault_abort(injection.abort_status, injection.grpc_status))
        if OVERLAY.recording:
            failed = isinstance(outcome, Exception)
            _record(
                view,
                None,
                None,
                None if failed else outcome.status_code,
                0 if failed else 1,
                injected=injection is not None,
                error=type(outcome).__name__ if failed else None,
            )
        if isinstance(outcome, Exception):
            raise outcome
        response: httpx.Response = outcome
        return response

    def _deliver(
        self,
        request: httpx.Request,
        view: _View,
        upstream: Upstream,
        finish: Finish,
        snapshot: Snapshot,
    ) -> httpx.Response:
        result = finish.result
        if OVERLAY.active and OVERLAY.recording:
            status = None
            if finish.reply is not None:
                status = finish.reply.status
            elif isinstance(result, httpx.Response):
                status = result.status_code
            error = type(result.error).__name__ if isinstance(result, _Failed) else None
            _record(
                view,
                upstream.cluster.key.subset,
                finish.endpoint,
                status,
                finish.attempts,
                injected=finish.injected,
                error=error,
            )
        if finish.reply is not None:
            return _local_response(finish.reply)
        if isinstance(result, _Failed):
            translated = _translate(result.error, request, result.where)
            if translated is None:
                raise result.error
            raise translated from translated.__cause__
        forward, table = upstream.forward, upstream.table
        assert finish.endpoint is not None
        result.extensions["inmesh"] = RouteInfo(
            view.host,
            upstream.cluster.name,
            finish.endpoint,
            None if table is None else table.name,
            None if forward is None else forward.route.spec.path,
            snapshot.version,
            finish.attempts,
        )
        return result  # type: ignore[no-any-return]

    def _answered(self, upstream: Upstream, response: Any, stream: Any) -> Attempted:
        """An attempt the upstream answered: the caller's response (the body read through
        ``stream``, the route's response header operations applied) and its outcome."""
        headers = response.headers
        if upstream.response_ops:
            headers = list(headers)
            for ops in upstream.response_ops:
                headers = apply_header_ops(headers, ops)
        status = response.status
        reply = httpx.Response(
            status, headers=_headers(headers), stream=stream, extensions=response.extensions
        )
        outcome = _OUTCOMES[status] if status < _STATUS_LIMIT else Outcome(status)
        return _tuple(Attempted, (outcome, reply, time.monotonic()))

    def _give_back(self, exchange: _Exchange) -> bool:
        """Release what an attempt held; True if its pool is retired and now idle (the
        driver closes it, sync or async)."""
        if exchange.timer is not None:
            exchange.timer.cancel()
        exchange.stats.end()
        if exchange.limits is not None:
            exchange.limits.release()
        return self._pools.release(exchange.entry)


class MeshTransport(_TransportBase, httpx.BaseTransport):
    """An ``httpx.BaseTransport`` that routes, balances and retries by the mesh configuration."""

    def __init__(self, mesh: Mesh, **options: Any) -> None:
        super().__init__(mesh, **options)
        self._pools = EndpointResources(
            lambda key: httpcore.ConnectionPool(**self._pool_options(key[3])), _pool_endpoint
        )
        self._passthrough: httpx.HTTPTransport | None = None
        self._mirror_pool: ThreadPoolExecutor | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        snapshot, view, decision, flow = self._start(request)
        if snapshot.version != self._pools.version:
            for pool in self._pools.retire(snapshot.endpoint_keys, snapshot.version):
                pool.close()
        if not isinstance(decision, Upstream):
            if isinstance(decision, LocalReply):
                return _local_response(decision)
            return self._pass_through(request, view)
        mirror = decision.mirror
        try:
            command = next(flow)
            while True:
                if isinstance(command, Send):
                    if mirror is not None:  # with the first attempt, as Envoy's router does
                        if self._mirrors.admit(
                            snapshot.mesh_config.mirror_max_in_flight,
                            replayable=_replayable(request),
                        ):
                            self._mirror(request, view, decision)
                        mirror = None
                    command = flow.send(self._attempt(request, view, decision, command))
                elif isinstance(command, Wait):
                    time.sleep(command.seconds)
                    command = flow.send(time.monotonic())
                else:
                    if isinstance(command.result, httpx.Response):
                        command.result.close()
                    command = flow.send(None)
        except StopIteration as stop:
            finish: Finish = stop.value
        return self._deliver(request, view, decision, finish, snapshot)

    def _attempt(
        self, request: httpx.Request, view: _View, upstream: Upstream, send: Send
    ) -> Attempted:
        endpoint = send.endpoint
        exchange = _exchange(request, view, upstream, send)
        exchange.entry = self._pools.acquire(exchange.key)
        exchange.stats = stats = self._stats.get(endpoint.key)
        stats.begin()
        pool = exchange.entry.resource
        deadline = None
        if send.timeout is not None:
            deadline = _Deadline(time.monotonic() + send.timeout, pool, exchange.core_request)
            watchdog.add(deadline)
            exchange.timer = deadline
        try:
            response = pool.handle_request(exchange.core_request)
        except BaseException as exc:
            if deadline is not None:
                deadline.close()
            self._release(exchange)
            if not isinstance(exc, Exception):
                raise
            cut = deadline is not None and deadline.has_cut()  # the head was cut off
            outcome = _TIMED_OUT if cut else _outcome(exc, exchange.mesh_phases)
            return Attempted(outcome, _Failed(exc, exchange.where), time.monotonic())
        if deadline is not None:
            deadline.answered(response)
        stream = _Stream(response, self, exchange, request, deadline)
        return self._answered(upstream, response, stream)

    def _release(self, exchange: _Exchange) -> None:
        if self._give_back(exchange):
            exchange.entry.resource.close()

    def _pass_through(self, request: httpx.Request, view: _View) -> httpx.Response:
        injection = self._passthrough_fault(view)
        if injection is not None:
            if injection.delay:
                time.sleep(injection.delay)
            if injection.abort_status is not None or injection.grpc_status is not None:
                return self._passed(view, injection, None)
        if self._passthrough is None:
            self._passthrough = httpx.HTTPTransport(**self._passthrough_options())
        try:
            response = self._passthrough.handle_request(request)
        except Exception as exc:
            self._passed(view, injection, exc)
        return self._passed(view, injection, response)

    def _mirror(self, request: httpx.Request, view: _View, upstream: Upstream) -> None:
        if self._mirror_pool is None:
            with self._mirrors.lock:
                if self._mirror_pool is None:
                    self._mirror_pool = ThreadPoolExecutor(8, thread_name_prefix="inmesh-mirror")
        self._mirror_pool.submit(self._send_mirror, request, view, upstream)

    def _send_mirror(self, request: httpx.Request, view: _View, upstream: Upstream) -> None:
        try:
            cluster = upstream.mirror
            assert cluster is not None
            endpoint = cluster.balancer.pick(self._pick)
            if endpoint is None:
                return
            shadow = upstream._replace(cluster=cluster, response_ops=())
            exchange = _Exchange(request, view, shadow, Send(endpoint, 1, 5.0, None), shadow=True)
            entry = self._pools.acquire(exchange.key)
            try:
                response = entry.resource.handle_request(exchange.core_request)
                try:
                    for _ in response.stream:
                        pass
                finally:
                    response.close()
            finally:
                if self._pools.release(entry):
                    entry.resource.close()
        except Exception as exc:
            log.debug("mirror of %s failed: %s", request.url, exc)
        finally:
            self._mirrors.done()

    def close(self) -> None:
        if self._mirror_pool is not None:
            # Mirrors still running end on their own (their pools close under them).
            self._mirror_pool.shutdown(wait=False, cancel_futures=True)
        for pool in self._pools.drain():
            pool.close()
        if self._passthrough is not None:
            self._passthrough.close()


def _cut(response: Any) -> bool:
    """Shut down the socket under ``response``, so that a read blocked on it returns at
    once; False when it cannot be done (HTTP/2: the socket carries other streams, which
    are left to the per-read timeout)."""
    extensions = response.extensions
    if extensions.get("http_version") == b"HTTP/2":
        return False
    stream = extensions.get("network_stream")
    return _shut(None if stream is None else stream.get_extra_info("socket"))


def _shut(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    return True


def _cut_head(pool: Any, request: httpcore.Request) -> bool | None:
    """Shut down the socket an HTTP/1.1 request is waiting on for its response head: True
    when done; None when not yet possible (the request waits for a connection, or is
    connecting: those phases have timeouts of their own), to try again shortly; False
    when it never will be (HTTP/2, whose socket carries other streams; or httpcore's pool
    no longer looks as read here, which leaves the per-read timeouts to bound the head).

    Done under the pool's lock, which guards its assignments: httpcore may hand one idle
    connection to several queued requests, of which one wins and the others try again,
    so a connection is cut only while this request is the only one it is assigned to.
    Only a deadline that has passed looks, so the search costs no request anything."""
    try:
        with pool._optional_thread_lock:
            waiting = [entry for entry in pool._requests if entry.request is request]
            if not waiting or waiting[0].connection is None:
                return None
            assigned = waiting[0].connection
            if sum(entry.connection is assigned for entry in pool._requests) > 1:
                return None
            connection = getattr(assigned, "_connection", None)
            if connection is None:  # still connecting
                return None
            if not isinstance(connection, httpcore.HTTP11Connection):
                return False
            return _shut(connection._network_stream.get_extra_info("socket"))
    except Exception:  # httpcore's internals changed: the per-read timeouts still apply
        return False


# How soon a passed deadline looks again for a request not yet on the wire.
_RECHECK = 0.02


class _Deadline(Timer):
    """A sync attempt's deadline, armed when the request is sent: the watchdog's thread
    calls ``fire``, which unblocks the attempt by shutting its socket down, whether it
    is waiting for the response head or reading the body. (httpcore's timeouts are per
    read: a head or body trickled a byte at a time would never trip them.) Never once the
    attempt is over: its connection may be back in the pool and serving another request
    by then (the watchdog's thread can run late). A deadline that passes while the
    request waits for a connection or connects looks again every ``_RECHECK`` seconds,
    until the request is on the wire or answered, and cuts it then.

    It is its own watchdog timer (one object a request, not two and a bound method). The
    attempt always closes it before cancelling it, and ``close`` lets go of what it holds
    (the pool, the request, the response)."""

    __slots__ = ("_lock", "_pool", "_request", "closed", "cut", "response")

    def __init__(self, deadline: float, pool: Any, request: httpcore.Request) -> None:
        # Timer's fields (its docstring lists them), then the deadline's own.
        self.deadline = deadline
        self.owner = watchdog
        self.live = True
        self._lock = threading.Lock()
        self._pool = pool
        self._request: httpcore.Request | None = request
        self.response: Any = None  # set when the head has arrived
        self.closed = False
        self.cut = False  # the deadline shut the socket down

    def fire(self) -> None:
        with self._lock:
            request = self._request
            if request is None:  # closed: the attempt is over
                return
            if self.response is not None:
                self.cut = _cut(self.response)
                return
            cut = _cut_head(self._pool, request)
            if cut is None:  # not on the wire yet: look again until it is, or is answered
                watchdog.arm(time.monotonic() + _RECHECK, self.fire)
                return
            self.cut = cut

    def answered(self, response: Any) -> None:
        # Without the lock: a ``fire`` that misses the response cuts the request's
        # connection through the pool instead (the request is on the wire), which ends
        # the body's reads as surely.
        self.response = response

    def has_cut(self) -> bool:
        """Whether the deadline cut the attempt off. Taken under the lock: a read unblocked
        by the shutdown can fail before ``fire`` has recorded it."""
        with self._lock:
            return self.cut

    def close(self) -> None:
        """The attempt is over: no cut from now on (one under way ends first), and what
        the deadline held goes (the watchdog's heap keeps the object a while longer)."""
        with self._lock:
            self.closed = True
            self._pool = self._request = self.response = None


# asyncio.timeout mishandles a task already being cancelled before 3.11.3 (gh-102780):
# earlier 3.11 releases take anyio's path.
_ASYNCIO_TIMEOUT = sys.version_info >= (3, 11, 3)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop this task runs on, for asyncio's own timeouts; None under another
    event loop (trio), or where asyncio.timeout is not to be trusted."""
    if not _ASYNCIO_TIMEOUT:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Stream(httpx.SyncByteStream):
    """The response body: reading it counts against the attempt's deadline; closing it
    releases what the attempt held."""

    __slots__ = ("_closed", "_deadline", "_exchange", "_request", "_response", "_transport")

    def __init__(
        self,
        response: Any,
        transport: MeshTransport,
        exchange: _Exchange,
        request: httpx.Request,
        deadline: _Deadline | None,
    ) -> None:
        self._response = response
        self._transport = transport
        self._exchange = exchange
        self._request = request
        self._deadline = deadline
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._response.stream
        except Exception as exc:
            if self._deadline is not None and self._deadline.has_cut():
                raise httpx.ReadTimeout(
                    f"{TIMEOUT_BODY} ({self._exchange.where})", request=self._request
                ) from exc
            error = _translate(exc, self._request, self._exchange.where)
            if error is None:
                raise
            raise error from error.__cause__

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._deadline is not None:
            self._deadline.close()
        try:
            close = getattr(self._response.stream, "close", None)
            if close is not None:
                close()
        finally:
            self._transport._release(self._exchange)


class AsyncMeshTransport(_TransportBase, httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` that routes, balances and retries by the mesh config."""

    def __init__(self, mesh: Mesh, **options: Any) -> None:
        super().__init__(mesh, **options)
        self._pools = EndpointResources(
            lambda key: httpcore.AsyncConnectionPool(**self._pool_options(key[3])), _pool_endpoint
        )
        self._passthrough: httpx.AsyncHTTPTransport | None = None
        self._mirror_tasks: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        snapshot, view, decision, flow = self._start(request)
        if snapshot.version != self._pools.version:
            for pool in self._pools.retire(snapshot.endpoint_keys, snapshot.version):
                await pool.aclose()
        if not isinstance(decision, Upstream):
            if isinstance(decision, LocalReply):
                return _local_response(decision)
            return await self._pass_through(request, view)
        mirror = decision.mirror
        try:
            command = next(flow)
            while True:
                if isinstance(command, Send):
                    if mirror is not None:  # with the first attempt, as Envoy's router does
                        if self._mirrors.admit(
                            snapshot.mesh_config.mirror_max_in_flight,
                            replayable=_replayable(request),
                        ):
                            self._mirror(request, view, decision)
                        mirror = None
                    command = flow.send(await self._attempt(request, view, decision, command))
                elif isinstance(command, Wait):
                    await anyio.sleep(command.seconds)
                    command = flow.send(time.monotonic())
                else:
                    if isinstance(command.result, httpx.Response):
                        await command.result.aclose()
                    command = flow.send(None)
        except StopIteration as stop:
            finish: Finish = stop.value
        return self._deliver(request, view, decision, finish, snapshot)

    async def _attempt(
        self, request: httpx.Request, view: _View, upstream: Upstream, send: Send
    ) -> Attempted:
        endpoint = send.endpoint
        exchange = _exchange(request, view, upstream, send)
        exchange.entry = self._pools.acquire(exchange.key)
        exchange.stats = stats = self._stats.get(endpoint.key)
        stats.begin()
        timeout = send.timeout
        loop = None if timeout is None else _running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if timeout is None:
                response = await exchange.entry.resource.handle_async_request(exchange.core_request)
            elif loop is not None:  # asyncio's own timeout costs a third of anyio's scope
                async with asyncio.timeout(timeout):
                    response = await exchange.entry.resource.handle_async_request(
                        exchange.core_request
                    )
            else:
                with anyio.fail_after(timeout):
                    response = await exchange.entry.resource.handle_async_request(
                        exchange.core_request
                    )
        except BaseException as exc:
            # A cancellation too must give back what the attempt holds (limits above all).
            with anyio.CancelScope(shield=True):
                await self._release(exchange)
            if not isinstance(exc, Exception):
                raise
            return Attempted(
                _outcome(exc, exchange.mesh_phases), _Failed(exc, exchange.where), time.monotonic()
            )
        # On asyncio over HTTP/1.1, one timer bounds the whole body, as the sync transport's
        # watchdog does: at the deadline the socket is shut down and the read in progress
        # fails at once. Elsewhere (trio; HTTP/2, whose socket carries other streams) each
        # read gets a scope of its own.
        if (
            loop is not None
            and deadline is not None
            and response.extensions.get("http_version") != b"HTTP/2"
        ):
            stream = _AsyncStream(response, self, exchange, request, deadline=None)
            exchange.timer = loop.call_later(max(0.0, deadline - time.monotonic()), stream.cut)
        else:
            stream = _AsyncStream(response, self, exchange, request, deadline=deadline)
        return self._answered(upstream, response, stream)

    async def _release(self, exchange: _Exchange) -> None:
        if self._give_back(exchange):
            await exchange.entry.resource.aclose()

    async def _pass_through(self, request: httpx.Request, view: _View) -> httpx.Response:
        injection = self._passthrough_fault(view)
        if injection is not None:
            if injection.delay:
                await anyio.sleep(injection.delay)
            if injection.abort_status is not None or injection.grpc_status is not None:
                return self._passed(view, injection, None)
        if self._passthrough is None:
            self._passthrough = httpx.AsyncHTTPTransport(**self._passthrough_options())
        try:
            response = await self._passthrough.handle_async_request(request)
        except Exception as exc:
            self._passed(view, injection, exc)
        return self._passed(view, injection, response)

    def _mirror(self, request: httpx.Request, view: _View, upstream: Upstream) -> None:
        try:
            task = asyncio.get_running_loop().create_task(
                self._send_mirror(request, view, upstream)
            )
        except RuntimeError:  # not on asyncio (trio): mirroring is asyncio-only
            self._mirrors.done(sent=False)
            return
        self._mirror_tasks.add(task)  # keep a reference until it ends
        task.add_done_callback(self._mirror_tasks.discard)

    async def _send_mirror(self, request: httpx.Request, view: _View, upstream: Upstream) -> None:
        try:
            cluster = upstream.mirror
            assert cluster is not None
            endpoint = cluster.balancer.pick(self._pick)
            if endpoint is None:
                return
            shadow = upstream._replace(cluster=cluster, response_ops=())
            exchange = _Exchange(request, view, shadow, Send(endpoint, 1, 5.0, None), shadow=True)
            entry = self._pools.acquire(exchange.key)
            try:
                with anyio.fail_after(5.0):
                    response = await entry.resource.handle_async_request(exchange.core_request)
                    try:
                        async for _ in response.stream:
                            pass
                    finally:
                        await response.aclose()
            finally:
                if self._pools.release(entry):
                    await entry.resource.aclose()
        except Exception as exc:
            log.debug("mirror of %s failed: %s", request.url, exc)
        finally:
            self._mirrors.done()

    async def aclose(self) -> None:
        for task in list(self._mirror_tasks):
            task.cancel()
        for pool in self._pools.drain():
            await pool.aclose()
        if self._passthrough is not None:
            await self._passthrough.aclose()


class _AsyncStream(httpx.AsyncByteStream):
    """The async response body, cut off at the attempt's deadline."""

    __slots__ = (
        "_closed",
        "_cut",
        "_deadline",
        "_exchange",
        "_request",
        "_response",
        "_transport",
    )

    def __init__(
        self,
        response: Any,
        transport: AsyncMeshTransport,
        exchange: _Exchange,
        request: httpx.Request,
        *,
        deadline: float | None,
    ) -> None:
        self._response = response
        self._transport = transport
        self._exchange = exchange
        self._request = request
        self._deadline = deadline  # set when reads need a scope each (not on asyncio)
        self._closed = False
        self._cut = False

    def cut(self) -> None:
        """The deadline passed (asyncio's timer): unblock any read by shutting the socket.
        Never once the response is closed (its connection may serve another request by
        then); timer and close both run on the loop's thread, so no lock is needed."""
        if not self._closed:
            self._cut = _cut(self._response)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if self._deadline is None:
                async for part in self._response.stream:
                    yield part
                return
            chunks = self._response.stream.__aiter__()
            while True:
                with anyio.fail_after(max(0.0, self._deadline - time.monotonic())):
                    try:
                        part = await chunks.__anext__()
                    except StopAsyncIteration:
                        return
                yield part
        except TimeoutError as exc:
            raise httpx.ReadTimeout(
                f"{TIMEOUT_BODY} ({self._exchange.where})", request=self._request
            ) from exc
        except Exception as exc:
            if self._cut:
                raise httpx.ReadTimeout(
                    f"{TIMEOUT_BODY} ({self._exchange.where})", request=self._request
                ) from exc
            error = _translate(exc, self._request, self._exchange.where)
            if error is None:
                raise
            raise error from error.__cause__

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            aclose = getattr(self._response.stream, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self._transport._release(self._exchange)
