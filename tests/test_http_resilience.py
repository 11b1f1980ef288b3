"""Failure management through the httpx transports, against misbehaving loopback upstreams.

Timeouts, retries and budgets, circuit breaking, outlier detection, fault injection and
mirroring — each configured in Istio's YAML and observed on real connections. Elapsed
times are only ever compared with an upstream delay several times larger (a cut that
happened at all), never used as performance figures.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpcore
import httpx
import pytest

from inmesh import Mesh
from inmesh.testing.upstream import Upstream

from .conftest import send, send_all, service_yaml

MODES = ["sync", "async"]
URL = "http://reviews:9080/"


def vs(route_extra: str = "", host: str = "reviews", http_extra: str = "") -> str:
    """A VirtualService for ``host`` with one route; ``route_extra`` goes into the route."""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:{http_extra}
  - route: [{{destination: {{host: {host}}}}}]
{route_extra}
"""


def dr(policy: str, host: str = "reviews") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
  trafficPolicy:
{policy}
"""


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def get_once(mesh: Mesh, mode: str, **client_options: object) -> httpx.Response:
    """One GET through a fresh sync or async mesh client."""
    if mode == "sync":
        with mesh.client(**client_options) as client:
            return client.get(URL)

    async def run() -> httpx.Response:
        async with mesh.async_client(**client_options) as client:
            return await client.get(URL)

    if mode == "trio":  # the async transport off asyncio: anyio's scopes, not asyncio's
        import trio

        return trio.run(run)
    return asyncio.run(run())


def attempt_counts(upstream: Upstream) -> list[str]:
    return [r.headers.get("x-envoy-attempt-count", "") for r in upstream.received]


# ------------------------------------------------------------------------------ timeouts


@pytest.mark.parametrize("mode", [*MODES, "trio"])
def test_route_timeout_answers_504(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A VirtualService timeout cuts a slow upstream off and answers 504 upstream request timeout."""
    (slow,) = upstreams("slow")
    slow.behave(delay=5)
    mesh = make_mesh(service_yaml("reviews", [slow]), vs("    timeout: 0.3s"))
    started = time.monotonic()
    response = get_once(mesh, mode)
    assert response.status_code == 504
    assert response.text.strip() == "upstream request timeout"
    assert time.monotonic() - started < 4  # cut long before the upstream's 5 s


