"""The grpcio adapter: ``MeshChannel``, a ``grpc.Channel`` that routes by the mesh config.

Every decision comes from the core, as for httpx: ``plan`` routes a call (the logical
target is the authority, the method path ``/package.Service/Method`` is the uri, the
metadata are the headers), ``attempt_flow`` decides faults, deadlines, endpoints, retries
and budgets. This module only drives that flow over grpcio.

grpcio has no Python API for custom resolvers or balancers, so the mesh channel is a
picking channel over **one grpcio channel per endpoint**, each with a local subchannel
pool (so channels to one address do not silently share a connection), grpc's own
retries off (the mesh decides), ``grpc.default_authority`` set to the logical target
(grpcio has no per-call authority; a secure channel also checks the server's certificate
against it) and the cluster's DestinationRule ``connectionPool`` timeouts as grpcio's own
options, plus the caller's options and credentials (an option the caller names wins).
Clusters with different pool settings for one endpoint get channels of their own, as
they get pools of their own over HTTP. Endpoint channels open on first use and are
retired when their endpoint leaves the registry, closing once their last call has
finished.

Theory of operation, per call shape:

- **Unary response** (unary-unary, stream-unary): each attempt is one grpcio call; a
  failed attempt is retried when the flow says so. ``__call__`` and ``with_call`` drive
  the flow on the caller's thread; ``future()`` drives the same flow from grpcio's
  completion callbacks and the watchdog timer thread (for back-off and fault delays), so
  it blocks nothing and ``cancel()`` cancels the attempt in flight.
- **Streaming response** (unary-stream, stream-stream): the call starts when the caller
  first touches it (iterates, or asks for metadata or status); an attempt counts as
  answered when its first response message arrives, and is retried only before that.
  After it, the caller reads grpcio's own stream, and its errors are grpcio's own.
- **Request streaming** (stream-unary, stream-stream) is never retried: the request
  iterator may be consumed already, and a consumed stream cannot be replayed.

Errors reach the caller as real ``grpc.RpcError``s: the last attempt's own error when the
upstream answered, else a local error (``_LocalRpcError``, also a ``grpc.Call``) whose
``code()`` is the gRPC status of the mesh's reply — no route: UNIMPLEMENTED; unknown subset,
no endpoint, overflow: UNAVAILABLE; timeout: DEADLINE_EXCEEDED; fault abort: its
``grpcStatus``, or its HTTP status mapped as Envoy maps HTTP to gRPC; redirect: UNKNOWN,
the status a gRPC client makes of Envoy's 301 — with the mesh's reason chained as an
``UpstreamError``.

A route's response header operations edit the initial metadata the caller reads from a
call the upstream answered (Envoy edits the response headers, not the trailers); an
error is the upstream's own, unedited.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from inmesh._namedtuples import build as _tuple
from inmesh.exceptions import MissingExtraError, UpstreamError

try:
    import grpc  # type: ignore[import-untyped]  # grpcio ships no type information
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("gRPC channels", "grpc", "grpcio") from exc

from inmesh.balancing import EndpointStats, PickContext
from inmesh.config.model import ConnectionPoolSettings, HeaderOperations
from inmesh.endpoints import Endpoint, EndpointKey
from inmesh.flow import (
    TIMEOUT_BODY,
    Attempted,
    Finish,
    Send,
    Wait,
    attempt_flow,
    express,
    express_abandon,
    express_send,
    express_succeeded,
    fault_abort,
)
from inmesh.plan import LocalReply, Plan, Prepared, Upstream, plan, prepare
from inmesh.resilience.limits import EndpointLimits
from inmesh.resilience.retry import Failure, Outcome
from inmesh.testing.faults import OVERLAY, CallRecord
from inmesh.transports._resources import EndpointResources, Entry, MirrorGate
from inmesh.transports._watchdog import Timer, watchdog

if TYPE_CHECKING:
    from collections.abc import Generator

    from inmesh.flow import Command
    from inmesh.mesh import Mesh
    from inmesh.snapshot import Snapshot

__all__ = ["MeshChannel"]

log = logging.getLogger("inmesh.grpc")

_attempt_flow = attempt_flow

_Code = grpc.StatusCode
# Envoy's (and the gRPC spec's) HTTP status → gRPC status, for local replies.
_HTTP_TO_GRPC: dict[int, Any] = {
    400: _Code.INTERNAL,
    401: _Code.UNAUTHENTICATED,
    403: _Code.PERMISSION_DENIED,
    404: _Code.UNIMPLEMENTED,
    429: _Code.UNAVAILABLE,
    502: _Code.UNAVAILABLE,
    503: _Code.UNAVAILABLE,
    504: _Code.UNAVAILABLE,
}
# Options the mesh owns on every endpoint channel.
_OWN_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.use_local_subchannel_pool", 1),  # a connection of its own per endpoint channel
    ("grpc.enable_retries", 0),  # the mesh retries; grpc's own would multiply attempts
)
_OWN_KEYS = frozenset(k for k, _ in _OWN_OPTIONS)
# grpc core gives a connection attempt (TCP connect, TLS and the HTTP/2 handshake up to
# the server's SETTINGS) until max(now + its reconnect back-off, now + its "min connect
# timeout"), each floored at 100 ms (subchannel.cc). ``grpc.min_reconnect_backoff_ms``
# is that min connect timeout despite its name; the back-off, ±20 % jitter included, is
# kept below it so that it never lengthens an attempt.
_BACKOFF_JITTER = 1.2
_INITIAL_BACKOFF_MS = 1_000  # grpc core's own defaults
_MAX_BACKOFF_MS = 120_000
_MAX_INT32 = 2**31 - 1
_OK = Outcome(200, grpc_status="OK")
_ATTEMPT_COUNT = "x-envoy-attempt-count"
_PREPARED_CAP = 1024
_COUNTS = tuple(str(n) for n in range(10))
# What an attempt sends when the caller sent no metadata and the route edits none: made
# once, and a tuple, which grpcio takes as is (it copies a list into a tuple).
_COUNT_ONLY = tuple(((_ATTEMPT_COUNT, count),) for count in _COUNTS)
MIRROR_TIMEOUT = 5.0
_STATS: Any = object()  # the key of an endpoint channel's EndpointStats in its entry's cache
# The words grpcio's transport errors carry (C-core's details text), lower-cased.
_CONNECT_WORDS = ("failed to connect", "connection refused", "connections to all backends")
_RESET_WORDS = ("socket closed", "connection reset", "stream removed", "goaway", "broken pipe")

Metadata = Sequence[tuple[str, "str | bytes"]]


# --------------------------------------------------------------------------- the request


def split_target(target: str) -> tuple[str, int]:
    """``"ratings:9090"`` → ``("ratings", 9090)``; ``dns:///`` prefixes are dropped; a
    target without a port means 443, as grpcio's resolver has it."""
    for prefix in ("dns:///", "dns:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    if target.startswith("["):  # [v6]:port
        host, _, rest = target[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = target.rpartition(":")
        if not sep:
            host, port = target, ""
    if not host:
        raise ValueError(f"gRPC target {target!r} names no host")
    if port and not port.isdigit():
        raise ValueError(f"gRPC target {target!r} has a bad port {port!r}")
    return host.lower(), int(port) if port else 443


class _View:
    """``RequestView`` over a gRPC call: POST to the method path, metadata as headers."""

    __slots__ = ("_metadata", "authority", "host", "path", "port")

    method = "POST"
    scheme = "http"
    query = ""

    def __init__(self, host: str, port: int, authority: str, path: str, metadata: Any) -> None:
        self.host = host
        self.port = port
        self.authority = authority
        self.path = path
        self._metadata = metadata

    def header(self, name: str) -> str | None:
        found: str | None = None
        for key, value in self._metadata or ():
            if key.lower() == name:
                text = (
                    base64.b64encode(value).decode().rstrip("=")  # -bin values, as on the wire
                    if isinstance(value, bytes)
                    else value
                )
                found = text if found is None else f"{found},{text}"
        if found is None and name == "content-type":
            return "application/grpc"
        return found


def _shadow(authority: str) -> str:
    """Envoy marks mirrored requests by suffixing the host with ``-shadow``."""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and not host.endswith("]"):
        return f"{host}-shadow:{port}"
    return f"{authority}-shadow"


def _metadata_value(name: str, value: str) -> str | bytes:
    """A header operation's value as metadata: a ``-bin`` key carries bytes, written in
    base64 as on the wire (the form its matches see too); a value that is not base64 goes
    as its UTF-8 bytes."""
    if not name.endswith("-bin"):
        return value
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except binascii.Error:
        return value.encode()


def edit_metadata(
    metadata: list[tuple[str, Any]], operations: Sequence[HeaderOperations | None]
) -> list[tuple[str, Any]]:
    """Header operations on metadata, in Envoy's order: remove, set (replace), add. The
    operations' names are lower-case already, as metadata keys are."""
    for ops in operations:
        if ops is None:
            continue
        drop = set(ops.remove) | {name for name, _ in ops.set}
        if drop:
            metadata = [(k, v) for k, v in metadata if k.lower() not in drop]
        metadata.extend((name, _metadata_value(name, value)) for name, value in ops.set)
        metadata.extend((name, _metadata_value(name, value)) for name, value in ops.add)
    return metadata


def edited_initial_metadata(metadata: Any, upstream: Upstream | None) -> Any:
    """The initial metadata a caller sees of an answered call: the upstream's, with the
    route's response header operations (Envoy edits the response headers, which carry
    gRPC's initial metadata; the trailers are left alone)."""
    if upstream is None or not upstream.response_ops:
        return metadata
    return tuple(edit_metadata(list(metadata or ()), upstream.response_ops))


def attempt_metadata(metadata: Any, upstream: Upstream | None, attempt: int) -> Any:
    """What one attempt sends: the caller's metadata, the route's edits, and
    ``x-envoy-attempt-count`` on every attempt, as over HTTP (Istio turns Envoy's
    include_request_attempt_count on). Measured on a bare grpcio channel, that one entry
    costs a few µs of client CPU a call and 2-15 µs of wall time against a Python
    server (paired rounds; the spread is the shared machine's)."""
    if upstream is not None and upstream.request_ops:
        sent = edit_metadata(list(metadata) if metadata else [], upstream.request_ops)
        sent.append((_ATTEMPT_COUNT, _COUNTS[attempt] if attempt < 10 else str(attempt)))
        return sent
    if attempt >= 10:
        return (*(metadata or ()), (_ATTEMPT_COUNT, str(attempt)))
    if not metadata:
        return _COUNT_ONLY[attempt]
    return (*metadata, _COUNT_ONLY[attempt][0])


# --------------------------------------------------------------------------- outcomes


def outcome_of(error: Any, timeout: float | None, elapsed: float) -> Outcome:
    """How a failed attempt counts for retries and outlier detection.

    The mesh's own per-try deadline is a timeout; UNAVAILABLE with a connect failure or a
    broken connection is the transport failure Envoy would see; any other status counts by
    its name (``retryOn: unavailable`` and friends, ``classify`` for outlier detection).
    """
    code = error.code()
    if code is _Code.DEADLINE_EXCEEDED and timeout is not None and elapsed >= timeout:
        return Outcome(failure=Failure.TIMEOUT)
    if code is _Code.UNAVAILABLE:
        details = (error.details() or "").lower()
        if any(word in details for word in _CONNECT_WORDS):
            return Outcome(failure=Failure.CONNECT)
        if any(word in details for word in _RESET_WORDS):
            return Outcome(failure=Failure.RESET)
    return Outcome(200, grpc_status=code.name)


def reply_code(reply: LocalReply) -> Any:
    """The gRPC status a local reply answers with."""
    if reply.grpc_status is not None:
        return _Code[reply.grpc_status]
    if reply.reason == TIMEOUT_BODY:
        return _Code.DEADLINE_EXCEEDED
    return _HTTP_TO_GRPC.get(reply.status, _Code.UNKNOWN)


def reply_details(reply: LocalReply) -> str:
    """The details of a local reply: its reason; for a redirect, where it points."""
    if reply.location is not None:
        return f"{reply.reason} ({reply.status}) to {reply.location}"
    return reply.reason


def reply_trailers(reply: LocalReply) -> tuple[tuple[str, str], ...]:
    """Envoy answers a gRPC caller locally with a trailers-only response: its headers,
    ``x-envoy-overloaded`` or a redirect's ``location``, are the trailing metadata."""
    if reply.overloaded:
        return (("x-envoy-overloaded", "true"),)
    if reply.location is not None:
        return (("location", reply.location),)
    return ()


class _LocalRpcError(grpc.RpcError, grpc.Call, grpc.Future):  # type: ignore[misc]  # grpc is untyped
    """A call the mesh answered itself: a ``grpc.RpcError`` that is also a finished
    ``grpc.Call`` and ``grpc.Future``, as grpcio's own errors are."""

    def __init__(self, code: Any, details: str, trailing: tuple[tuple[str, str], ...] = ()):
        super().__init__()
        self._code = code
        self._details = details
        self._trailing = trailing

    def __str__(self) -> str:
        return (
            f"<{type(self).__name__} of RPC that terminated with:\n"
            f"\tstatus = {self._code}\n\tdetails = {self._details!r}\n>"
        )

    __repr__ = __str__

    def code(self) -> Any:
        return self._code

    def details(self) -> str:
        return self._details

    def debug_error_string(self) -> str:
        return f"inmesh: {self._details}"

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:  # noqa: ARG002 -- grpc.Call's
        return False

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return self._code is _Code.CANCELLED

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:  # noqa: ARG002 -- done already
        raise self

    def exception(self, timeout: float | None = None) -> Any:  # noqa: ARG002 -- done already
        return self

    def traceback(self, timeout: float | None = None) -> Any:  # noqa: ARG002 -- done already
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)


class _EditedCall(grpc.Call, grpc.Future):  # type: ignore[misc]  # grpc is untyped
    """An answered grpcio call (what ``with_call`` returns) whose initial metadata carry
    the route's response header operations; everything else is the call's own."""

    __slots__ = ("_call", "_upstream")

    def __init__(self, call: Any, upstream: Upstream) -> None:
        self._call = call
        self._upstream = upstream

    def initial_metadata(self) -> Any:
        return edited_initial_metadata(self._call.initial_metadata(), self._upstream)

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> Any:
        return self._call.code()

    def details(self) -> Any:
        return self._call.details()

    def debug_error_string(self) -> Any:
        return self._call.debug_error_string()

    def is_active(self) -> bool:
        return bool(self._call.is_active())

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return bool(self._call.add_callback(callback))

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def cancelled(self) -> bool:
        return bool(self._call.cancelled())

    def running(self) -> bool:
        return bool(self._call.running())

    def done(self) -> bool:
        return bool(self._call.done())

    def result(self, timeout: float | None = None) -> Any:
        return self._call.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._call.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _: fn(self))


def local_error(reply: LocalReply, where: str) -> tuple[Any, UpstreamError]:
    """The code of a local reply, and the mesh's reason for it."""
    return reply_code(reply), UpstreamError(f"{where}: {reply_details(reply)}")


def _sync_local_error(reply: LocalReply, where: str) -> _LocalRpcError:
    code, reason = local_error(reply, where)
    error = _LocalRpcError(code, reply_details(reply), reply_trailers(reply))
    error.__cause__ = reason
    return error


def cancelled_details() -> str:
    return "Locally cancelled by application!"


def cancelled_error() -> _LocalRpcError:
    return _LocalRpcError(_Code.CANCELLED, cancelled_details())


# --------------------------------------------------------------------------- endpoint channels


# (address, port, authority, the cluster's connectionPool settings): clusters with
# different pool settings for one endpoint (subsets) get channels of their own.
ChannelKey = tuple[str, int, str, ConnectionPoolSettings | None]


def _channel_endpoint(key: ChannelKey) -> EndpointKey | None:
    # Passthrough channels (to hosts outside the registry) carry an empty authority.
    return None if key[2] == "" else (key[0], key[1])


def _millis(seconds: float) -> int:
    return min(_MAX_INT32, max(1, round(seconds * 1000)))


def pool_options(pool: ConnectionPoolSettings | None) -> list[tuple[str, int]]:
    """A cluster's DestinationRule ``connectionPool`` timeouts as grpcio channel options.

    ``tcp.connectTimeout`` bounds every connection attempt (grpc core's min connect
    timeout, the back-off kept below it); ``http.idleTimeout`` is how long the channel
    keeps its connection without calls (``grpc.client_idle_timeout_ms``: it then goes
    IDLE, closes the connection, and reconnects on the next call), as Envoy closes an idle
    upstream connection. As over HTTP, they apply whenever a ``connectionPool`` is set.
    """
    if pool is None:
        return []
    connect = _millis(pool.tcp.connect_timeout)
    backoff = max(1, int(connect / _BACKOFF_JITTER))
    options = [
        ("grpc.min_reconnect_backoff_ms", connect),
        ("grpc.initial_reconnect_backoff_ms", min(_INITIAL_BACKOFF_MS, backoff)),
        ("grpc.max_reconnect_backoff_ms", min(_MAX_BACKOFF_MS, backoff)),
    ]
    if pool.http.idle_timeout is not None:
        options.append(("grpc.client_idle_timeout_ms", _millis(pool.http.idle_timeout)))
    return options


class Hold:
    """What one attempt holds until its call ends: a channel use, an active-request count,
    a connection-pool admission. ``release`` is idempotent (callbacks may race)."""

    __slots__ = ("entry", "limits", "released", "stats")

    def __init__(self, entry: Entry[Any], stats: EndpointStats, limits: EndpointLimits | None):
        self.entry = entry
        self.stats = stats
        self.limits = limits
        self.released = False


def address_target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class Express(NamedTuple):
    """What the express attempt (``inmesh.flow.express``) of a call without metadata to one
    upstream plan needs, the same on every call and so made once per snapshot: the
    metadata it sends and the pick context its endpoint is drawn with."""

    metadata: Any
    pick: PickContext


class CallSpec(NamedTuple):
    """What a multi-callable was made for: shape, method path, (de)serializers."""

    shape: str  # "unary_unary", "unary_stream", "stream_unary", "stream_stream"
    method: str
    request_serializer: Callable[[Any], bytes] | None
    response_deserializer: Callable[[bytes], Any] | None
    registered: Any


# --------------------------------------------------------------------------- shared core


class ChannelCore:
    """What the sync and aio mesh channels share: the target, planning, endpoint channels,
    attempt bookkeeping, delivery. Subclasses make and close the grpcio channels."""

    def __init__(
        self,
        mesh: Mesh,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        credentials: Any = None,
        seed: int | None = None,
    ) -> None:
        self.mesh = mesh
        self.target = target
        self.host, self.port = split_target(target)
        self.authority = f"{self.host}:{self.port}"
        self.options = tuple(options)
        self.credentials = credentials
        # Drawn from the Mesh's own seeds when not given: a seeded Mesh makes the same
        # choices run after run, as its HTTP transports do.
        self.rng = random.Random(seed if seed is not None else mesh._next_seed())
        self.pick = PickContext(rng=self.rng)
        self.source = mesh.source_id
        self.channels: EndpointResources[ChannelKey, Any] = EndpointResources(
            self.open_channel, _channel_endpoint
        )
        self.mirrors = MirrorGate(mesh.state)
        # By method, for calls without metadata: the same request every time, planned
        # once per snapshot; with the ``Express`` of each upstream plan that ``express``
        # admits, by the plan's id.
        self.prepared: dict[str, tuple[_View, Prepared, dict[int, Express]]] = {}
        self.closed = False

    # -- grpcio channels (the flavour's own)

    def make_channel(self, target: str, options: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError

    def close_channel(self, channel: Any) -> None:
        raise NotImplementedError

    def open_channel(self, key: ChannelKey) -> Any:
        address, port, authority, pool = key
        if not authority:  # passthrough: the target as the caller named it
            return self.make_channel(self.target, list(self.options))
        options = [(k, v) for k, v in self.options if k not in _OWN_KEYS]
        given = {k for k, _ in options}  # the caller's own options win
        defaults: list[tuple[str, Any]] = [
            ("grpc.default_authority", authority),
            *pool_options(pool),
        ]
        options.extend((k, v) for k, v in defaults if k not in given)
        return self.make_channel(address_target(address, port), [*_OWN_OPTIONS, *options])

    # -- planning

    def first_metadata(self, upstream: Upstream) -> Any:
        """What the first attempt of a call without metadata sends to ``upstream`` (made
        once, then shared by every such call: a tuple)."""
        return tuple(attempt_metadata(None, upstream, 1))

    def start(self, method: str, metadata: Any) -> tuple[Snapshot, _View, Plan, Express | None]:
        """The call's snapshot, request view and plan, and, if its first attempt may go the
        express way (``inmesh.flow.express``: only calls without metadata), what that
        attempt needs; else None."""
        if self.closed:
            raise ValueError("Cannot invoke RPC on closed channel!")
        snapshot = self.mesh.snapshot
        if snapshot.version != self.channels.version:
            for channel in self.channels.retire(snapshot.endpoint_keys, snapshot.version):
                self.close_channel(channel)
            self.prepared.clear()  # made from older snapshots, which they would keep alive
        if metadata:
            view = _View(self.host, self.port, self.authority, method, metadata)
            return snapshot, view, plan(snapshot, view, self.rng, source=self.source), None
        found = self.prepared.get(method)
        if found is None or found[1].snapshot is not snapshot:
            view = _View(self.host, self.port, self.authority, method, None)
            if len(self.prepared) >= _PREPARED_CAP:  # method names are the caller's to choose
                self.prepared.clear()
            prepared = prepare(snapshot, view, source=self.source)
            fast = {
                id(u): Express(self.first_metadata(u), self.pick_for(u))
                for u in prepared.upstreams()
                if express(u, snapshot.mesh_config)
            }
            found = self.prepared[method] = (view, prepared, fast)
        view, prepared, fast = found
        decision = prepared(self.rng)
        return snapshot, view, decision, fast.get(id(decision))

    def flow(
        self,
        snapshot: Snapshot,
        view: _View,
        decision: Plan,
        *,
        replayable: bool,
        deadline: float | None,
        first: tuple[Send, Attempted] | None = None,
    ) -> Generator[Command, Any, Finish]:
        """The attempt flow of an upstream call, or the passthrough's one-attempt flow;
        ``first``: an express call's first attempt, not settled (see ``inmesh.flow``)."""
        if not isinstance(decision, Upstream):
            return self._passthrough_flow(view, deadline)
        return _attempt_flow(
            decision,
            view,
            rng=self.rng,
            now=time.monotonic(),
            replayable=replayable,
            mesh_config=snapshot.mesh_config,
            pick=self.pick_for(decision),
            grpc=True,
            deadline=deadline,
            first=first,
        )

    def pick_for(self, upstream: Upstream) -> PickContext:
        """What an upstream call's picks use: the channel's generator, and the plan's hash
        key when the cluster hashes."""
        if upstream.hash_key is None:
            return self.pick
        return PickContext(rng=self.rng, hash_key=upstream.hash_key)

    def _passthrough_flow(
        self, view: _View, deadline: float | None
    ) -> Generator[Command, Any, Finish]:
        """A host outside the registry (ALLOW_ANY): the test overlay's faults, then one
        attempt to the target as named."""
        injected = False
        if OVERLAY.active:
            injection = OVERLAY.match(
                host=view.host,
                method=view.method,
                path=view.path,
                header=view.header,
                subset=None,
                grpc=True,
            )
            if injection is not None:
                injected = True
                if injection.delay:
                    yield Wait(injection.delay)
                if injection.abort_status is not None or injection.grpc_status is not None:
                    reply = fault_abort(injection.abort_status, injection.grpc_status)
                    return Finish(reply, None, 0, None, injected=True)
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return Finish(LocalReply(504, TIMEOUT_BODY), None, 0, None, injected)
        endpoint = Endpoint(address=self.host, port=self.port)
        done: Attempted = yield Send(endpoint, 1, timeout, None)
        return Finish(None, done.result, 1, endpoint, injected)

    @staticmethod
    def wait_seconds(command: Wait, deadline: float | None) -> float:
        """A wait cut at the caller's deadline: the caller's timeout counts every wait."""
        if deadline is None:
            return command.seconds
        return max(0.0, min(command.seconds, deadline - time.monotonic()))

    # -- attempts

    def enter(
        self, upstream: Upstream | None, endpoint: Endpoint
    ) -> tuple[Entry[Any], EndpointStats]:
        """Take the endpoint channel of an attempt and count the attempt active; ``leave``
        gives both back. (The blocking and the aio drivers pair them themselves; the
        callback-driven ones take a ``Hold``, whose release may race.)"""
        if upstream is None:
            key: ChannelKey = (endpoint.address, endpoint.port, "", None)
        else:
            key = (
                endpoint.address,
                endpoint.port,
                upstream.authority or self.authority,
                upstream.cluster.policy.connection_pool,
            )
        entry = self.channels.acquire(key)
        # A channel serves one endpoint: its figures are looked up once and kept with it
        # (the stats table hands out the same object for as long as one is held).
        stats = entry.cache.get(_STATS)
        if stats is None:
            stats = entry.cache[_STATS] = self.mesh.stats.get(endpoint.key)
        stats.calls.append(None)  # ``stats.begin()``: one call fewer on every attempt
        return entry, stats

    def leave(self, entry: Entry[Any], stats: EndpointStats, limits: EndpointLimits | None) -> None:
        try:  # noqa: SIM105 -- ``stats.end()``, one call fewer on every attempt
            stats.calls.pop()
        except IndexError:  # floored at zero, as ``end()`` floors it
            pass
        if limits is not None:
            limits.release()
        if self.channels.release(entry):
            self.close_channel(entry.resource)

    def hold(self, upstream: Upstream | None, send: Send) -> Hold:
        entry, stats = self.enter(upstream, send.endpoint)
        return Hold(entry, stats, send.limits)

    def release(self, hold: Hold) -> None:
        if hold.released:
            return
        hold.released = True
        self.leave(hold.entry, hold.stats, hold.limits)

    @staticmethod
    def callable(entry: Entry[Any], spec: CallSpec, upstream: Upstream | None) -> Any:
        """The endpoint channel's multi-callable for ``spec`` (made once per channel)."""
        path = spec.method if upstream is None or upstream.path is None else upstream.path
        key = spec if path is spec.method else (spec, path)
        found = entry.cache.get(key)
        if found is None:
            make = getattr(entry.resource, spec.shape)
            if spec.registered:
                found = make(
                    path,
                    request_serializer=spec.request_serializer,
                    response_deserializer=spec.response_deserializer,
                    _registered_method=spec.registered,
                )
            else:
                found = make(
                    path,
                    request_serializer=spec.request_serializer,
                    response_deserializer=spec.response_deserializer,
                )
            entry.cache[key] = found
        return found

    # -- mirroring (unary calls)

    def mirror_admit(self, snapshot: Snapshot) -> bool:
        return self.mirrors.admit(snapshot.mesh_config.mirror_max_in_flight)

    def mirror_done(self) -> None:
        self.mirrors.done()

    def mirror_hold(self, upstream: Upstream) -> Hold | None:
        """The endpoint channel a mirrored copy goes to, held; None when there is none."""
        cluster = upstream.mirror
        assert cluster is not None
        endpoint = cluster.balancer.pick(self.pick)
        if endpoint is None:
            return None
        authority = _shadow(upstream.authority or self.authority)
        key = (endpoint.address, endpoint.port, authority, cluster.policy.connection_pool)
        hold = Hold(self.channels.acquire(key), self.mesh.stats.get(endpoint.key), None)
        hold.stats.begin()
        return hold

    # -- delivery

    def record(self, view: _View, upstream: Upstream | None, finish: Finish) -> None:
        """Tell the pytest plugin's overlay how a call went (only while it records)."""
        result = finish.result
        grpc_status: str | None
        if finish.reply is not None:
            grpc_status = reply_code(finish.reply).name
        elif isinstance(result, grpc.RpcError) and hasattr(result, "code"):
            grpc_status = result.code().name
        else:
            grpc_status = "OK"
        OVERLAY.record(
            CallRecord(
                host=view.host,
                method=view.method,
                path=view.path,
                subset=None if upstream is None else upstream.cluster.key.subset,
                endpoint=None if finish.endpoint is None else str(finish.endpoint),
                status=None,
                grpc_status=grpc_status,
                attempts=finish.attempts,
                injected=finish.injected,
                error=None,
            )
        )

    def local_error(self, reply: LocalReply, upstream: Upstream | None) -> BaseException:
        """The flavour's error for a local reply."""
        raise NotImplementedError

    def deliver(self, view: _View, upstream: Upstream | None, finish: Finish) -> Any:
        """The last attempt's result, or raise the call's error."""
        if OVERLAY.active and OVERLAY.recording:  # active: a plain attribute, read first
            self.record(view, upstream, finish)
        if finish.reply is not None:
            raise self.local_error(finish.reply, upstream)
        result = finish.result
        if isinstance(result, BaseException):
            raise result
        return result

    def where(self, upstream: Upstream | None) -> str:
        if upstream is None:
            return self.authority
        return f"{self.authority} via {upstream.cluster.name}"


def upstream_of(decision: Plan) -> Upstream | None:
    return decision if isinstance(decision, Upstream) else None


# --------------------------------------------------------------------------- sync channel


class MeshChannel(grpc.Channel):  # type: ignore[misc]  # grpc is untyped
    """A ``grpc.Channel`` to the logical ``target`` (``"ratings:9090"``), routed by the mesh.

    ``options`` and ``credentials`` go to every endpoint channel (insecure when
    ``credentials`` is None). Generated stubs work unchanged.
    """

    def __init__(
        self,
        mesh: Mesh,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        credentials: Any = None,
        seed: int | None = None,
    ) -> None:
        self._core = _SyncCore(mesh, target, options=options, credentials=credentials, seed=seed)
        self._subscribers: list[Callable[[Any], None]] = []

    @property
    def target(self) -> str:
        return self._core.target

    def _spec(self, shape: str, method: str, ser: Any, deser: Any, registered: Any) -> CallSpec:
        if isinstance(method, bytes):
            method = method.decode()
        return CallSpec(shape, method, ser, deser, registered)

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _UnaryResponseCallable:
        spec = self._spec(
            "unary_unary", method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryResponseCallable(self._core, spec, replayable=True)

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _UnaryResponseCallable:
        spec = self._spec(
            "stream_unary", method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryResponseCallable(self._core, spec, replayable=False)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _StreamResponseCallable:
        spec = self._spec(
            "unary_stream", method, request_serializer, response_deserializer, _registered_method
        )
        return _StreamResponseCallable(self._core, spec, replayable=True)

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _StreamResponseCallable:
        spec = self._spec(
            "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )
        return _StreamResponseCallable(self._core, spec, replayable=False)

    def subscribe(
        self,
        callback: Callable[[Any], None],
        try_to_connect: bool = False,  # noqa: ARG002 -- endpoint channels connect on demand
    ) -> None:
        """The mesh channel has no connection of its own: it takes calls at once and its
        endpoint channels connect on demand, so it reports READY (SHUTDOWN once closed)."""
        self._subscribers.append(callback)
        state = (
            grpc.ChannelConnectivity.SHUTDOWN
            if self._core.closed
            else grpc.ChannelConnectivity.READY
        )
        callback(state)

    def unsubscribe(self, callback: Callable[[Any], None]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    def close(self) -> None:
        """Close every endpoint channel (calls in flight are cancelled, as grpcio does)."""
        core = self._core
        if core.closed:
            return
        core.closed = True
        for channel in core.channels.drain():
            channel.close()
        for callback in list(self._subscribers):
            with contextlib.suppress(Exception):
                callback(grpc.ChannelConnectivity.SHUTDOWN)
        self._subscribers.clear()

    def __enter__(self) -> MeshChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MeshChannel {self._core.target}>"


class _SyncCore(ChannelCore):
    def make_channel(self, target: str, options: list[tuple[str, Any]]) -> Any:
        if self.credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self.credentials, options=options)

    def close_channel(self, channel: Any) -> None:
        channel.close()

    def local_error(self, reply: LocalReply, upstream: Upstream | None) -> BaseException:
        return _sync_local_error(reply, self.where(upstream))

    def mirror(self, spec: CallSpec, request: Any, metadata: Any, upstream: Upstream) -> None:
        """Send a copy of a unary call to the mirror cluster; its answer is dropped."""
        hold = None
        try:
            hold = self.mirror_hold(upstream)
            if hold is None:
                self.mirror_done()
                return
            future = self.callable(hold.entry, spec, upstream).future(
                request,
                timeout=MIRROR_TIMEOUT,
                metadata=attempt_metadata(metadata, upstream, 1),
            )
        except Exception as exc:
            log.debug("mirror of %s failed: %s", spec.method, exc)
            if hold is not None:
                self.release(hold)
            self.mirror_done()
            return

        def done(_: Any) -> None:
            assert hold is not None
            self.release(hold)
            self.mirror_done()

        future.add_done_callback(done)


class _Extra(NamedTuple):
    """The per-call grpcio arguments passed through to every attempt."""

    credentials: Any
    wait_for_ready: Any
    compression: Any


_NO_EXTRA = _Extra(None, None, None)


def _extra(credentials: Any, wait_for_ready: Any, compression: Any) -> _Extra:
    if credentials is None and wait_for_ready is None and compression is None:
        return _NO_EXTRA
    return _Extra(credentials, wait_for_ready, compression)


class _UnaryResponseCallable(grpc.UnaryUnaryMultiCallable, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]  # grpc is untyped
    """Unary-unary and stream-unary: ``__call__``, ``with_call`` and ``future``."""

    __slots__ = ("_core", "_replayable", "_spec")

    def __init__(self, core: _SyncCore, spec: CallSpec, *, replayable: bool) -> None:
        self._core = core
        self._spec = spec
        self._replayable = replayable

    def __call__(  # noqa: PLR0917 -- grpcio's positional signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: Any = None,
        compression: Any = None,
    ) -> Any:
        if credentials is None and wait_for_ready is None and compression is None:
            return self._blocking(request, timeout, metadata, _NO_EXTRA, False)  # the usual call
        extra = _Extra(credentials, wait_for_ready, compression)
        return self._blocking(request, timeout, metadata, extra, False)

    def with_call(  # noqa: PLR0917 -- grpcio's positional signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: Any = None,
        compression: Any = None,
    ) -> tuple[Any, Any]:
        extra = _extra(credentials, wait_for_ready, compression)
        response, call = self._blocking(request, timeout, metadata, extra, True)
        return response, call

    def future(  # noqa: PLR0917 -- grpcio's positional signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: Any = None,
        compression: Any = None,
    ) -> _FlowFuture:
        extra = _extra(credentials, wait_for_ready, compression)
        call = _FlowFuture(self, request, timeout, metadata, extra)
        call.start()
        return call

    def _blocking(
        self, request: Any, timeout: float | None, metadata: Any, extra: _Extra, with_call: bool
    ) -> Any:
        """Run the flow on this thread: the response, or with ``with_call`` the response and
        the last attempt's ``grpc.Call`` (grpcio's ``with_call`` costs ~20 µs more a call)."""
        core = self._core
        deadline = None if timeout is None else time.monotonic() + timeout
        snapshot, view, decision, fast = core.start(self._spec.method, metadata)
        if isinstance(decision, LocalReply):
            return core.deliver(view, None, Finish(decision, None, 0, None))
        upstream = decision if isinstance(decision, Upstream) else None
        first = None
        if fast is not None and not OVERLAY.active:
            # The express way (``inmesh.flow``): the first attempt without the flow, which
            # takes over only if that attempt is not a plain success. A call that returns
            # is one (status OK): it is recorded and delivered here, with no Attempted.
            assert upstream is not None
            sent = express_send(upstream, fast.pick, time.monotonic(), deadline)
            if isinstance(sent, Finish):
                return core.deliver(view, upstream, sent)
            started = time.monotonic()
            try:
                result = self._send(request, None, extra, upstream, sent, with_call, fast.metadata)
            except grpc.RpcError as error:
                now = time.monotonic()
                attempted = Attempted(outcome_of(error, sent.timeout, now - started), error, now)
                first = (sent, attempted)
            except BaseException:
                express_abandon(upstream, time.monotonic())
                raise
            else:
                express_succeeded(upstream, sent.endpoint, time.monotonic())
                if OVERLAY.active and OVERLAY.recording:  # switched on since the call began
                    core.record(view, upstream, Finish(None, result, 1, sent.endpoint))
                return self._delivered(result, upstream, with_call) if with_call else result
        elif (
            upstream is not None
            and upstream.mirror is not None
            and self._replayable
            and core.mirror_admit(snapshot)
        ):
            core.mirror(self._spec, request, metadata, upstream)
        flow = core.flow(
            snapshot, view, decision, replayable=self._replayable, deadline=deadline, first=first
        )
        try:
            command = next(flow)
            while True:
                if isinstance(command, Send):
                    attempted = self._attempt(
                        request, metadata, extra, upstream, command, with_call
                    )
                    command = flow.send(attempted)
                elif isinstance(command, Wait):
                    time.sleep(core.wait_seconds(command, deadline))
                    command = flow.send(time.monotonic())
                else:  # Discard: a failed unary attempt holds nothing open
                    command = flow.send(None)
        except StopIteration as stop:
            finish = stop.value
        finally:
            flow.close()
        return self._delivered(core.deliver(view, upstream, finish), upstream, with_call)

    @staticmethod
    def _delivered(result: Any, upstream: Upstream | None, with_call: bool) -> Any:
        if with_call and upstream is not None and upstream.response_ops:
            response, call = result
            return response, _EditedCall(call, upstream)
        return result

    def _attempt(  # noqa: PLR0917 -- private, one call site
        self,
        request: Any,
        metadata: Any,
        extra: _Extra,
        upstream: Upstream | None,
        send: Send,
        with_call: bool,
    ) -> Attempted:
        started = time.monotonic()
        try:
            result = self._send(request, metadata, extra, upstream, send, with_call)
        except grpc.RpcError as error:
            now = time.monotonic()
            return Attempted(outcome_of(error, send.timeout, now - started), error, now)
        return _tuple(Attempted, (_OK, result, time.monotonic()))

    def _send(  # noqa: PLR0917 -- private
        self,
        request: Any,
        metadata: Any,
        extra: _Extra,
        upstream: Upstream | None,
        send: Send,
        with_call: bool,
        sent: Any = None,
    ) -> Any:
        """Make one attempt on this thread, holding its endpoint channel while it lasts: its
        result, or the ``grpc.RpcError`` it raised. ``sent``: the metadata it sends, when
        known already (an express attempt's); else ``attempt_metadata``'s."""
        core = self._core
        try:
            entry, stats = core.enter(upstream, send.endpoint)
        except BaseException:
            if send.limits is not None:
                send.limits.release()
            raise
        try:
            callable_ = core.callable(entry, self._spec, upstream)
            if with_call:
                callable_ = callable_.with_call
            if sent is None:
                sent = attempt_metadata(metadata, upstream, send.attempt)
            if extra is _NO_EXTRA:  # grpcio's own defaults: fewer arguments to pass
                return callable_(request, send.timeout, sent)
            return callable_(request, send.timeout, sent, *extra)
        finally:
            core.leave(entry, stats, send.limits)


class _FlowFuture(grpc.Future, grpc.Call):  # type: ignore[misc]  # grpc is untyped
    """A unary-response call driven without blocking: attempts by grpcio futures, waits by
    the watchdog's timers. Each step of the flow runs under ``_lock`` (re-entrant: a
    grpcio future that is already done calls back at once)."""

    def __init__(
        self,
        callable_: _UnaryResponseCallable,
        request: Any,
        timeout: float | None,
        metadata: Any,
        extra: _Extra,
    ) -> None:
        self._owner = callable_
        self._request = request
        self._metadata = metadata
        self._extra = extra
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._callbacks: list[Callable[[Any], None]] = []
        self._flow: Generator[Command, Any, Finish] | None = None
        self._view: _View | None = None
        self._upstream: Upstream | None = None
        self._current: Any = None  # the attempt in flight (a grpcio future)
        self._timer: Timer | None = None
        self._cancelled = False
        self._response: Any = None
        self._call: Any = None  # the last attempt's grpc.Call, or the error
        self._error: BaseException | None = None

    # -- driving

    def start(self) -> None:
        core = self._owner._core
        try:
            snapshot, view, decision, _ = core.start(self._owner._spec.method, self._metadata)
        except Exception as exc:
            self._set(None, None, exc)
            return
        self._view = view
        if isinstance(decision, LocalReply):
            self._complete(Finish(decision, None, 0, None))
            return
        upstream = self._upstream = upstream_of(decision)
        if (
            upstream is not None
            and upstream.mirror is not None
            and self._owner._replayable
            and core.mirror_admit(snapshot)
        ):
            core.mirror(self._owner._spec, self._request, self._metadata, upstream)
        self._flow = core.flow(
            snapshot,
            view,
            decision,
            replayable=self._owner._replayable,
            deadline=self._deadline,
        )
        self._advance(None, first=True)

    def _advance(self, value: Any, *, first: bool = False) -> None:
        with self._lock:
            flow = self._flow
            if flow is None or self._done.is_set():
                return
            try:
                command = next(flow) if first else flow.send(value)
                while True:
                    if self._cancelled:
                        flow.close()
                        self._set(None, None, cancelled_error())
                        return
                    if isinstance(command, Send):
                        self._send(command)
                        return
                    if isinstance(command, Wait):
                        seconds = ChannelCore.wait_seconds(command, self._deadline)
                        self._timer = watchdog.arm(time.monotonic() + seconds, self._waited)
                        return
                    command = flow.send(None)
            except StopIteration as stop:
                self._complete(stop.value)
            except BaseException as exc:
                flow.close()
                self._set(None, None, exc)

    def _waited(self) -> None:
        self._timer = None
        self._advance(time.monotonic())

    def _send(self, send: Send) -> None:
        core = self._owner._core
        upstream = self._upstream
        hold = core.hold(upstream, send)
        started = time.monotonic()
        try:
            future = core.callable(hold.entry, self._owner._spec, upstream).future(
                self._request,
                timeout=send.timeout,
                metadata=attempt_metadata(self._metadata, upstream, send.attempt),
                credentials=self._extra.credentials,
                wait_for_ready=self._extra.wait_for_ready,
                compression=self._extra.compression,
            )
        except BaseException:
            core.release(hold)
            raise
        self._current = future

        def attempted(done: Any) -> None:
            core.release(hold)
            now = time.monotonic()
            if done.cancelled():
                with self._lock:
                    if self._flow is not None:
                        self._flow.close()
                    self._set(None, None, cancelled_error())
                return
            error = done.exception()
            if error is None:
                self._advance(Attempted(_OK, (done.result(), done), now))
            else:
                self._advance(Attempted(outcome_of(error, send.timeout, now - started), error, now))

        future.add_done_callback(attempted)

    def _complete(self, finish: Finish) -> None:
        assert self._view is not None
        try:
            response, call = self._owner._core.deliver(self._view, self._upstream, finish)
        except BaseException as error:
            self._set(None, error, error)
        else:
            self._set(response, call, None)

    def _set(self, response: Any, call: Any, error: BaseException | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._response, self._call, self._error = response, call, error
            self._current = None
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("gRPC future callback %r failed", callback)

    # -- grpc.Future

    def cancel(self) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self._cancelled = True
            current, timer = self._current, self._timer
        if current is not None:
            current.cancel()
        if current is None or timer is not None:
            if timer is not None:
                timer.cancel()
            with self._lock:
                if self._flow is not None:
                    self._flow.close()
                self._set(None, None, cancelled_error())
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def running(self) -> bool:
        return not self._done.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def _wait(self, timeout: float | None) -> None:
        if not self._done.wait(timeout):
            raise grpc.FutureTimeoutError()

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._error is not None:
            if self._cancelled:
                raise grpc.FutureCancelledError()
            raise self._error
        return self._response

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        if self._cancelled:
            raise grpc.FutureCancelledError()
        return self._error

    def traceback(self, timeout: float | None = None) -> Any:
        error = self.exception(timeout)
        return None if error is None else error.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # -- grpc.Call (of the last attempt, once done)

    def _finished_call(self) -> Any:
        self._done.wait()
        return self._call if self._call is not None else self._error

    def initial_metadata(self) -> Any:
        call = self._finished_call()
        if self._error is None:  # answered: the route's edits apply (never to an error)
            return edited_initial_metadata(call.initial_metadata(), self._upstream)
        return call.initial_metadata() if hasattr(call, "initial_metadata") else ()

    def trailing_metadata(self) -> Any:
        call = self._finished_call()
        return call.trailing_metadata() if hasattr(call, "trailing_metadata") else ()

    def code(self) -> Any:
        call = self._finished_call()
        return call.code() if hasattr(call, "code") else _Code.UNKNOWN

    def details(self) -> Any:
        call = self._finished_call()
        return call.details() if hasattr(call, "details") else str(call)

    def is_active(self) -> bool:
        return not self._done.is_set()

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self._callbacks.append(lambda _: callback())
            return True


# --------------------------------------------------------------------------- streaming responses


_NOTHING: Any = object()


class Started(NamedTuple):
    """An attempt whose response stream began: the call and its first message (or
    ``_NOTHING`` when the stream ended without one)."""

    call: Any
    first: Any


class _StreamResponseCallable(grpc.UnaryStreamMultiCallable, grpc.StreamStreamMultiCallable):  # type: ignore[misc]  # grpc is untyped
    """Unary-stream and stream-stream: the call starts when first touched."""

    __slots__ = ("_core", "_replayable", "_spec")

    def __init__(self, core: _SyncCore, spec: CallSpec, *, replayable: bool) -> None:
        self._core = core
        self._spec = spec
        self._replayable = replayable

    def __call__(  # noqa: PLR0917 -- grpcio's positional signature
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: Any = None,
        compression: Any = None,
    ) -> _StreamCall:
        extra = _extra(credentials, wait_for_ready, compression)
        return _StreamCall(self, request, timeout, metadata, extra)


class _StreamCall(grpc.Call, grpc.Future):  # type: ignore[misc]  # grpc is untyped
    """A streaming-response call: an iterator of messages, a ``grpc.Call`` and a
    ``grpc.Future``, like grpcio's own. The flow runs, on the thread that first touches
    the call, until an attempt's first message arrives; the rest is that attempt's stream.
    """

    def __init__(
        self,
        callable_: _StreamResponseCallable,
        request: Any,
        timeout: float | None,
        metadata: Any,
        extra: _Extra,
    ) -> None:
        self._owner = callable_
        self._request = request
        self._metadata = metadata
        self._extra = extra
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._lock = threading.Lock()
        self._started = False
        self._cancelled = False
        self._current: Any = None  # the attempt in flight
        self._call: Any = None  # the delivered attempt's grpcio call
        self._first: Any = _NOTHING
        self._error: BaseException | None = None
        self._upstream: Upstream | None = None  # the delivered attempt's plan
        self._pending: list[tuple[str, Any]] = []  # callbacks added before the start

    def _ensure(self) -> None:
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            try:
                if self._cancelled:
                    raise cancelled_error()
                started: Started = self._run()
                self._call, self._first = started
            except BaseException as error:
                self._error = error
            self._started = True
        self._attach_pending()

    def _run(self) -> Started:
        owner = self._owner
        core = owner._core
        snapshot, view, decision, _ = core.start(owner._spec.method, self._metadata)
        if isinstance(decision, LocalReply):
            return core.deliver(view, None, Finish(decision, None, 0, None))  # type: ignore[no-any-return]
        upstream = self._upstream = upstream_of(decision)
        deadline = self._deadline
        flow = core.flow(snapshot, view, decision, replayable=owner._replayable, deadline=deadline)
        try:
            command = next(flow)
            while True:
                if isinstance(command, Send):
                    command = flow.send(self._attempt(upstream, command))
                elif isinstance(command, Wait):
                    time.sleep(core.wait_seconds(command, deadline))
                    command = flow.send(time.monotonic())
                else:  # Discard: a failed attempt's call has ended already
                    command = flow.send(None)
        except StopIteration as stop:
            finish: Finish = stop.value
        finally:
            flow.close()
        return core.deliver(view, upstream, finish)  # type: ignore[no-any-return]

    def _attempt(self, upstream: Upstream | None, send: Send) -> Attempted:
        core = self._owner._core
        hold = core.hold(upstream, send)
        started = time.monotonic()
        try:
            call = core.callable(hold.entry, self._owner._spec, upstream)(
                self._request,
                timeout=send.timeout,
                metadata=attempt_metadata(self._metadata, upstream, send.attempt),
                credentials=self._extra.credentials,
                wait_for_ready=self._extra.wait_for_ready,
                compression=self._extra.compression,
            )
        except BaseException:
            core.release(hold)
            raise
        if not call.add_callback(lambda: core.release(hold)):
            core.release(hold)
        self._current = call
        if self._cancelled:
            call.cancel()
        try:
            first = next(call)
        except StopIteration:
            return Attempted(_OK, Started(call, _NOTHING), time.monotonic())
        except grpc.RpcError as error:
            now = time.monotonic()
            return Attempted(outcome_of(error, send.timeout, now - started), error, now)
        return Attempted(_OK, Started(call, first), time.monotonic())

    def _attach_pending(self) -> None:
        pending, self._pending = self._pending, []
        for kind, fn in pending:
            if kind == "done":
                self.add_done_callback(fn)
            else:
                self.add_callback(fn)

    # -- iteration

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self._ensure()
        if self._error is not None:
            raise self._error
        first = self._first
        if first is not _NOTHING:
            self._first = _NOTHING
            return first
        return next(self._call)

    next = __next__

    # -- grpc.Call

    def _target(self) -> Any:
        self._ensure()
        return self._call if self._error is None else self._error

    def initial_metadata(self) -> Any:
        target = self._target()
        if self._error is None:  # answered: the route's response edits apply
            return edited_initial_metadata(target.initial_metadata(), self._upstream)
        return target.initial_metadata() if hasattr(target, "initial_metadata") else ()

    def trailing_metadata(self) -> Any:
        target = self._target()
        return target.trailing_metadata() if hasattr(target, "trailing_metadata") else ()

    def code(self) -> Any:
        target = self._target()
        return target.code() if hasattr(target, "code") else _Code.UNKNOWN

    def details(self) -> Any:
        target = self._target()
        return target.details() if hasattr(target, "details") else str(target)

    def debug_error_string(self) -> str:
        target = self._target()
        return str(target.debug_error_string()) if hasattr(target, "debug_error_string") else ""

    def is_active(self) -> bool:
        if not self._started:
            return not self._cancelled
        return self._error is None and bool(self._call.is_active())

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def cancel(self) -> bool:
        if self._started:
            if self._error is not None:
                return False
            return bool(self._call.cancel())
        self._cancelled = True
        current = self._current
        if current is not None:
            current.cancel()
        return True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if not self._started:
            self._pending.append(("call", callback))
            return True
        if self._error is not None:
            return False
        return bool(self._call.add_callback(callback))

    # -- grpc.Future

    def cancelled(self) -> bool:
        if not self._started:
            return self._cancelled
        if self._error is not None:
            return getattr(self._error, "code", lambda: None)() is _Code.CANCELLED
        return bool(self._call.cancelled())

    def running(self) -> bool:
        return self.is_active()

    def done(self) -> bool:
        return not self.is_active()

    def result(self, timeout: float | None = None) -> Any:
        self._ensure()
        if self._error is not None:
            raise self._error
        return self._call.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        self._ensure()
        if self._error is not None:
            return self._error
        return self._call.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        self._ensure()
        if self._error is not None:
            return self._error.__traceback__
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        if not self._started:
            self._pending.append(("done", fn))
            return
        if self._error is not None:
            fn(self)
            return
        self._call.add_done_callback(lambda _: fn(self))
