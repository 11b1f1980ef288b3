"""Routing through the httpx transports against real loopback upstreams, sync and async.

Each matcher is checked end to end: a VirtualService sends matching requests to one
upstream and everything else to another, and the test asserts which upstream answered.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from inmesh import Mesh
from inmesh.testing.upstream import Upstream

from .conftest import send, send_all, service_yaml

MODES = ["sync", "async"]


def two_way(v1: Upstream, v2: Upstream, match: str, host: str = "reviews") -> list[str]:
    """Registry: ``host`` with subsets v1/v2; requests matching ``match`` go to v2."""
    return [
        service_yaml(host, [v1, v2], labels=[{"version": "v1"}, {"version": "v2"}]),
        f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}}}
spec:
  host: {host}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
""",
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:
  - match: {match}
    route:
    - destination: {{host: {host}, subset: v2}}
  - route:
    - destination: {{host: {host}, subset: v1}}
""",
    ]


MATCH_CASES = [
    # (match block(s), request path, headers, method, expect v2?)
    ("[{uri: {exact: /a}}]", "/a", {}, "GET", True),
    ("[{uri: {exact: /a}}]", "/a/b", {}, "GET", False),
    ("[{uri: {exact: /a}}]", "/a?x=1", {}, "GET", True),  # the query is not part of the path
    ("[{uri: {prefix: /api}}]", "/api/v1", {}, "GET", True),
    ("[{uri: {prefix: /api}}]", "/ap", {}, "GET", False),
    ("[{uri: {regex: '/reviews/[0-9]+'}}]", "/reviews/12", {}, "GET", True),
    ("[{uri: {regex: '/reviews/[0-9]+'}}]", "/reviews/12x", {}, "GET", False),  # full match
    ("[{uri: {prefix: /API}, ignoreUriCase: true}]", "/api/x", {}, "GET", True),
    ("[{uri: {exact: /API}, ignoreUriCase: true}]", "/Api", {}, "GET", True),
    # Istio ignores case for exact and prefix only
    ("[{uri: {regex: '/API/.*'}, ignoreUriCase: true}]", "/api/x", {}, "GET", False),
    ("[{uri: {prefix: /API}}]", "/api/x", {}, "GET", False),
    ("[{method: {exact: POST}}]", "/", {}, "POST", True),
    ("[{method: {exact: POST}}]", "/", {}, "GET", False),
    ("[{method: {regex: 'PUT|PATCH'}}]", "/", {}, "PATCH", True),
    ("[{scheme: {exact: http}}]", "/", {}, "GET", True),
    ("[{scheme: {exact: https}}]", "/", {}, "GET", False),
    ("[{authority: {exact: 'reviews:9080'}}]", "/", {}, "GET", True),
    ("[{authority: {prefix: other}}]", "/", {}, "GET", False),
    ("[{authority: {regex: 'rev.*'}}]", "/", {}, "GET", True),
    ("[{headers: {end-user: {exact: jason}}}]", "/", {"end-user": "jason"}, "GET", True),
    ("[{headers: {end-user: {exact: jason}}}]", "/", {"end-user": "jasonx"}, "GET", False),
    ("[{headers: {end-user: {exact: jason}}}]", "/", {}, "GET", False),
    ("[{headers: {End-User: {exact: jason}}}]", "/", {"END-USER": "jason"}, "GET", True),
    ("[{headers: {x-tier: {prefix: gold}}}]", "/", {"x-tier": "gold-plus"}, "GET", True),
    ("[{headers: {x-tier: {regex: 'gold|silver'}}}]", "/", {"x-tier": "silver"}, "GET", True),
    ("[{headers: {x-tier: {regex: 'gold|silver'}}}]", "/", {"x-tier": "silverx"}, "GET", False),
    ("[{headers: {x-canary: {}}}]", "/", {"x-canary": ""}, "GET", True),
    ("[{headers: {x-canary: {}}}]", "/", {}, "GET", False),
    ("[{withoutHeaders: {x-canary: {exact: 'no'}}}]", "/", {}, "GET", True),  # missing = empty
    ("[{withoutHeaders: {x-canary: {exact: 'no'}}}]", "/", {"x-canary": "no"}, "GET", False),
    ("[{withoutHeaders: {x-canary: {exact: 'no'}}}]", "/", {"x-canary": "yes"}, "GET", True),
    ("[{withoutHeaders: {x-canary: {}}}]", "/", {"x-canary": "1"}, "GET", False),
    ("[{withoutHeaders: {x-canary: {regex: '.*'}}}]", "/", {}, "GET", False),
    ("[{queryParams: {debug: {exact: '1'}}}]", "/p?debug=1", {}, "GET", True),
    ("[{queryParams: {debug: {exact: '1'}}}]", "/p?debug=2", {}, "GET", False),
    ("[{queryParams: {debug: {regex: '[0-9]+'}}}]", "/p?x=a&debug=42", {}, "GET", True),
    ("[{queryParams: {debug: {}}}]", "/p?debug", {}, "GET", True),
    ("[{queryParams: {debug: {}}}]", "/p", {}, "GET", False),
    ("[{port: 9080}]", "/", {}, "GET", True),
    ("[{port: 9081}]", "/", {}, "GET", False),
    # ANDed inside a block, ORed across blocks
    ("[{uri: {prefix: /a}, headers: {u: {exact: x}}}]", "/a", {"u": "x"}, "GET", True),
    ("[{uri: {prefix: /a}, headers: {u: {exact: x}}}]", "/a", {"u": "y"}, "GET", False),
    ("[{uri: {prefix: /a}}, {headers: {u: {exact: x}}}]", "/b", {"u": "x"}, "GET", True),
    ("[{uri: {prefix: /a}}, {headers: {u: {exact: x}}}]", "/b", {"u": "y"}, "GET", False),
    ("[{sourceLabels: {app: productpage}}]", "/", {}, "GET", True),
    ("[{sourceLabels: {app: ratings}}]", "/", {}, "GET", False),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("match", "path", "headers", "method", "to_v2"), MATCH_CASES)
def test_match_conditions(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
    mode: str,
    match: str,
    path: str,
    headers: dict[str, str],
    method: str,
    to_v2: bool,
) -> None:
    """Each Istio match condition sends exactly the requests it describes to the matched route."""
    v1, v2 = upstreams("v1", "v2")
    mesh = make_mesh(*two_way(v1, v2, match), workload="productpage")
    response = send(mesh, mode, f"http://reviews:9080{path}", headers, method)
    assert response.status_code == 200
    assert response.headers["x-upstream"] == ("v2" if to_v2 else "v1")


@pytest.mark.parametrize("mode", MODES)
def test_a_method_given_as_bytes_is_matched_and_sent(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """httpx keeps ``client.request(b"POST", ...)``'s method as bytes; the mesh matches it
    as text and sends it as it is, as bare httpx does."""
    v1, v2 = upstreams("v1", "v2")
    mesh = make_mesh(*two_way(v1, v2, "[{method: {exact: POST}}]"))

    async def run() -> httpx.Response:
        async with mesh.async_client() as client:
            return await client.request(b"POST", "http://reviews:9080/", content=b"x")  # type: ignore[arg-type]

    if mode == "sync":
        with mesh.client() as client:
            response = client.request(b"POST", "http://reviews:9080/", content=b"x")  # type: ignore[arg-type]
    else:
        response = asyncio.run(run())
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "v2"
    assert v2.received[-1].method == "POST"


@pytest.mark.parametrize("mode", MODES)
def test_upstream_sees_logical_host_and_caller_keeps_logical_url(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """The endpoint gets the request with Host reviews:9080; the response URL stays logical."""
    (up,) = upstreams("reviews-1")
    mesh = make_mesh(service_yaml("reviews", [up]))
    response = send(mesh, mode, "http://reviews:9080/reviews/0?x=1", {"end-user": "jason"})
    assert response.status_code == 200
    assert str(response.url) == "http://reviews:9080/reviews/0?x=1"
    seen = up.received[-1]
    assert seen.path == "/reviews/0?x=1"
    assert seen.headers["host"] == "reviews:9080"
    assert seen.headers["end-user"] == "jason"
    info = response.extensions["inmesh"]
    assert info.cluster == "outbound|9080||reviews"
    assert str(info.endpoint) == f"127.0.0.1:{up.port}"
    assert info.virtual_service is None and info.route is None


@pytest.mark.parametrize("mode", MODES)
def test_first_matching_rule_wins(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """Two rules both match: the earlier one takes the request."""
    v1, v2 = upstreams("v1", "v2")
    docs = two_way(v1, v2, "[{uri: {prefix: /}}]")
    docs[2] = docs[2].replace(
        "  http:\n",
        "  http:\n  - match: [{uri: {prefix: /first}}]\n"
        "    route:\n    - destination: {host: reviews, subset: v1}\n",
    )
    mesh = make_mesh(*docs)
    assert send(mesh, mode, "http://reviews:9080/first").headers["x-upstream"] == "v1"
    assert send(mesh, mode, "http://reviews:9080/second").headers["x-upstream"] == "v2"


@pytest.mark.parametrize("mode", MODES)
def test_wildcard_virtual_service_host(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A VirtualService for ``*.example.com`` routes every host under it; the longest
    wildcard wins, and a host outside both is not routed by either."""
    v1, v2 = upstreams("v1", "v2")
    docs = two_way(v1, v2, "[{uri: {prefix: /none}}]")
    wide = (
        docs[2]
        .replace("name: reviews}", "name: wide}")
        .replace("hosts: [reviews]", "hosts: ['*.example.com']")
    )
    narrow = (
        wide.replace("name: wide}", "name: narrow}")
        .replace("hosts: ['*.example.com']", "hosts: ['*.api.example.com']")
        .replace("subset: v1}", "subset: v2}")
    )
    registry_only = (  # a host the lookup missed is refused here, never looked up in DNS
        "apiVersion: inmesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        "spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n"
    )
    mesh = make_mesh(docs[0], docs[1], wide, narrow, registry_only)
    assert send(mesh, mode, "http://shop.example.com:9080/").headers["x-upstream"] == "v1"
    assert send(mesh, mode, "http://v.api.example.com:9080/").headers["x-upstream"] == "v2"
    assert mesh.snapshot.route_table("example.org") is None