@pytest.mark.parametrize("mode", MODES)
def test_timeout_header_and_caller_timeout_tighter_wins(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """x-envoy-upstream-rq-timeout-ms tightens the route timeout; the caller's own httpx
    timeout, when tighter, surfaces as httpx's own ReadTimeout."""
    (slow,) = upstreams("slow")
    slow.behave(delay=5)
    mesh = make_mesh(service_yaml("reviews", [slow]), vs("    timeout: 30s"))
    response = send(mesh, mode, URL, {"x-envoy-upstream-rq-timeout-ms": "200"})
    assert response.status_code == 504

    with pytest.raises(httpx.ReadTimeout):
        get_once(mesh, mode, timeout=0.2)


@pytest.mark.parametrize("mode", [*MODES, "trio"])
def test_trickled_body_is_cut_at_the_deadline(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """An upstream that trickles its body byte by byte is cut off at the route deadline,
    although every single read is quick (httpx's read timeout alone would never fire)."""
    (trickle,) = upstreams("trickle")
    trickle.behave(trickle=200, interval=0.05)  # 10 s of body
    mesh = make_mesh(service_yaml("reviews", [trickle]), vs("    timeout: 0.5s"))
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout, match="upstream request timeout"):
        get_once(mesh, mode)
    assert time.monotonic() - started < 5
    assert mesh.stats.get((trickle.address, trickle.port)).active == 0


@pytest.mark.parametrize("mode", [*MODES, "trio"])
def test_trickled_head_is_cut_at_the_deadline(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """An upstream that trickles its response head, a header line at a time, gets the
    route timeout's 504 at the deadline: the timeout is wall-clock from the first byte
    sent, not a bound on each read."""
    (trickle,) = upstreams("trickle")
    trickle.behave(trickle_head=100, interval=0.05)  # 5 s of head
    mesh = make_mesh(service_yaml("reviews", [trickle]), vs("    timeout: 0.5s"))
    started = time.monotonic()
    response = get_once(mesh, mode)
    assert response.status_code == 504
    assert response.text.strip() == "upstream request timeout"
    assert time.monotonic() - started < 3
    assert mesh.stats.get((trickle.address, trickle.port)).active == 0


def test_a_deadline_spares_a_connection_its_request_lost_to_another(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpcore can hand one idle connection to two requests, of which one wins and the
    other tries again. A deadline passing for the loser meanwhile must not cut the
    winner's socket. (The loser's thread is held up after its assignment, as a thread
    woken late from the pool's queue is.)"""
    from httpcore._sync.connection import HTTPConnection

    (up,) = upstreams("up")
    mesh = make_mesh(service_yaml("reviews", [up]), vs())  # no route timeout
    sent = HTTPConnection.handle_request
    assigned = threading.Event()

    def late_for_x(self: HTTPConnection, request: httpcore.Request) -> httpcore.Response:
        if (b"x-who", b"x") in request.headers:
            assigned.set()
            time.sleep(0.5)
        return sent(self, request)

    out: dict[str, object] = {}

    def run(name: str, headers: dict[str, str]) -> None:
        try:
            out[name] = client.get(URL, headers=headers).status_code
        except httpx.HTTPError as exc:
            out[name] = type(exc).__name__

    with mesh.client() as client:
        assert client.get(URL).status_code == 200  # one idle keep-alive connection
        monkeypatch.setattr(HTTPConnection, "handle_request", late_for_x)
        x = threading.Thread(
            target=run, args=("x", {"x-who": "x", "x-envoy-upstream-rq-timeout-ms": "300"})
        )
        x.start()
        assert assigned.wait(5)  # x holds its assignment; y takes the same connection, wins
        up.behave(delay=1.0)
        y = threading.Thread(target=run, args=("y", {"x-who": "y"}))
        y.start()
        x.join(10)
        y.join(10)
    assert out["y"] == 200  # the healthy request without a deadline is untouched
    assert out["x"] == 504


def test_a_deadline_passed_while_connecting_still_cuts_the_body(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deadline that passes while the attempt connects (a slow TCP handshake, within
    the connect timeout) cuts the request once it is on the wire: the caller does not
    wait out a trickled answer."""
    import httpcore._backends.sync as backend

    (trickle,) = upstreams("trickle")
    trickle.behave(trickle=60, interval=0.05)  # 3 s of body
    mesh = make_mesh(service_yaml("reviews", [trickle]), vs("    timeout: 0.2s"))
    connect = backend.SyncBackend.connect_tcp

    def slow_connect(self: backend.SyncBackend, *args: object, **kwargs: object) -> object:
        time.sleep(0.3)  # past the deadline: the sleep is not the socket's to time out
        return connect(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backend.SyncBackend, "connect_tcp", slow_connect)
    started = time.monotonic()
    with mesh.client() as client:
        try:  # cut within moments of being sent: before its head (504) or in its body
            outcome: object = client.get(URL).status_code
        except httpx.ReadTimeout as exc:
            outcome = str(exc).split(" (")[0]
    assert outcome in (504, "upstream request timeout")
    assert time.monotonic() - started < 2  # not the 3 s the whole body takes


def test_a_late_deadline_cut_spares_the_connection_reused_after_close(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """The watchdog's thread can run late: a cut for a response already closed must not
    touch its connection, which the pool may have handed to the next request by then."""
    (up,) = upstreams("up")
    mesh = make_mesh(service_yaml("reviews", [up]), vs("    timeout: 30s"))
    transport = mesh.transport()
    with httpx.Client(transport=transport) as client:
        first = transport.handle_request(client.build_request("GET", URL))
        first.read()
        first.close()  # its connection goes back to the pool
        late_cut = first.stream._deadline.fire  # type: ignore[attr-defined]
        up.behave(delay=0.3)
        second: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: second.append(client.get(URL)))
        thread.start()
        assert wait_for(lambda: len(up.received) == 2)  # the same connection, in use
        late_cut()  # what a watchdog thread descheduled past the close would do
        thread.join(5)
    assert [r.status_code for r in second] == [200]
    assert len(up.received) == 2  # answered on the first try, not retried


def test_a_late_async_deadline_cut_spares_the_connection_reused_after_close(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """The async transport's body timer, fired after the response was closed, leaves the
    connection (now serving the next request) alone."""
    (up,) = upstreams("up")
    mesh = make_mesh(service_yaml("reviews", [up]), vs("    timeout: 30s"))

    async def run() -> int:
        transport = mesh.async_transport()
        async with httpx.AsyncClient(transport=transport) as client:
            first = await transport.handle_async_request(client.build_request("GET", URL))
            await first.aread()
            await first.aclose()
            late_cut = first.stream.cut  # type: ignore[attr-defined]
            up.behave(delay=0.3)
            second = asyncio.ensure_future(client.get(URL))
            deadline = time.monotonic() + 5
            while len(up.received) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            late_cut()
            return (await second).status_code

    assert asyncio.run(run()) == 200
    assert len(up.received) == 2


@pytest.mark.parametrize("mode", MODES)
def test_per_try_timeout_retries_on_another_endpoint(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """perTryTimeout ends a slow attempt and the retry goes to an endpoint not yet tried."""
    slow, fast = upstreams("slow", "fast")
    slow.behave(delay=5)
    mesh = make_mesh(
        service_yaml("reviews", [slow, fast]),
        vs("    retries: {attempts: 2, perTryTimeout: 0.2s, retryOn: 5xx}"),
        dr("    loadBalancer: {simple: ROUND_ROBIN}"),
    )
    responses = send_all(mesh, mode, [("GET", URL, {})] * 4)
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.headers["x-upstream"] == "fast" for r in responses)
    assert len(slow.received) >= 1
    assert max(r.extensions["inmesh"].attempts for r in responses) == 2


def test_overall_timeout_caps_all_attempts(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """The route timeout caps every attempt together: ten retries fit in no more time."""
    (slow,) = upstreams("slow")
    slow.behave(delay=5)
    mesh = make_mesh(
        service_yaml("reviews", [slow]),
        vs("    timeout: 0.6s\n    retries: {attempts: 10, perTryTimeout: 0.25s, retryOn: 5xx}"),
    )
    response = send(mesh, "sync", URL)
    assert response.status_code == 504
    assert 1 <= len(slow.received) <= 3


# ------------------------------------------------------------------------------ retries


@pytest.mark.parametrize("mode", MODES)
def test_retries_on_5xx_with_attempt_count(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """retryOn 5xx retries two 503s; every attempt carries x-envoy-attempt-count."""
    (up,) = upstreams("flaky")
    up.fail_next(2, 503)
    mesh = make_mesh(service_yaml("reviews", [up]), vs("    retries: {attempts: 2, retryOn: 5xx}"))
    response = send(mesh, mode, URL)
    assert response.status_code == 200
    assert attempt_counts(up) == ["1", "2", "3"]
    assert response.extensions["inmesh"].attempts == 3


@pytest.mark.parametrize("mode", MODES)
def test_default_policy_does_not_retry_503(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """Istio's default retries connect failures but not a 503: the caller gets the 503."""
    (up,) = upstreams("flaky")
    up.fail_next(1, 503)
    mesh = make_mesh(service_yaml("reviews", [up]))
    assert send(mesh, mode, URL).status_code == 503
    assert len(up.received) == 1


@pytest.mark.parametrize("mode", MODES)
def test_default_policy_retries_connect_failures(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """With one endpoint refusing connections, the default policy retries onto the other."""
    dead, alive = upstreams("dead", "alive")
    dead.stop()
    mesh = make_mesh(
        service_yaml("reviews", [dead, alive]), dr("    loadBalancer: {simple: ROUND_ROBIN}")
    )
    responses = send_all(mesh, mode, [("GET", URL, {})] * 6)
    assert [r.status_code for r in responses] == [200] * 6


@pytest.mark.parametrize(
    ("retries", "expected_tries"),
    [("", 1), ("    retries: {attempts: 2, retryOn: reset}", 3), ("    retries: {attempts: 0}", 1)],
)
def test_reset_retried_only_when_asked(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
    retries: str,
    expected_tries: int,
) -> None:
    """A connection reset is retried under retryOn reset; the default and attempts 0 do not."""
    (up,) = upstreams("resetting")
    up.behave(reset=1)
    mesh = make_mesh(service_yaml("reviews", [up]), vs(retries))
    with pytest.raises(httpx.TransportError) as caught:
        send(mesh, "sync", URL)
    assert caught.value.__cause__ is not None
    assert len(up.received) == expected_tries


@pytest.mark.parametrize(
    ("retry_on", "status", "retried"),
    [
        ("5xx", 500, True),
        ("gateway-error", 500, False),
        ("gateway-error", 502, True),
        ("gateway-error", 504, True),
        ("retriable-4xx", 409, True),
        ("retriable-4xx", 404, False),
        ("'503,429'", 429, True),
        ("'retriable-status-codes,429'", 429, True),
        ("connect-failure", 503, False),
    ],
)
def test_retry_on_conditions(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
    retry_on: str,
    status: int,
    retried: bool,
) -> None:
    """Each retryOn condition retries exactly the responses it names."""
    (up,) = upstreams("u")
    up.fail_next(1, status)
    mesh = make_mesh(
        service_yaml("reviews", [up]), vs(f"    retries: {{attempts: 1, retryOn: {retry_on}}}")
    )
    response = send(mesh, "sync", URL)
    assert response.status_code == (200 if retried else status)
    assert len(up.received) == (2 if retried else 1)


def test_unreplayable_body_is_not_retried(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A request whose body is a generator cannot be sent twice, so it is not retried."""
    (up,) = upstreams("u")
    up.fail_next(1, 503)
    mesh = make_mesh(service_yaml("reviews", [up]), vs("    retries: {attempts: 2, retryOn: 5xx}"))

    def body() -> Iterator[bytes]:
        yield b"streamed"

    with mesh.client() as client:
        response = client.post(URL, content=body())
    assert response.status_code == 503
    assert len(up.received) == 1
    up.fail_next(1, 503)
    with mesh.client() as client:
        response = client.post(URL, content=b"bytes")
    assert response.status_code == 200
    assert [r.method for r in up.received[1:]] == ["POST", "POST"]


def test_retry_budget_bounds_amplification_in_a_total_outage(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """Every upstream failing: the mesh-wide budget keeps attempts near requests × 1.2 plus
    the floor, where the plain 2-retry policy makes 3× — and switching it off shows the 3×."""
    (down,) = upstreams("down")
    down.behave(status=503)
    policy = vs("    retries: {attempts: 2, retryOn: 5xx}")
    budget_off = (
        "apiVersion: inmesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        "spec: {retryBudget: {enabled: false}}\n"
    )
    requests = 300
    mesh = make_mesh(service_yaml("reviews", [down]), policy)
    with mesh.client() as client:
        for _ in range(requests):
            client.get(URL)
    budgeted = len(down.received)
    # ratio 0.2 of requests, plus the reserve of 10 retries/s over the 10 s window
    assert budgeted <= requests * 1.2 + 100 + 1
    assert budgeted < requests * 3

    before = len(down.received)
    unbounded = make_mesh(service_yaml("reviews", [down]), policy, budget_off)
    with unbounded.client() as client:
        for _ in range(100):
            client.get(URL)
    assert len(down.received) - before == 300


# ------------------------------------------------------------------------------ circuit breaking


def _concurrent_statuses(mesh: Mesh, callers: int, each: int) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    lock = threading.Lock()
    with mesh.client() as client:

        def work() -> None:
            for _ in range(each):
                r = client.get(URL)
                with lock:
                    responses.append(r)

        threads = [threading.Thread(target=work) for _ in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    return responses


def test_istio_circuit_breaking_task(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """Istio's circuit-breaking task: 1 connection, 1 pending, 1 request per connection.
    One caller always gets 200; concurrent callers get 503 x-envoy-overloaded, more with
    more callers, and an overflowed request never reaches the upstream."""
    (slow,) = upstreams("httpbin")
    slow.behave(delay=0.05)
    mesh = make_mesh(
        service_yaml("reviews", [slow]),
        dr(
            "    connectionPool:\n      tcp: {maxConnections: 1}\n"
            "      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}"
        ),
    )
    alone = _concurrent_statuses(mesh, 1, 8)
    assert [r.status_code for r in alone] == [200] * 8

    shares = {}
    for callers in (3, 6):
        before = len(slow.received)
        responses = _concurrent_statuses(mesh, callers, 8)
        overflowed = [r for r in responses if r.status_code == 503]
        assert all(r.headers["x-envoy-overloaded"] == "true" for r in overflowed)
        ok = sum(r.status_code == 200 for r in responses)
        assert ok + len(overflowed) == len(responses)
        assert len(slow.received) - before == ok  # overflow was never sent
        shares[callers] = len(overflowed) / len(responses)
    assert shares[3] > 0.05
    assert shares[6] > shares[3]


def test_max_requests_limit_overflows(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """http2MaxRequests caps concurrent requests to an endpoint whatever the protocol."""
    (slow,) = upstreams("slow")
    slow.behave(delay=0.1)
    mesh = make_mesh(
        service_yaml("reviews", [slow]),
        dr("    connectionPool:\n      http: {http2MaxRequests: 1}"),
    )
    responses = _concurrent_statuses(mesh, 4, 3)
    assert any(r.status_code == 503 for r in responses)
    assert any(r.status_code == 200 for r in responses)


# ------------------------------------------------------------------------------ outlier detection


@pytest.mark.parametrize("mode", MODES)
def test_outlier_detection_ejects_failing_endpoint(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """An endpoint with consecutive 5xx errors is ejected and gets no more traffic."""
    good1, bad, good2 = upstreams("good1", "bad", "good2")
    bad.behave(status=500)
    mesh = make_mesh(
        service_yaml("reviews", [good1, bad, good2]),
        dr(
            "    loadBalancer: {simple: ROUND_ROBIN}\n"
            "    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 60s,"
            " maxEjectionPercent: 100}"
        ),
    )
    responses = send_all(mesh, mode, [("GET", URL, {})] * 60)
    assert len(bad.received) == 3
    assert sum(r.status_code == 500 for r in responses) == 3


def test_ejected_endpoint_returns_after_its_ejection_time(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """After baseEjectionTime (at the next interval sweep) the endpoint gets traffic again."""
    good, bad = upstreams("good", "bad")
    bad.fail_next(2, 503)
    mesh = make_mesh(
        service_yaml("reviews", [good, bad]),
        dr(
            "    loadBalancer: {simple: ROUND_ROBIN}\n"
            "    outlierDetection: {consecutive5xxErrors: 2, interval: 0.1s, baseEjectionTime: 0.3s,"
            " maxEjectionPercent: 100}"
        ),
    )
    with mesh.client() as client:
        for _ in range(6):
            client.get(URL)
        ejected_at = len(bad.received)
        assert ejected_at == 2

        def back() -> bool:
            client.get(URL)
            return len(bad.received) > ejected_at

        assert wait_for(back, timeout=10)


def test_max_ejection_percent_keeps_endpoints_in_play(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """Istio's default maxEjectionPercent (10%) still ejects one endpoint, but not two."""
    bad1, bad2, good = upstreams("bad1", "bad2", "good")
    bad1.behave(status=500)
    bad2.behave(status=500)
    mesh = make_mesh(
        service_yaml("reviews", [bad1, bad2, good]),
        dr(
            "    loadBalancer: {simple: ROUND_ROBIN}\n"
            "    outlierDetection: {consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 60s}"
        ),
    )
    send_all(mesh, "sync", [("GET", URL, {})] * 60)
    assert min(len(bad1.received), len(bad2.received)) == 2  # one was ejected
    assert max(len(bad1.received), len(bad2.received)) > 10  # the other never is


def test_locality_failover_once_outlier_detection_ejects(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """With outlierDetection on, traffic stays in the caller's locality until its endpoint
    is ejected, then fails over to the next locality."""
    near, far = upstreams("near", "far")
    services = service_yaml("reviews", [near, far])
    services = services.replace("labels: {name: near}", "labels: {name: near}, locality: us/west")
    services = services.replace("labels: {name: far}", "labels: {name: far}, locality: eu/central")
    mesh = make_mesh(
        services,
        dr(
            "    outlierDetection: {consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 60s,"
            " maxEjectionPercent: 100}"
        ),
        locality="us/west/a",
    )
    assert Counter(
        r.headers["x-upstream"] for r in send_all(mesh, "sync", [("GET", URL, {})] * 10)
    ) == {"near": 10}
    near.behave(status=503)
    statuses = [
        (r.status_code, r.headers["x-upstream"])
        for r in send_all(mesh, "sync", [("GET", URL, {})] * 10)
    ]
    assert statuses[:2] == [(503, "near"), (503, "near")]
    assert statuses[2:] == [(200, "far")] * 8


# ------------------------------------------------------------------------------ fault injection


@pytest.mark.parametrize("mode", MODES)
def test_abort_fault_answers_without_upstream_call_and_is_not_retried(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """fault.abort answers with its status and 'fault filter abort'; nothing goes upstream."""
    (up,) = upstreams("u")
    mesh = make_mesh(
        service_yaml("reviews", [up]),
        vs(
            "    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n"
            "    retries: {attempts: 3, retryOn: 5xx}"
        ),
    )
    response = send(mesh, mode, URL)
    assert response.status_code == 503
    assert response.text.strip() == "fault filter abort"
    assert up.received == []


@pytest.mark.parametrize("mode", MODES)
def test_delay_fault_waits_before_the_call_and_switches_off_retries_and_timeout(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """fault.delay delays the request; the route's timeout and retries are off, as in Istio."""
    (up,) = upstreams("u")
    up.fail_next(1, 503)
    mesh = make_mesh(
        service_yaml("reviews", [up]),
        vs(
            "    fault: {delay: {fixedDelay: 0.3s, percentage: {value: 100}}}\n"
            "    timeout: 0.1s\n    retries: {attempts: 3, retryOn: 5xx}"
        ),
    )
    started = time.monotonic()
    response = send(mesh, mode, URL)
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 503  # neither cut by the 0.1 s timeout nor retried
    assert len(up.received) == 1


def test_fault_percentages(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A 25% abort hits about a quarter of 400 seeded requests; no percentage never fires."""
    (up,) = upstreams("u")
    mesh = make_mesh(
        service_yaml("reviews", [up]),
        vs("    fault: {abort: {httpStatus: 500, percentage: {value: 25}}}"),
    )
    statuses = Counter(r.status_code for r in send_all(mesh, "sync", [("GET", URL, {})] * 400))
    assert abs(statuses[500] - 100) <= 30
    never = make_mesh(service_yaml("reviews", [up]), vs("    fault: {abort: {httpStatus: 500}}"))
    assert {r.status_code for r in send_all(never, "sync", [("GET", URL, {})] * 50)} == {200}


def test_header_faults_only_where_mesh_config_allows(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """x-envoy-fault-abort-request is ignored unless MeshConfig allowHeaderFaults is on."""
    (up,) = upstreams("u")
    header = {"x-envoy-fault-abort-request": "418"}
    closed = make_mesh(service_yaml("reviews", [up]))
    assert send(closed, "sync", URL, header).status_code == 200
    opened = make_mesh(
        service_yaml("reviews", [up]),
        "apiVersion: inmesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {allowHeaderFaults: true}\n",
    )
    assert send(opened, "sync", URL, header).status_code == 418


# ------------------------------------------------------------------------------ mirroring


@pytest.mark.parametrize("mode", MODES)
def test_mirror_gets_a_copy_marked_shadow(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """mirror sends a fire-and-forget copy with Host '-shadow'; the caller sees only the main.
    The client stays open until the copy arrives: closing a client drops the copies it
    has not started yet (on a busy machine, the copy's thread or task may not have run)."""
    main, shadow = upstreams("main", "shadow")
    mesh = make_mesh(
        service_yaml("reviews", [main]),
        service_yaml("reviews-next", [shadow]),
        vs("    mirror: {host: reviews-next}"),
    )

    def arrived() -> bool:
        return len(shadow.received) == 1

    if mode == "sync":
        with mesh.client() as client:
            response = client.get(URL + "copy?x=1")
            assert wait_for(arrived)
    else:

        async def run() -> httpx.Response:
            async with mesh.async_client() as client:
                answer = await client.get(URL + "copy?x=1")
                deadline = time.monotonic() + 5.0
                while not arrived() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                return answer

        response = asyncio.run(run())
        assert arrived()
    assert response.headers["x-upstream"] == "main"
    copy = shadow.received[0]
    assert copy.path == "/copy?x=1"
    assert copy.headers["host"] == "reviews-shadow:9080"


def test_mirror_never_delays_or_fails_the_main_request_and_overflow_is_dropped(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A slow, failing mirror changes nothing for the caller; beyond the in-flight bound
    mirrors are dropped and counted."""
    main, shadow = upstreams("main", "shadow")
    shadow.behave(delay=3, status=500)
    mesh = make_mesh(
        service_yaml("reviews", [main]),
        service_yaml("reviews-next", [shadow]),
        vs("    mirror: {host: reviews-next}\n    mirrorPercentage: {value: 100}"),
        "apiVersion: inmesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {mirroring: {maxInFlight: 2}}\n",
    )
    with mesh.client() as client:
        started = time.monotonic()
        responses = [client.get(URL) for _ in range(6)]
        assert time.monotonic() - started < 2  # six main requests end before one mirror answers
    assert [r.status_code for r in responses] == [200] * 6
    assert mesh.state.mirrors_sent == 2
    assert mesh.state.mirrors_dropped == 4


def test_mirror_percentage_zero_sends_nothing(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """mirrorPercentage 0 mirrors nothing."""
    main, shadow = upstreams("main", "shadow")
    mesh = make_mesh(
        service_yaml("reviews", [main]),
        service_yaml("reviews-next", [shadow]),
        vs("    mirror: {host: reviews-next}\n    mirrorPercentage: {value: 0}"),
    )
    send_all(mesh, "sync", [("GET", URL, {})] * 20)
    assert mesh.state.mirrors_sent == 0
    assert shadow.received == []


# ------------------------------------------------------------------------------ regressions


def test_refused_connection_under_a_route_timeout_is_still_a_connect_failure(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A refused connection is a connect failure even when the mesh set the connect
    timeout: Istio's default policy retries it onto the live endpoint (no 504)."""
    dead, alive = upstreams("dead", "alive")
    dead.stop()
    mesh = make_mesh(
        service_yaml("reviews", [dead, alive]),
        vs("    timeout: 2s"),
        dr("    loadBalancer: {simple: ROUND_ROBIN}"),
    )
    assert [r.status_code for r in send_all(mesh, "sync", [("GET", URL, {})] * 4)] == [200] * 4


@pytest.mark.parametrize("mode", MODES)
def test_callers_own_read_timeout_is_not_retried_as_a_mesh_timeout(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """The caller's read timeout (tighter than the route's) raises httpx.ReadTimeout after one
    attempt, although the mesh's deadline set the connect timeout."""
    (slow,) = upstreams("slow")
    slow.behave(delay=3)
    mesh = make_mesh(
        service_yaml("reviews", [slow]),
        vs("    timeout: 1s\n    retries: {attempts: 3, retryOn: 5xx}"),
    )
    with pytest.raises(httpx.ReadTimeout):
        get_once(mesh, mode, timeout=httpx.Timeout(5, read=0.2))
    assert len(slow.received) == 1


def test_cancelled_async_calls_give_back_their_pool_admission(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """A cancelled call releases its connection-pool admission: no overflow afterwards."""
    (slow,) = upstreams("slow")
    slow.behave(delay=0.5)
    mesh = make_mesh(
        service_yaml("reviews", [slow]),
        dr("    connectionPool:\n      http: {http2MaxRequests: 2}"),
    )

    async def run() -> int:
        async with mesh.async_client() as client:
            for _ in range(2):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(client.get(URL), 0.05)
            slow.behave()
            return (await client.get(URL)).status_code

    assert asyncio.run(run()) == 200


@pytest.mark.parametrize("mode", MODES)
def test_a_request_that_cannot_be_built_gives_back_its_pool_admission(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A method httpcore cannot send (not ASCII) fails that call alone: the admission the
    flow took for it is given back, so later calls are not refused as overflow."""
    (up,) = upstreams("up")
    mesh = make_mesh(
        service_yaml("reviews", [up]),
        dr("    connectionPool:\n      http: {http2MaxRequests: 1}"),
    )

    def sync() -> list[int]:
        with mesh.client() as client:
            for _ in range(2):
                with pytest.raises(UnicodeEncodeError):
                    client.request("GÉT", URL)
            return [client.get(URL).status_code for _ in range(2)]

    async def run() -> list[int]:
        async with mesh.async_client() as client:
            for _ in range(2):
                with pytest.raises(UnicodeEncodeError):
                    await client.request("GÉT", URL)
            return [(await client.get(URL)).status_code for _ in range(2)]

    assert (sync() if mode == "sync" else asyncio.run(run())) == [200, 200]
    assert len(up.received) == 2


def test_all_endpoints_ejected_means_no_healthy_upstream(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """With minHealthPercent 0 (Istio's default) Envoy's panic mode is off: once the only
    endpoint is ejected, calls get 503 without reaching it."""
    (bad,) = upstreams("bad")
    bad.behave(status=500)
    mesh = make_mesh(
        service_yaml("reviews", [bad]),
        dr("    outlierDetection: {consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 60s}"),
    )
    responses = send_all(mesh, "sync", [("GET", URL, {})] * 6)
    assert [r.status_code for r in responses] == [500, 500, 503, 503, 503, 503]
    assert "no healthy upstream" in responses[-1].text
    assert len(bad.received) == 2


def test_fault_aborted_request_is_not_mirrored(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """Mirroring happens with the first real attempt: an aborted request sends no copy."""
    main, shadow = upstreams("main", "shadow")
    mesh = make_mesh(
        service_yaml("reviews", [main]),
        service_yaml("reviews-next", [shadow]),
        vs(
            "    mirror: {host: reviews-next}\n"
            "    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}"
        ),
    )
    assert send(mesh, "sync", URL).status_code == 503
    assert mesh.state.mirrors_sent == 0
    assert shadow.received == []
