"""The gRPC adapter against real grpc servers on 127.0.0.1, sync and aio.

Routing, balancing, local replies (redirects included), response header edits, deadlines,
retries, circuit breaking, connection-pool timeouts, outlier detection, faults and
mirroring configured in Istio's YAML and observed on real calls; all four call shapes;
TLS to the logical host name; a generated stub working unchanged. Servers speak raw bytes
(``tests/grpc_helpers.py``). Elapsed times are only compared with a server delay several
times larger (a cut that happened at all), never used as performance figures.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from inmesh import Mesh, UpstreamError
from inmesh.registry import MemoryRegistry
from inmesh.testing.faults import MeshFaults
from inmesh.transports.grpc import MeshChannel, attempt_metadata
from inmesh.transports.grpc_aio import MeshAioChannel, sent_metadata

from .grpc_helpers import (
    GrpcUpstream,
    TcpRelay,
    async_wait_for,
    name_of,
    self_signed,
    service_yaml,
    wait_for,
)

MODES = ["sync", "aio"]
TARGET = "ratings:9090"
GET = "/ratings.Ratings/Get"
Code = grpc.StatusCode


def vs(route: str = "", *, host: str = "ratings", http: str | None = None) -> str:
    """A VirtualService for ``host``: one catch-all route with ``route`` inside, or ``http``."""
    body = http if http is not None else f"  - route: [{{destination: {{host: {host}}}}}]\n{route}"
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:
{body}
"""


def dr(policy: str = "", *, host: str = "ratings", subsets: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
{"  trafficPolicy:" + chr(10) + policy if policy else ""}
{subsets}
"""


SUBSETS = "  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]"


@pytest.fixture
def servers() -> Iterator[Callable[..., list[GrpcUpstream]]]:
    """Start named gRPC servers; all are stopped when the test ends."""
    started: list[GrpcUpstream] = []

    def start(*names: str, credentials: grpc.ServerCredentials | None = None) -> list[GrpcUpstream]:
        new = [GrpcUpstream(name, credentials).start() for name in names]
        started.extend(new)
        return new

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def relays() -> Iterator[Callable[..., TcpRelay]]:
    """Start loopback TCP relays (to a port), or silent listeners; stopped after the test."""
    started: list[TcpRelay] = []

    def start(target: int | None = None) -> TcpRelay:
        relay = TcpRelay(target)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def make_mesh() -> Iterator[Callable[..., Mesh]]:
    """A Mesh over a MemoryRegistry holding the given YAML documents; closed after the test."""
    meshes: list[Mesh] = []

    def make(*documents: str, registry: MemoryRegistry | None = None) -> Mesh:
        registry = registry or MemoryRegistry({"mesh.yaml": "\n---\n".join(documents)})
        mesh = Mesh(registry, seed=1234)
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.close()


Result = bytes | grpc.RpcError


def unary(
    mesh: Mesh,
    mode: str,
    calls: list[tuple[str, list[tuple[str, str]]]] | int = 1,
    *,
    method: str = GET,
    timeout: float | None = None,
    target: str = TARGET,
    credentials: grpc.ChannelCredentials | None = None,
    options: tuple[tuple[str, Any], ...] = (),
) -> list[Result]:
    """Make unary calls through a fresh sync or aio mesh channel; errors are returned."""
    specs = [(method, [])] * calls if isinstance(calls, int) else calls
    if mode == "sync":
        results: list[Result] = []
        with MeshChannel(mesh, target, credentials=credentials, options=options) as channel:
            for path, metadata in specs:
                try:
                    results.append(
                        channel.unary_unary(path)(b"", timeout=timeout, metadata=metadata)
                    )
                except grpc.RpcError as error:
                    results.append(error)
        return results

    async def run() -> list[Result]:
        out: list[Result] = []
        async with MeshAioChannel(
            mesh, target, credentials=credentials, options=options
        ) as channel:
            for path, metadata in specs:
                try:
                    out.append(
                        await channel.unary_unary(path)(b"", timeout=timeout, metadata=metadata)
                    )
                except grpc.aio.AioRpcError as error:
                    out.append(error)
        return out

    return asyncio.run(run())


def one(mesh: Mesh, mode: str, **options: Any) -> Result:
    return unary(mesh, mode, 1, **options)[0]


def code(result: Result) -> Any:
    return result.code() if isinstance(result, grpc.RpcError) else Code.OK


# ------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("mode", MODES)
def test_routes_by_method_path_and_metadata(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """The method path is the uri and metadata are headers: an admin call from jason goes
    to v2, everything else to v1; upstreams see the logical authority and the caller's
    metadata (every attempt carries x-envoy-attempt-count, the first "1")."""
    v1, v2 = servers("v1", "v2")
    mesh = make_mesh(
        service_yaml("ratings", [v1, v2], labels=[{"version": "v1"}, {"version": "v2"}]),
        dr(subsets=SUBSETS),
        vs(
            http="""  - match: [{uri: {prefix: /ratings.Admin/}, headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: ratings, subset: v2}}]
  - route: [{destination: {host: ratings, subset: v1}}]
"""
        ),
    )
    jason = [("end-user", "jason")]
    results = unary(
        mesh, mode, [("/ratings.Admin/Reset", jason), ("/ratings.Admin/Reset", []), (GET, jason)]
    )
    assert [name_of(r) for r in results] == ["v2", "v1", "v1"]  # type: ignore[arg-type]
    assert v2.calls[0].authority == TARGET
    assert v2.calls[0].metadata["x-envoy-attempt-count"] == "1"
    assert v2.calls[0].metadata["end-user"] == "jason"


@pytest.mark.parametrize("mode", MODES)
def test_weights_split_between_subsets(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A 75/25 weighted route sends calls to both subsets, most to the heavier one."""
    v1, v2 = servers("v1", "v2")
    mesh = make_mesh(
        service_yaml("ratings", [v1, v2], labels=[{"version": "v1"}, {"version": "v2"}]),
        dr(subsets=SUBSETS),
        vs(
            http="""  - route:
    - {destination: {host: ratings, subset: v1}, weight: 75}
    - {destination: {host: ratings, subset: v2}, weight: 25}
"""
        ),
    )
    counts = Counter(name_of(r) for r in unary(mesh, mode, 40))  # type: ignore[arg-type]
    assert counts["v1"] > counts["v2"] > 0