@pytest.mark.parametrize("mode", MODES)
def test_no_matching_route_is_404_without_upstream_call(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """No rule matches: the mesh answers 404 itself and no upstream sees the request."""
    v1, v2 = upstreams("v1", "v2")
    docs = two_way(v1, v2, "[{uri: {prefix: /only}}]")
    docs[2] = docs[2].split("  - route:")[0]  # drop the catch-all rule
    mesh = make_mesh(*docs)
    response = send(mesh, mode, "http://reviews:9080/elsewhere")
    assert response.status_code == 404
    assert v1.received == [] and v2.received == []


@pytest.mark.parametrize("mode", MODES)
def test_undefined_subset_is_503(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A route to a subset no DestinationRule defines answers 503, without an upstream call."""
    v1, v2 = upstreams("v1", "v2")
    docs = two_way(v1, v2, "[{uri: {prefix: /}}]")
    docs[2] = docs[2].replace("subset: v2", "subset: v9")
    mesh = make_mesh(*docs)
    response = send(mesh, mode, "http://reviews:9080/")
    assert response.status_code == 503
    assert "v9" in response.text
    assert v1.received == [] and v2.received == []


@pytest.mark.parametrize("mode", MODES)
def test_weighted_split_follows_relative_weights(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """Weights 5:3:2 split 1,000 seeded requests within ±4 points of 50/30/20."""
    a, b, c = upstreams("a", "b", "c")
    mesh = make_mesh(
        service_yaml("reviews", [a, b, c], labels=[{"v": "a"}, {"v": "b"}, {"v": "c"}]),
        """
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: a, labels: {v: a}}, {name: b, labels: {v: b}}, {name: c, labels: {v: c}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: a}, weight: 5}
    - {destination: {host: reviews, subset: b}, weight: 3}
    - {destination: {host: reviews, subset: c}, weight: 2}
""",
    )
    responses = send_all(mesh, mode, [("GET", "http://reviews:9080/", {})] * 1000)
    counts = Counter(r.headers["x-upstream"] for r in responses)
    assert abs(counts["a"] - 500) <= 40
    assert abs(counts["b"] - 300) <= 40
    assert abs(counts["c"] - 200) <= 40


@pytest.mark.parametrize("mode", MODES)
def test_host_without_virtual_service_uses_all_endpoints(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """With only a ServiceEntry, requests spread over every endpoint of the service."""
    ups = upstreams("e1", "e2", "e3")
    mesh = make_mesh(service_yaml("ratings", ups))
    responses = send_all(mesh, mode, [("GET", "http://ratings:9080/", {})] * 60)
    counts = Counter(r.headers["x-upstream"] for r in responses)
    assert set(counts) == {"e1", "e2", "e3"}


@pytest.mark.parametrize("mode", MODES)
def test_redirect_is_answered_by_the_mesh(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """A redirect rule answers with its code and Location; nothing goes upstream."""
    (up,) = upstreams("r")
    mesh = make_mesh(
        service_yaml("reviews", [up]),
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: newreviews}
  - match: [{uri: {prefix: /perm}}]
    redirect: {uri: /p, redirectCode: 308}
""",
    )
    response = send(mesh, mode, "http://reviews:9080/old/x?q=1")
    assert response.status_code == 301
    assert response.headers["location"] == "http://newreviews/new?q=1"
    response = send(mesh, mode, "http://reviews:9080/perm")
    assert response.status_code == 308
    assert response.headers["location"] == "http://reviews:9080/p"
    assert up.received == []