@pytest.mark.parametrize("simple", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_each_simple_balancer_spreads_calls(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], simple: str
) -> None:
    """Each simple load balancer spreads calls over every endpoint (one grpc channel each)."""
    ups = servers("a", "b", "c")
    mesh = make_mesh(service_yaml("ratings", ups), dr(f"    loadBalancer: {{simple: {simple}}}"))
    counts = Counter(name_of(r) for r in unary(mesh, "sync", 30))  # type: ignore[arg-type]
    assert set(counts) == {"a", "b", "c"}
    if simple == "ROUND_ROBIN":
        assert set(counts.values()) == {10}


@pytest.mark.parametrize("mode", MODES)
def test_consistent_hash_on_a_metadata_key(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """consistentHash on a metadata key pins each user to one endpoint."""
    ups = servers("a", "b", "c")
    mesh = make_mesh(
        service_yaml("ratings", ups),
        dr("    loadBalancer: {consistentHash: {httpHeaderName: x-user}}"),
    )
    users = [f"user-{i}" for i in range(8)]
    calls = [(GET, [("x-user", u)]) for u in users for _ in range(3)]
    results = unary(mesh, mode, calls)
    by_user: dict[str, set[str]] = {}
    for (_, metadata), result in zip(calls, results, strict=True):
        by_user.setdefault(metadata[0][1], set()).add(name_of(result))  # type: ignore[arg-type]
    assert all(len(names) == 1 for names in by_user.values())
    assert len({n for names in by_user.values() for n in names}) > 1


# ------------------------------------------------------------------------------ local replies


@pytest.mark.parametrize("mode", MODES)
def test_no_route_is_unimplemented_and_unknown_subset_unavailable(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """No matching route answers UNIMPLEMENTED, an undefined subset UNAVAILABLE, a subset
    without endpoints UNAVAILABLE — all without an upstream call."""
    (up,) = servers("a")
    mesh = make_mesh(
        service_yaml("ratings", [up], labels=[{"version": "v1"}]),
        dr(
            subsets="  subsets: [{name: v1, labels: {version: v1}}, {name: v9, labels: {version: v9}}]"
        ),
        vs(
            http="""  - match: [{uri: {prefix: /ratings.Ratings/Get}}]
    route: [{destination: {host: ratings, subset: v3}}]
  - match: [{uri: {prefix: /ratings.Ratings/Empty}}]
    route: [{destination: {host: ratings, subset: v9}}]
  - match: [{uri: {prefix: /ratings.Ratings/}}]
    route: [{destination: {host: ratings, subset: v1}}]
"""
        ),
    )
    results = unary(
        mesh, mode, [("/other.Svc/Call", []), (GET, []), ("/ratings.Ratings/Empty", [])]
    )
    assert [code(r) for r in results] == [Code.UNIMPLEMENTED, Code.UNAVAILABLE, Code.UNAVAILABLE]
    assert "v3" in results[1].details()  # type: ignore[union-attr]
    assert up.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_local_errors_are_real_rpc_errors(make_mesh: Callable[..., Mesh], mode: str) -> None:
    """A local reply raises a real grpc error (sync: RpcError and Call; aio: AioRpcError)
    with code, details and trailing metadata, the mesh's reason chained."""
    mesh = make_mesh(
        service_yaml("ratings", []),
        vs(http="  - match: [{uri: {prefix: /x}}]\n    route: [{destination: {host: ratings}}]\n"),
    )
    error = one(mesh, mode)
    assert isinstance(error, grpc.RpcError)
    if mode == "sync":
        assert isinstance(error, grpc.Call)
        assert error.trailing_metadata() == ()
        assert error.initial_metadata() == ()
    else:
        assert isinstance(error, grpc.aio.AioRpcError)
        assert tuple(error.trailing_metadata()) == ()
    assert error.code() is Code.UNIMPLEMENTED
    assert "no route" in error.details().lower() or error.details()
    assert isinstance(error.__cause__, UpstreamError)


@pytest.mark.parametrize("mode", MODES)
def test_redirect_is_unknown_and_says_where_it_points(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A redirect route answers UNKNOWN, what a gRPC client makes of Envoy's 301 (a
    trailers-only reply whose grpc-status maps 301 to UNKNOWN), with details and a
    ``location`` trailer naming where it points; the upstream is never called."""
    (up,) = servers("a")
    mesh = make_mesh(
        service_yaml("ratings", [up]),
        vs(
            http="""  - match: [{uri: {prefix: /ratings.Ratings/}}]
    redirect: {uri: /ratings.v2.Ratings/Get}
  - route: [{destination: {host: ratings}}]
"""
        ),
    )
    error = one(mesh, mode)
    location = "http://ratings:9090/ratings.v2.Ratings/Get"
    assert isinstance(error, grpc.RpcError)
    assert (error.code(), error.details()) == (Code.UNKNOWN, f"redirect (301) to {location}")
    assert ("location", location) in tuple(error.trailing_metadata())
    assert isinstance(error.__cause__, UpstreamError)
    assert location in str(error.__cause__)
    assert up.calls == []


# ------------------------------------------------------------------------------ response headers

RESPONSE_EDITS = """    headers:
      response:
        set: {x-set: new}
        add: {x-add: added, x-blob-bin: AAE}
        remove: [x-drop]
"""
SERVER_HEADERS = (("x-set", "old"), ("x-drop", "gone"), ("x-keep", "kept"), ("x-add", "server"))
# Removed, replaced, appended; the -bin value given in base64, as on the wire.
EDITED = Counter(
    [
        ("x-keep", "kept"),
        ("x-add", "server"),
        ("x-set", "new"),
        ("x-add", "added"),
        ("x-blob-bin", b"\x00\x01"),
    ]
)


def _edited_upstream(servers: Callable[..., list[GrpcUpstream]]) -> GrpcUpstream:
    (up,) = servers("a")
    up.initial_metadata = SERVER_HEADERS
    up.trailing_metadata = (("x-drop", "trailer"),)
    return up


def test_response_header_operations_edit_initial_metadata_sync(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """headers.response set/add/remove edit the initial metadata the caller reads, for
    every sync shape (with_call, future, both streams, stream-unary); the trailing metadata
    stay as the server sent them (Envoy edits response headers, not trailers)."""
    up = _edited_upstream(servers)
    mesh = make_mesh(service_yaml("ratings", [up]), vs(RESPONSE_EDITS))
    with MeshChannel(mesh, TARGET) as channel:
        _, unary_call = channel.unary_unary(GET).with_call(b"", timeout=5)
        future = channel.unary_unary(GET).future(b"", timeout=5)
        future.result(timeout=5)
        stream = channel.unary_stream("/ratings.Ratings/StreamAll")(b"", timeout=5)
        _, upload = channel.stream_unary("/ratings.Ratings/Upload").with_call(iter([b"1"]))
        chat = channel.stream_stream("/ratings.Ratings/Chat")(iter([b"p"]), timeout=5)
        calls = [unary_call, future, stream, upload, chat]
        assert [Counter(c.initial_metadata()) for c in calls] == [EDITED] * 5
        assert [len(list(s)) for s in (stream, chat)] == [3, 1]
        assert all(tuple(c.trailing_metadata()) == (("x-drop", "trailer"),) for c in calls)
        assert isinstance(unary_call, grpc.Call) and unary_call.code() is Code.OK


def test_response_header_operations_leave_errors_unedited(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """An error is the upstream's own: its initial metadata carry no route edits, read
    from the error or from the failed call, in every sync shape."""
    up = _edited_upstream(servers)
    mesh = make_mesh(service_yaml("ratings", [up]), vs(RESPONSE_EDITS))
    own = Counter(SERVER_HEADERS)
    with MeshChannel(mesh, TARGET) as channel:
        up.fail_next(1, Code.PERMISSION_DENIED)
        with pytest.raises(grpc.RpcError) as blocking:
            channel.unary_unary(GET).with_call(b"", timeout=5)
        up.fail_next(1, Code.PERMISSION_DENIED)
        future = channel.unary_unary(GET).future(b"", timeout=5)
        with pytest.raises(grpc.RpcError) as failed:
            future.result(timeout=5)
        seen = [blocking.value.initial_metadata(), failed.value.initial_metadata()]
        seen.append(future.initial_metadata())
    assert [Counter(m) for m in seen] == [own] * 3


def test_request_header_operation_on_a_bin_key_sends_bytes(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A request header operation on a ``-bin`` key takes its value in base64 (as on the
    wire) and sends the bytes: grpcio refuses text for binary metadata."""
    (up,) = servers("a")
    mesh = make_mesh(
        service_yaml("ratings", [up]),
        vs("    headers:\n      request:\n        set: {x-trace-bin: AAE}\n"),
    )
    assert code(one(mesh, "sync", timeout=5)) is Code.OK
    assert up.calls[0].binary == {"x-trace-bin": b"\x00\x01"}


def test_response_header_operations_edit_initial_metadata_aio(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """The same edits under grpc.aio: ``await call.initial_metadata()`` of every shape
    carries them, the trailing metadata do not."""
    up = _edited_upstream(servers)
    mesh = make_mesh(service_yaml("ratings", [up]), vs(RESPONSE_EDITS))

    async def run() -> None:
        async with MeshAioChannel(mesh, TARGET) as channel:
            unary_call = channel.unary_unary(GET)(b"", timeout=5)
            await unary_call
            stream = channel.unary_stream("/ratings.Ratings/StreamAll")(b"", timeout=5)
            assert len([m async for m in stream]) == 3
            upload = channel.stream_unary("/ratings.Ratings/Upload")(iter([b"1"]), timeout=5)
            await upload
            chat = channel.stream_stream("/ratings.Ratings/Chat")(iter([b"p"]), timeout=5)
            assert len([m async for m in chat]) == 1
            calls = [unary_call, stream, upload, chat]
            assert [Counter(await c.initial_metadata()) for c in calls] == [EDITED] * 4
            for call in calls:
                assert tuple(await call.trailing_metadata()) == (("x-drop", "trailer"),)

    asyncio.run(run())


# ------------------------------------------------------------------------------ deadlines


@pytest.mark.parametrize("mode", MODES)
def test_route_timeout_and_caller_timeout_tighter_wins(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """The VirtualService timeout cuts a slow call with DEADLINE_EXCEEDED; so does the
    caller's tighter timeout= under a lax route timeout."""
    (slow,) = servers("slow")
    slow.delay = 5
    tight = make_mesh(service_yaml("ratings", [slow]), vs("    timeout: 0.2s"))
    started = time.monotonic()
    assert code(one(tight, mode, timeout=30)) is Code.DEADLINE_EXCEEDED
    lax = make_mesh(service_yaml("ratings", [slow]), vs("    timeout: 30s"))
    assert code(one(lax, mode, timeout=0.2)) is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4  # both cut long before the server's 5 s


def test_per_try_timeout_retries_on_another_endpoint(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """perTryTimeout ends a slow attempt, and the retry goes to an endpoint not yet tried."""
    slow, fast = servers("slow", "fast")
    slow.delay = 5
    mesh = make_mesh(
        service_yaml("ratings", [slow, fast]),
        vs("    retries: {attempts: 2, perTryTimeout: 0.2s, retryOn: reset}"),
        dr("    loadBalancer: {simple: ROUND_ROBIN}"),
    )
    results = unary(mesh, "sync", 2)
    assert [name_of(r) for r in results] == ["fast", "fast"]  # type: ignore[arg-type]
    assert len(slow.calls) >= 1
    assert all(c.metadata["x-envoy-attempt-count"] == "1" for c in slow.calls)  # first tries


# ------------------------------------------------------------------------------ retries


@pytest.mark.parametrize("mode", MODES)
def test_default_policy_retries_unavailable_not_internal(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """Istio's default policy retries UNAVAILABLE (attempts carry x-envoy-attempt-count) and
    gives INTERNAL straight back; retryOn: internal retries it."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))
    up.fail_next(2, Code.UNAVAILABLE)
    assert name_of(one(mesh, mode)) == "a"  # type: ignore[arg-type]
    assert [c.metadata.get("x-envoy-attempt-count") for c in up.calls] == ["1", "2", "3"]
    up.fail_next(1, Code.INTERNAL, "kaput")
    error = one(mesh, mode)
    assert (code(error), error.details()) == (Code.INTERNAL, "kaput")  # type: ignore[union-attr]
    assert len(up.calls) == 4

    retrying = make_mesh(
        service_yaml("ratings", [up]), vs("    retries: {attempts: 1, retryOn: internal}")
    )
    up.fail_next(1, Code.INTERNAL)
    assert code(one(retrying, mode)) is Code.OK
    up.fail_next(2, Code.INTERNAL, "again")
    assert code(one(retrying, mode)) is Code.INTERNAL  # out of attempts: the last real error


@pytest.mark.parametrize("mode", MODES)
def test_per_call_arguments_and_metadata_reach_every_attempt(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """wait_for_ready and compression go with every attempt, the caller's metadata are sent
    in order before x-envoy-attempt-count, and the endpoint counts no call active after."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))
    up.fail_next(1, Code.UNAVAILABLE)
    metadata = (("k", "v"), ("k2", "w"))
    options: dict[str, Any] = {
        "metadata": metadata,
        "wait_for_ready": True,
        "compression": grpc.Compression.Gzip,
    }
    if mode == "sync":
        with MeshChannel(mesh, TARGET) as channel:
            answer = channel.unary_unary(GET)(b"", **options)
    else:

        async def run() -> bytes:
            async with MeshAioChannel(mesh, TARGET) as channel:
                return await channel.unary_unary(GET)(b"", **options)  # type: ignore[no-any-return]

        answer = asyncio.run(run())
    assert name_of(answer) == "a"
    sent = [[(k, v) for k, v in c.metadata.items() if k != "user-agent"] for c in up.calls]
    assert sent == [[("k", "v"), ("k2", "w"), ("x-envoy-attempt-count", str(n))] for n in (1, 2)]
    assert mesh.stats.get((up.address, up.port)).active == 0


def test_attempt_metadata_forms() -> None:
    """What an attempt sends without route edits: the count alone, or after the caller's
    metadata (kept as given), for first tries, retries and counts past nine alike."""
    assert attempt_metadata(None, None, 1) == (("x-envoy-attempt-count", "1"),)
    assert attempt_metadata([], None, 3) == (("x-envoy-attempt-count", "3"),)
    assert attempt_metadata(None, None, 12) == (("x-envoy-attempt-count", "12"),)
    given = [("a", "1"), ("b", b"\x00")]
    assert list(attempt_metadata(given, None, 2)) == [*given, ("x-envoy-attempt-count", "2")]
    assert list(attempt_metadata(given, None, 10)) == [*given, ("x-envoy-attempt-count", "10")]
    assert given == [("a", "1"), ("b", b"\x00")]  # the caller's own list is left alone


@pytest.mark.parametrize(
    ("metadata", "attempt"),
    [(None, 1), (None, 2), (None, 12), ([("a", "1"), ("a", "2"), ("b", b"\x00")], 1)],
)
def test_aio_attempt_metadata_is_a_metadata_with_the_same_pairs(
    metadata: list[tuple[str, Any]] | None, attempt: int
) -> None:
    """grpc.aio gets what ``attempt_metadata`` says, as a ``grpc.aio.Metadata`` whose every
    view (iteration, length, lookups) agrees with it."""
    sent = sent_metadata(metadata, None, attempt)
    pairs = attempt_metadata(metadata, None, attempt)
    assert isinstance(sent, grpc.aio.Metadata)
    assert tuple(sent) == tuple(pairs)
    assert len(sent) == len(pairs)
    assert sent == grpc.aio.Metadata(*pairs)
    assert sent["x-envoy-attempt-count"] == str(attempt)
    assert sent.get_all("a") == [v for k, v in pairs if k == "a"]


@pytest.mark.parametrize("mode", MODES)
def test_stream_retried_only_before_its_first_message(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A unary-stream call that fails before any message is retried; one that breaks after
    its first message reached the caller is not — the caller sees the message, then the error."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))
    up.fail_next(1, Code.UNAVAILABLE)
    assert len(stream(mesh, mode)) == 3
    assert len(up.calls) == 2
    up.fail_after = 1
    got = stream(mesh, mode)
    assert len(got) == 2 and name_of(got[0]) == "a"  # type: ignore[arg-type]
    assert code(got[1]) is Code.UNAVAILABLE
    assert len(up.calls) == 3


def stream(mesh: Mesh, mode: str) -> list[Result]:
    """The messages of one unary-stream call, then its error if it failed."""
    out: list[Result] = []
    if mode == "sync":
        with MeshChannel(mesh, TARGET) as channel:
            try:
                for message in channel.unary_stream("/ratings.Ratings/StreamAll")(b""):
                    out.append(message)  # noqa: PERF402 -- keep what came before an error
            except grpc.RpcError as error:
                out.append(error)
        return out

    async def run() -> None:
        async with MeshAioChannel(mesh, TARGET) as channel:
            try:
                async for message in channel.unary_stream("/ratings.Ratings/StreamAll")(b""):
                    out.append(message)  # noqa: PERF401 -- keep what came before an error
            except grpc.aio.AioRpcError as error:
                out.append(error)

    asyncio.run(run())
    return out


def test_request_streaming_calls_are_never_retried(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A stream-unary call is not retried even on UNAVAILABLE: its request stream may be
    consumed already."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))
    up.fail_next(1, Code.UNAVAILABLE)
    with MeshChannel(mesh, TARGET) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.stream_unary("/ratings.Ratings/Upload")(iter([b"1", b"2"]))
    assert caught.value.code() is Code.UNAVAILABLE
    assert len(up.calls) == 1


# ------------------------------------------------------------------------------ breakers


def test_overflow_is_unavailable_at_once(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """Beyond http2MaxRequests a call is answered UNAVAILABLE at once (x-envoy-overloaded),
    without reaching the server and without a retry."""
    (slow,) = servers("slow")
    slow.delay = 1.0
    mesh = make_mesh(
        service_yaml("ratings", [slow]),
        dr("    connectionPool:\n      http: {http2MaxRequests: 1}"),
    )
    with MeshChannel(mesh, TARGET) as channel:
        call = channel.unary_unary(GET)
        held = call.future(b"")
        assert wait_for(lambda: len(slow.calls) == 1)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"")
        assert caught.value.code() is Code.UNAVAILABLE
        assert ("x-envoy-overloaded", "true") in caught.value.trailing_metadata()
        assert name_of(held.result(timeout=5)) == "slow"
    assert len(slow.calls) == 1


CONNECT_TIMEOUT = "    connectionPool:\n      tcp: {connectTimeout: 0.2s}"


@pytest.mark.parametrize("mode", MODES)
def test_connect_timeout_fails_a_silent_endpoint_as_unavailable(
    relays: Callable[..., TcpRelay], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """tcp.connectTimeout bounds the connection attempt: an endpoint that takes the TCP
    connection and never answers the HTTP/2 handshake fails the call with UNAVAILABLE (a
    connect failure, as Envoy's 503 maps) after about connectTimeout: long before the
    call's own 10 s timeout, grpc's own 20 s connect timeout, and its 1 s (±20 %) initial
    reconnect back-off, which would otherwise lengthen the attempt."""
    silent = relays()
    mesh = make_mesh(service_yaml("ratings", [silent]), dr(CONNECT_TIMEOUT))
    started = time.monotonic()
    error = one(mesh, mode, timeout=10)
    assert time.monotonic() - started < 0.75
    assert code(error) is Code.UNAVAILABLE
    assert "failed to connect" in error.details()  # type: ignore[union-attr]
    assert silent.accepted >= 1


def test_connect_timeout_is_retried_on_another_endpoint(
    servers: Callable[..., list[GrpcUpstream]],
    relays: Callable[..., TcpRelay],
    make_mesh: Callable[..., Mesh],
) -> None:
    """retryOn connect-failure: an attempt whose connection timed out is retried on the
    other endpoint, so every call succeeds."""
    (good,) = servers("good")
    silent = relays()
    mesh = make_mesh(
        service_yaml("ratings", [silent, good]),
        dr(CONNECT_TIMEOUT + "\n    loadBalancer: {simple: ROUND_ROBIN}"),
        vs("    retries: {attempts: 2, retryOn: connect-failure}"),
    )
    results = unary(mesh, "sync", 2, timeout=10)
    assert [name_of(r) for r in results] == ["good", "good"]  # type: ignore[arg-type]
    assert silent.accepted >= 1


@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_closes_the_connection_and_the_next_call_reconnects(
    servers: Callable[..., list[GrpcUpstream]],
    relays: Callable[..., TcpRelay],
    make_mesh: Callable[..., Mesh],
    mode: str,
) -> None:
    """http.idleTimeout: a connection without calls for that long is closed by the client
    (grpc's own idle default is 30 minutes), and the next call opens a new one."""
    (up,) = servers("a")
    relay = relays(up.port)
    mesh = make_mesh(
        service_yaml("ratings", [relay]), dr("    connectionPool:\n      http: {idleTimeout: 0.2s}")
    )
    if mode == "sync":
        with MeshChannel(mesh, TARGET) as channel:
            call = channel.unary_unary(GET)
            assert name_of(call(b"", timeout=5)) == "a"
            assert wait_for(lambda: relay.closed == 1, timeout=3)
            assert name_of(call(b"", timeout=5)) == "a"
    else:

        async def run() -> None:
            async with MeshAioChannel(mesh, TARGET) as channel:
                call = channel.unary_unary(GET)
                assert name_of(await call(b"", timeout=5)) == "a"
                assert await async_wait_for(lambda: relay.closed == 1, timeout=3)
                assert name_of(await call(b"", timeout=5)) == "a"

        asyncio.run(run())
    assert relay.accepted == 2


def test_subsets_with_different_pool_settings_get_channels_of_their_own(
    servers: Callable[..., list[GrpcUpstream]],
    relays: Callable[..., TcpRelay],
    make_mesh: Callable[..., Mesh],
) -> None:
    """Two subsets over one endpoint, one with an idleTimeout: each has a connection of
    its own, and only the idle-timed one is closed and reopened."""
    (up,) = servers("a")
    relay = relays(up.port)
    mesh = make_mesh(
        service_yaml("ratings", [relay], labels=[{"version": "v1"}]),
        dr(
            subsets="""  subsets:
  - {name: brief, labels: {version: v1}, trafficPolicy: {connectionPool: {http: {idleTimeout: 0.2s}}}}
  - {name: plain, labels: {version: v1}}
"""
        ),
        vs(
            http="""  - match: [{uri: {prefix: /ratings.Admin/}}]
    route: [{destination: {host: ratings, subset: brief}}]
  - route: [{destination: {host: ratings, subset: plain}}]
"""
        ),
    )
    with MeshChannel(mesh, TARGET) as channel:
        brief, plain = channel.unary_unary("/ratings.Admin/Get"), channel.unary_unary(GET)
        assert [name_of(brief(b"", timeout=5)), name_of(plain(b"", timeout=5))] == ["a", "a"]
        assert relay.accepted == 2
        assert wait_for(lambda: relay.closed == 1, timeout=3)
        plain(b"", timeout=5)
        assert relay.accepted == 2  # the plain subset's connection stayed open
        brief(b"", timeout=5)
        assert relay.accepted == 3


def test_callers_own_option_wins_over_the_pool_setting(
    servers: Callable[..., list[GrpcUpstream]],
    relays: Callable[..., TcpRelay],
    make_mesh: Callable[..., Mesh],
) -> None:
    """An option the caller names wins over the one the mesh derives from the
    DestinationRule: the caller's 200 ms idle timeout closes the connection, not the
    rule's hour."""
    (up,) = servers("a")
    relay = relays(up.port)
    mesh = make_mesh(
        service_yaml("ratings", [relay]), dr("    connectionPool:\n      http: {idleTimeout: 1h}")
    )
    with MeshChannel(mesh, TARGET, options=(("grpc.client_idle_timeout_ms", 200),)) as channel:
        assert name_of(channel.unary_unary(GET)(b"", timeout=5)) == "a"
        assert wait_for(lambda: relay.closed == 1, timeout=3)


@pytest.mark.parametrize("mode", MODES)
def test_outlier_detection_ejects_a_failing_endpoint(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """An endpoint answering INTERNAL is ejected after consecutive5xxErrors: later calls all
    go to the healthy one."""
    bad, good = servers("bad", "good")
    bad.fail_next(100, Code.INTERNAL)
    mesh = make_mesh(
        service_yaml("ratings", [bad, good]),
        dr(
            "    loadBalancer: {simple: ROUND_ROBIN}\n"
            "    outlierDetection: {consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 100}"
        ),
    )
    results = unary(mesh, mode, 12)
    assert sum(code(r) is Code.INTERNAL for r in results) == 2
    assert [name_of(r) for r in results[-6:]] == ["good"] * 6  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
def test_express_successes_are_recorded_as_the_flow_records_them(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A call answered the express way (no metadata, no route timeout or fault) is a
    success to outlier detection and leaves the retry budget, as in the flow: with
    consecutive5xxErrors 3, two failures then a success, three times over, never eject the
    only endpoint, and no call stays counted in the budget."""
    (up,) = servers("a")
    mesh = make_mesh(
        service_yaml("ratings", [up]),
        dr(
            "    retryBudget: {percent: 20}\n"
            "    outlierDetection: {consecutive5xxErrors: 3, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 100}"
        ),
    )
    codes = []
    for _ in range(3):
        up.fail_next(2, Code.INTERNAL)
        codes += [code(r) for r in unary(mesh, mode, 3)]
    assert codes == [Code.INTERNAL, Code.INTERNAL, Code.OK] * 3
    assert budget_active(mesh) == 0


# ------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("mode", MODES)
def test_fault_abort_grpc_status_and_http_status(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """fault.abort.grpcStatus answers that status; an httpStatus abort is mapped as Envoy
    maps HTTP to gRPC (403: PERMISSION_DENIED); neither reaches the server."""
    (up,) = servers("a")
    grpc_abort = make_mesh(
        service_yaml("ratings", [up]),
        vs("    fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}}"),
    )
    error = one(grpc_abort, mode)
    assert (code(error), error.details()) == (Code.RESOURCE_EXHAUSTED, "fault filter abort")  # type: ignore[union-attr]
    http_abort = make_mesh(
        service_yaml("ratings", [up]),
        vs("    fault: {abort: {httpStatus: 403, percentage: {value: 100}}}"),
    )
    assert code(one(http_abort, mode)) is Code.PERMISSION_DENIED
    assert up.calls == []


@pytest.mark.parametrize("mode", MODES)
def test_fault_delay_holds_the_call_and_counts_against_the_caller_deadline(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """fault.delay holds the call before it goes out; a caller deadline shorter than the
    delay ends the call with DEADLINE_EXCEEDED at the deadline, never sent."""
    (up,) = servers("a")
    mesh = make_mesh(
        service_yaml("ratings", [up]),
        vs("    fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}"),
    )
    started = time.monotonic()
    assert name_of(one(mesh, mode)) == "a"  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert code(one(mesh, mode, timeout=0.1)) is Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.3
    assert len(up.calls) == 1


@pytest.mark.parametrize("mode", MODES)
def test_pytest_overlay_grpc_abort(
    servers: Callable[..., list[GrpcUpstream]],
    make_mesh: Callable[..., Mesh],
    mesh_faults: MeshFaults,
    mode: str,
) -> None:
    """mesh_faults.abort(grpc_status=...) fails gRPC calls with that status and records
    them; an HTTP-only abort rule leaves gRPC calls alone."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))
    rule = mesh_faults.abort("ratings", http_status=503)
    assert code(one(mesh, mode)) is Code.OK
    mesh_faults.remove(rule)
    assert rule.hits == 0
    mesh_faults.abort("ratings", grpc_status="UNAVAILABLE")
    assert code(one(mesh, mode)) is Code.UNAVAILABLE
    assert len(up.calls) == 1
    last = mesh_faults.calls[-1]
    assert (last.host, last.path, last.grpc_status, last.injected) == (
        "ratings",
        GET,
        "UNAVAILABLE",
        True,
    )


# ------------------------------------------------------------------------------ mirroring


@pytest.mark.parametrize("mode", MODES)
def test_unary_mirror_gets_a_shadow_copy(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """mirror sends a fire-and-forget copy with authority ``-shadow``; the caller sees only
    the main answer."""
    main, shadow = servers("main", "shadow")
    mesh = make_mesh(
        service_yaml("ratings", [main]),
        service_yaml("ratings-next", [shadow]),
        vs("    mirror: {host: ratings-next}"),
    )
    if mode == "sync":
        with MeshChannel(mesh, TARGET) as channel:
            assert name_of(channel.unary_unary(GET)(b"")) == "main"
            assert wait_for(lambda: len(shadow.calls) == 1)
    else:

        async def run() -> None:
            async with MeshAioChannel(mesh, TARGET) as channel:
                assert name_of(await channel.unary_unary(GET)(b"")) == "main"
                for _ in range(500):  # the copy runs on; closing the channel would end it
                    if shadow.calls:
                        break
                    await asyncio.sleep(0.01)

        asyncio.run(run())
    assert [c.authority for c in shadow.calls] == ["ratings-shadow:9090"]
    assert mesh.state.mirrors_sent == 1


# ------------------------------------------------------------------------------ call shapes


def test_all_four_shapes_sync(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """Unary-unary (call, with_call, future), unary-stream, stream-unary (call, with_call,
    future) and stream-stream through one sync mesh channel, with _registered_method."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))
    with MeshChannel(mesh, TARGET) as channel:
        uu = channel.unary_unary(GET, _registered_method=True)
        assert uu(b"x") == b"a|/ratings.Ratings/Get|1|x"  # the first try: attempt count 1
        response, call = uu.with_call(b"y", metadata=[("k", "v")])
        assert response.endswith(b"|y") and call.code() is Code.OK
        future = uu.future(b"z")
        assert future.result(timeout=5).endswith(b"|z") and future.code() is Code.OK
        assert not future.running() and future.done()

        us = channel.unary_stream("/ratings.Ratings/StreamAll")
        responses = us(b"")
        assert [m.rsplit(b"|", 1)[1] for m in responses] == [b"0", b"1", b"2"]
        assert responses.code() is Code.OK

        su = channel.stream_unary("/ratings.Ratings/Upload")
        assert su(iter([b"1", b"2"])).endswith(b"|1+2")
        response, call = su.with_call(iter([b"3"]))
        assert response.endswith(b"|3") and call.code() is Code.OK
        assert su.future(iter([b"4"])).result(timeout=5).endswith(b"|4")

        ss = channel.stream_stream("/ratings.Ratings/Chat")
        assert [m.rsplit(b"|", 1)[1] for m in ss(iter([b"p", b"q"]))] == [b"p", b"q"]
    assert up.calls[1].metadata["k"] == "v"


def test_future_error_and_cancel(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """future() delivers a failure as its exception and can be cancelled while the attempt
    is in flight."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))
    with MeshChannel(mesh, TARGET) as channel:
        uu = channel.unary_unary(GET)
        up.fail_next(1, Code.NOT_FOUND, "nope")
        failed = uu.future(b"")
        assert failed.exception(timeout=5).code() is Code.NOT_FOUND
        with pytest.raises(grpc.RpcError):
            failed.result()
        up.delay = 5
        pending = uu.future(b"")
        assert wait_for(lambda: len(up.calls) == 2)
        assert pending.cancel()
        assert pending.cancelled()
        with pytest.raises(grpc.FutureCancelledError):
            pending.result(timeout=5)


def test_all_four_shapes_aio(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """The four shapes under grpc.aio, by iterator and by write()/read(), with the call
    objects' code() and metadata."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]))

    async def run() -> None:
        async with MeshAioChannel(mesh, TARGET) as channel:
            uu = channel.unary_unary(GET, _registered_method=True)
            call = uu(b"x", metadata=[("k", "v")])
            assert (await call).endswith(b"|x")
            assert await call.code() is Code.OK and call.done()
            us = channel.unary_stream("/ratings.Ratings/StreamAll")
            assert len([m async for m in us(b"")]) == 3
            reader = us(b"")
            assert (await reader.read()).endswith(b"|0")
            su = channel.stream_unary("/ratings.Ratings/Upload")
            assert (await su(iter([b"1", b"2"]))).endswith(b"|1+2")
            writer = su()
            await writer.write(b"w")
            await writer.done_writing()
            assert (await writer).endswith(b"|w")
            ss = channel.stream_stream("/ratings.Ratings/Chat")
            chat = ss()
            await chat.write(b"ping")
            assert (await chat.read()).endswith(b"|ping")
            await chat.done_writing()
            assert await chat.read() is grpc.aio.EOF
            assert await chat.code() is Code.OK

    asyncio.run(run())
    assert up.calls[0].metadata["k"] == "v"


def test_aio_cancel(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """Cancelling an aio call in flight cancels its attempt; awaiting it raises CancelledError.
    The endpoint and the cluster's retry budget no longer count it."""
    (up,) = servers("a")
    up.delay = 5
    mesh = make_mesh(service_yaml("ratings", [up]), dr("    retryBudget: {percent: 20}"))

    async def run() -> None:
        async with MeshAioChannel(mesh, TARGET) as channel:
            call = channel.unary_unary(GET)(b"")
            while not up.calls:
                await asyncio.sleep(0.01)
            assert call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert call.cancelled()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert mesh.stats.get((up.address, up.port)).active == 0
    assert budget_active(mesh) == 0


def test_aio_calls_go_out_when_made_and_settle_unawaited(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A unary aio call is on the wire as soon as it is made, as grpc.aio's own are: two
    calls made before either is awaited reach the server together. A call made and never
    awaited still ends properly: its failed attempt is retried (Istio's default policy
    retries UNAVAILABLE) and its endpoint and retry budget no longer count it."""
    (up,) = servers("a")
    mesh = make_mesh(service_yaml("ratings", [up]), dr("    retryBudget: {percent: 20}"))
    stats = mesh.stats.get((up.address, up.port))

    async def run() -> None:
        async with MeshAioChannel(mesh, TARGET) as channel:
            get = channel.unary_unary(GET)
            up.delay = 2  # each held 2 s: one after the other, the second would come too late
            first, second = get(b"1"), get(b"2")
            assert await async_wait_for(lambda: len(up.calls) == 2, timeout=1.5)
            assert [await first, await second] == [f"a|{GET}|1|{n}".encode() for n in (1, 2)]
            up.delay = 0
            up.calls.clear()
            up.fail_next(1, Code.UNAVAILABLE)
            get(b"dropped")  # never awaited, no reference kept
            assert await async_wait_for(lambda: len(up.calls) == 2 and not stats.active)
            assert [c.metadata["x-envoy-attempt-count"] for c in up.calls] == ["1", "2"]
            assert await async_wait_for(lambda: budget_active(mesh) == 0)

    asyncio.run(asyncio.wait_for(run(), 10))


@pytest.mark.parametrize("cancels", [1, 2])
def test_aio_call_cancelled_before_it_is_awaited_gives_everything_back(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], cancels: int
) -> None:
    """A call cancelled while its first attempt is out and nothing awaits it, once or twice
    (the second cancel lands on the task the first one's end started): its endpoint's
    active count, its admission place and its retry-budget place all come back."""
    (up,) = servers("a")
    up.delay = 5
    policy = "    retryBudget: {percent: 20}\n    connectionPool: {http: {http2MaxRequests: 5}}"
    mesh = make_mesh(service_yaml("ratings", [up]), dr(policy))
    stats = mesh.stats.get((up.address, up.port))

    async def run() -> None:
        async with MeshAioChannel(mesh, TARGET) as channel:
            call = channel.unary_unary(GET)(b"")
            assert await async_wait_for(lambda: len(up.calls) == 1)
            for _ in range(cancels):
                call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await async_wait_for(lambda: not stats.active)

    asyncio.run(asyncio.wait_for(run(), 10))
    assert budget_active(mesh) == 0
    (cluster,) = [c for c in mesh.snapshot.clusters if c.name.endswith("|ratings")]
    limits = cluster.state.limits((up.address, up.port))
    assert limits is not None
    assert limits.in_flight == 0


def test_aio_call_grpc_aio_cannot_send_fails_alike_each_time_and_gives_everything_back(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A request grpc.aio cannot serialize (a str where bytes go) fails the call with
    grpc.aio's own error, raised again when the call is awaited again, as a grpc.aio
    call's is; grpc.aio's call never started, and the mesh cancels it, so the endpoint's
    active count and its one connection-pool place come back and the next call goes out."""
    (up,) = servers("a")
    policy = "    retryBudget: {percent: 20}\n    connectionPool: {http: {http2MaxRequests: 1}}"
    mesh = make_mesh(service_yaml("ratings", [up]), dr(policy))
    stats = mesh.stats.get((up.address, up.port))

    async def run() -> Any:
        async with MeshAioChannel(mesh, TARGET) as channel:
            call = channel.unary_unary(GET)("not bytes")
            with pytest.raises(TypeError):
                await call
            with pytest.raises(TypeError):
                await call
            assert not call.cancelled()
            assert await async_wait_for(lambda: not stats.active)
            return await channel.unary_unary(GET)(b"", timeout=5)

    assert name_of(asyncio.run(asyncio.wait_for(run(), 10))) == "a"
    assert budget_active(mesh) == 0
    (cluster,) = [c for c in mesh.snapshot.clusters if c.name.endswith("|ratings")]
    limits = cluster.state.limits((up.address, up.port))
    assert limits is not None
    assert limits.in_flight == 0


def budget_active(mesh: Mesh) -> int:
    """Calls the ratings cluster's retry budget counts in flight."""
    (cluster,) = [c for c in mesh.snapshot.clusters if c.name.endswith("|ratings")]
    assert cluster.state.budget is not None
    return cluster.state.budget.active


@pytest.mark.parametrize("how", ["awaited at once", "awaited later", "driven by a task"])
def test_aio_cancelling_the_awaiting_task_cancels_the_rpc(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], how: str
) -> None:
    """A task awaiting a mesh call is cancelled (asyncio.wait_for, a TaskGroup): the RPC
    ends with it, as grpc.aio's own calls do, and gives its endpoint back at once rather
    than when the server would have answered. Awaited at once, the call runs inline in
    the task; awaited later, it is already under way on its own; driven by a task, its
    first attempt failed before it was awaited and a task of its own makes the retry.
    Either way the call then says it was cancelled."""
    (up,) = servers("a")
    up.delay = 5
    if how == "driven by a task":
        up.undelayed = 1
        up.fail_next(1, Code.UNAVAILABLE)  # retried under Istio's default policy
    mesh = make_mesh(service_yaml("ratings", [up]), dr("    retryBudget: {percent: 20}"))
    stats = mesh.stats.get((up.address, up.port))

    async def run() -> float:
        async with MeshAioChannel(mesh, TARGET) as channel:
            made: list[Any] = []

            async def inline() -> Any:
                made.append(channel.unary_unary(GET)(b""))
                return await made[0]

            if how == "awaited at once":
                task = asyncio.ensure_future(inline())
            else:
                made.append(channel.unary_unary(GET)(b""))
                if how == "driven by a task":
                    assert await async_wait_for(lambda: len(up.calls) == 2)  # the retry
                task = asyncio.ensure_future(made[0])
            while not up.calls:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)  # the task is awaiting the call
            cancelled = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert made[0].cancelled()
            assert await async_wait_for(made[0].done)  # a task driving it ends a turn later
            while stats.active and time.monotonic() - cancelled < 4:
                await asyncio.sleep(0.01)
            return time.monotonic() - cancelled

    assert asyncio.run(asyncio.wait_for(run(), 10)) < 2  # the server would answer at 5 s
    assert stats.active == 0
    assert budget_active(mesh) == 0


# ------------------------------------------------------------------------------ channels


def test_endpoint_channels_follow_the_registry(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A new endpoint gets its own channel on first use; a departed one's channel closes
    once its call in flight has finished, and that call completes normally."""
    old, new = servers("old", "new")
    registry = MemoryRegistry({"mesh.yaml": service_yaml("ratings", [old])})
    mesh = make_mesh(registry=registry)
    with MeshChannel(mesh, TARGET) as channel:
        uu = channel.unary_unary(GET)
        assert name_of(uu(b"")) == "old"
        old.delay = 0.5
        in_flight = uu.future(b"")
        assert wait_for(lambda: len(old.calls) == 2)
        registry.put("mesh.yaml", service_yaml("ratings", [new]))
        assert wait_for(lambda: mesh.snapshot.version == 2)
        assert name_of(uu(b"")) == "new"
        assert name_of(in_flight.result(timeout=5)) == "old"
        assert len(channel._core.channels) == 1


@pytest.mark.parametrize("mode", MODES)
def test_tls_checks_the_certificate_against_the_logical_host(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """With channel credentials, an endpoint channel to 127.0.0.1 accepts the server's
    certificate for the logical host "ratings": grpc checks it against the channel's
    authority (grpc.default_authority), not the address."""
    key, certificate = self_signed("ratings")
    (up,) = servers("tls", credentials=grpc.ssl_server_credentials([(key, certificate)]))
    mesh = make_mesh(service_yaml("ratings", [up]))
    trust = grpc.ssl_channel_credentials(root_certificates=certificate)
    assert name_of(one(mesh, mode, credentials=trust, timeout=5)) == "tls"  # type: ignore[arg-type]
    assert up.calls[0].authority == TARGET


@pytest.mark.parametrize("mode", MODES)
def test_tls_refuses_a_certificate_for_another_name(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A trusted certificate for another name ("reviews") fails the call with UNAVAILABLE:
    the handshake fails, and no call reaches the server."""
    key, certificate = self_signed("reviews")
    (up,) = servers("tls", credentials=grpc.ssl_server_credentials([(key, certificate)]))
    mesh = make_mesh(service_yaml("ratings", [up]))
    trust = grpc.ssl_channel_credentials(root_certificates=certificate)
    error = one(mesh, mode, credentials=trust, timeout=5)
    assert code(error) is Code.UNAVAILABLE
    assert up.calls == []


def test_passthrough_for_a_host_outside_the_registry(
    servers: Callable[..., list[GrpcUpstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A target the registry does not know is called as named (ALLOW_ANY)."""
    (up,) = servers("outside")
    mesh = make_mesh(service_yaml("ratings", []))
    result = unary(mesh, "sync", 1, target=f"127.0.0.1:{up.port}")[0]
    assert name_of(result) == "outside"  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ generated stubs

PROTO = """
syntax = "proto3";
package ratings;
message GetRequest { string id = 1; }
message GetReply { string text = 1; }
service Ratings { rpc Get (GetRequest) returns (GetReply); }
"""


@pytest.fixture
def ratings_stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """ratings_pb2 and ratings_pb2_grpc, generated by grpc_tools.protoc into tmp_path."""
    pytest.importorskip("grpc_tools")
    (tmp_path / "ratings.proto").write_text(PROTO)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(tmp_path / "ratings.proto"),
        ],
        check=True,
        timeout=60,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pb2 = importlib.import_module("ratings_pb2")
    pb2_grpc = importlib.import_module("ratings_pb2_grpc")
    yield pb2, pb2_grpc
    for name in ("ratings_pb2", "ratings_pb2_grpc"):
        sys.modules.pop(name, None)


def test_generated_stub_works_unchanged(
    ratings_stubs: tuple[Any, Any], make_mesh: Callable[..., Mesh]
) -> None:
    """A protoc-generated stub calls through MeshChannel and MeshAioChannel unchanged."""
    pb2, pb2_grpc = ratings_stubs
    from concurrent.futures import ThreadPoolExecutor

    class Ratings(pb2_grpc.RatingsServicer):  # type: ignore[misc]
        def Get(self, request: Any, context: Any) -> Any:
            return pb2.GetReply(text=f"rating of {request.id}")

    server = grpc.server(ThreadPoolExecutor(4))
    pb2_grpc.add_RatingsServicer_to_server(Ratings(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        up = type("Up", (), {"name": "stub", "address": "127.0.0.1", "port": port})()
        mesh = make_mesh(service_yaml("ratings", [up]))  # type: ignore[list-item]
        with MeshChannel(mesh, TARGET) as channel:
            reply = pb2_grpc.RatingsStub(channel).Get(pb2.GetRequest(id="7"), timeout=5)
        assert reply.text == "rating of 7"

        async def run() -> Any:
            async with MeshAioChannel(mesh, TARGET) as channel:
                return await pb2_grpc.RatingsStub(channel).Get(pb2.GetRequest(id="8"))

        assert asyncio.run(run()).text == "rating of 8"
    finally:
        server.stop(None).wait(5)


def test_connectivity_and_lifetime(make_mesh: Callable[..., Mesh]) -> None:
    """The mesh channel reports READY (channel_ready_future resolves), SHUTDOWN once
    closed, and refuses calls after close — sync and aio."""
    mesh = make_mesh(service_yaml("ratings", []))
    channel = MeshChannel(mesh, TARGET)
    grpc.channel_ready_future(channel).result(timeout=1)
    seen: list[Any] = []
    channel.subscribe(seen.append)
    channel.close()
    assert seen == [grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.SHUTDOWN]
    with pytest.raises(ValueError, match="closed channel"):
        channel.unary_unary(GET)(b"")

    async def run() -> None:
        aio = MeshAioChannel(mesh, TARGET)
        await aio.channel_ready()
        assert aio.get_state() is grpc.ChannelConnectivity.READY
        await aio.close()
        assert aio.get_state() is grpc.ChannelConnectivity.SHUTDOWN

    asyncio.run(run())