@pytest.mark.parametrize("mode", MODES)
def test_rewrite_uri_prefix_regex_and_authority(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """Prefix rewrites swap the matched prefix; regex rewrites substitute; authority sets Host."""
    (up,) = upstreams("r")
    mesh = make_mesh(
        service_yaml("reviews", [up]),
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /v1/}}]
    rewrite: {uri: /api/, authority: internal.reviews}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {exact: /exact}}]
    rewrite: {uri: /replaced}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /users/}}]
    rewrite: {uriRegexRewrite: {match: '^/users/([^/]+)/books$', rewrite: '/books?owner=\\1'}}
    route: [{destination: {host: reviews}}]
""",
    )
    send(mesh, mode, "http://reviews:9080/v1/items/3?x=1")
    assert up.received[-1].path == "/api/items/3?x=1"
    assert up.received[-1].headers["host"] == "internal.reviews"
    send(mesh, mode, "http://reviews:9080/exact")
    assert up.received[-1].path == "/replaced"
    assert up.received[-1].headers["host"] == "reviews:9080"
    send(mesh, mode, "http://reviews:9080/users/ann/books")
    assert up.received[-1].path == "/books?owner=ann"


@pytest.mark.parametrize("mode", MODES)
def test_request_and_response_header_operations(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """Route and destination header edits apply: set replaces, add appends, remove drops."""
    (up,) = upstreams("r")
    mesh = make_mesh(
        service_yaml("reviews", [up]),
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - headers:
      request:
        set: {x-set: route}
        add: {x-add: one}
        remove: [x-secret]
      response:
        set: {x-upstream: hidden}
        add: {x-served-by: mesh}
        remove: [content-type]
    route:
    - destination: {host: reviews}
      headers:
        request: {set: {x-dest: d}}
        response: {add: {x-dest-response: "yes"}}
""",
    )
    response = send(
        mesh, mode, "http://reviews:9080/", {"x-set": "caller", "x-secret": "s", "x-add": "zero"}
    )
    seen = up.received[-1].headers
    assert seen["x-set"] == "route"
    assert "x-secret" not in seen
    assert seen["x-add"] == "zero, one"
    assert seen["x-dest"] == "d"
    assert response.headers["x-upstream"] == "hidden"
    assert response.headers["x-served-by"] == "mesh"
    assert response.headers["x-dest-response"] == "yes"
    assert "content-type" not in response.headers


@pytest.mark.parametrize("mode", MODES)
def test_unknown_host_passes_through_and_registry_only_refuses(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """ALLOW_ANY sends unknown hosts as addressed; REGISTRY_ONLY answers 502 without sending."""
    (up,) = upstreams("outside")
    open_mesh = make_mesh(service_yaml("reviews", [up]))
    url = f"http://127.0.0.1:{up.port}/direct"
    response = send(open_mesh, mode, url)
    assert response.status_code == 200
    assert up.received[-1].path == "/direct"
    assert "inmesh" not in response.extensions

    closed = make_mesh(
        service_yaml("reviews", [up]),
        "apiVersion: inmesh.io/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        "spec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n",
    )
    before = len(up.received)
    response = send(closed, mode, url)
    assert response.status_code == 502
    assert "REGISTRY_ONLY" in response.text
    assert len(up.received) == before


def test_streaming_response_is_not_read_by_the_mesh(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """client.stream() hands the body over in chunks; the mesh buffers nothing."""
    (up,) = upstreams("big")
    mesh = make_mesh(service_yaml("blobs", [up]))
    with mesh.client() as client, client.stream("GET", "http://blobs:9080/?bytes=1000000") as r:
        assert not r.is_stream_consumed
        chunks = list(r.iter_raw())
    assert sum(len(c) for c in chunks) == 1_000_000
    assert len(chunks) > 1
    assert mesh.stats.get((up.address, up.port)).active == 0


def test_async_streaming_response(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """The async client streams too, and the endpoint's active count returns to zero on close."""
    (up,) = upstreams("big")
    mesh = make_mesh(service_yaml("blobs", [up]))

    async def run() -> int:
        async with (
            mesh.async_client() as client,
            client.stream("GET", "http://blobs:9080/?bytes=500000") as r,
        ):
            assert mesh.stats.get((up.address, up.port)).active == 1
            return sum([len(c) async for c in r.aiter_raw()])

    assert asyncio.run(run()) == 500_000
    assert mesh.stats.get((up.address, up.port)).active == 0


@pytest.mark.parametrize("mode", MODES)
def test_connect_failure_is_httpx_connect_error_with_mesh_reason(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh], mode: str
) -> None:
    """An endpoint that refuses connections raises httpx.ConnectError, the mesh's reason chained."""
    (up,) = upstreams("gone")
    up.stop()  # the port is now closed
    mesh = make_mesh(service_yaml("reviews", [up]))
    with pytest.raises(httpx.ConnectError) as caught:
        send(mesh, mode, "http://reviews:9080/")
    from inmesh import UpstreamError

    assert isinstance(caught.value.__cause__, UpstreamError)
    assert f"127.0.0.1:{up.port}" in str(caught.value.__cause__)
    assert "outbound|9080||reviews" in str(caught.value)


def test_dns_resolution_connects_to_the_endpoint_hostname(
    upstreams: Callable[..., list[Upstream]], make_mesh: Callable[..., Mesh]
) -> None:
    """resolution: DNS endpoints are hostnames resolved when connecting."""
    (up,) = upstreams("dns")
    mesh = make_mesh(f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext}}
spec:
  hosts: [api.example.internal]
  ports: [{{number: 80, name: http}}]
  resolution: DNS
  endpoints: [{{address: localhost, ports: {{http: {up.port}}}}}]
""")
    with mesh.client() as client:
        response = client.get("http://api.example.internal/x")
    assert response.status_code == 200
    assert up.received[-1].headers["host"] == "api.example.internal"
