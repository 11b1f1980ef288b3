"""The Mesh object: loading, last-known-good updates, watching a folder, pools, concurrency."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import inmesh
from inmesh import ConfigError, Mesh, MeshStatus
from inmesh.registry import MemoryRegistry
from inmesh.snapshot import _RESOLVED_CAP, Cluster
from inmesh.testing.upstream import Upstream

from .conftest import service_yaml

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: {subset}}}
      weight: {weight}
"""

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_public_names_are_pinned() -> None:
    """The public API is exactly this list: additions are deliberate; removals need deprecation."""
    assert sorted(inmesh.__all__) == sorted(
        [
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
    )
    for name in inmesh.__all__:
        assert getattr(inmesh, name) is not None
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, inmesh.MeshError)


def test_import_is_cheap() -> None:
    """`import inmesh` loads neither httpx, grpc, yaml, watchfiles nor re2."""
    code = (
        "import sys, inmesh; heavy = [m for m in ('httpx', 'grpc', 'yaml', 'watchfiles', 're2', "
        "'opentelemetry') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_invalid_initial_config_raises_with_location() -> None:
    """A Mesh cannot start on a broken registry: the error names source, line and field."""
    registry = MemoryRegistry({"mesh.d/reviews.yaml": VS.format(subset="v1", weight=-1)})
    with pytest.raises(ConfigError) as caught:
        Mesh(registry)
    assert "mesh.d/reviews.yaml:10 spec.http[0].route[0].weight" in str(caught.value)


def test_invalid_update_keeps_last_good_and_next_valid_update_applies(
    upstreams: Callable[..., list[Upstream]],
) -> None:
    """A bad update is rejected whole (status says why), the old routes serve, a fix applies."""
    v1, v2 = upstreams("v1", "v2")
    services = service_yaml("reviews", [v1, v2], labels=[{"version": "v1"}, {"version": "v2"}])
    registry = MemoryRegistry(
        {
            "a-services.yaml": services + "---\n" + DR,
            "b-routes.yaml": VS.format(subset="v1", weight=100),
        }
    )
    statuses: list[MeshStatus] = []
    with Mesh(registry) as mesh, mesh.client() as client:
        mesh.on_update(statuses.append)
        assert client.get("http://reviews:9080/").headers["x-upstream"] == "v1"

        # Broken: one good change (v2) and one bad field in the same update: nothing applies.
        registry.put("b-routes.yaml", VS.format(subset="v2", weight=100) + "    bogus: 1\n")
        assert statuses[-1].ok is False
        assert mesh.status.version == 1
        assert any(
            "b-routes.yaml:11" in str(p) and "bogus" in str(p) for p in statuses[-1].problems
        )
        assert client.get("http://reviews:9080/").headers["x-upstream"] == "v1"

        registry.put("b-routes.yaml", VS.format(subset="v2", weight=100))
        assert statuses[-1].ok is True
        assert mesh.status.version == 2
        assert client.get("http://reviews:9080/").headers["x-upstream"] == "v2"


def test_cross_resource_conflicts_are_rejected() -> None:
    """Two VirtualServices claiming one host are a configuration error naming both."""
    first = VS.format(subset="v1", weight=100)
    second = first.replace("name: reviews", "name: reviews-2")
    registry = MemoryRegistry({"one.yaml": first, "two.yaml": second})
    with pytest.raises(ConfigError) as caught:
        Mesh(registry)
    message = str(caught.value)
    assert "two.yaml" in message and "already claimed by VirtualService reviews" in message


def test_folder_is_watched_by_every_mesh(
    upstreams: Callable[..., list[Upstream]], tmp_path: Path
) -> None:
    """A saved change reaches every Mesh watching the folder; a broken save is rejected."""
    v1, v2 = upstreams("v1", "v2")
    folder = tmp_path / "mesh.d"
    folder.mkdir()
    (folder / "services.yaml").write_text(
        service_yaml("reviews", [v1, v2], labels=[{"version": "v1"}, {"version": "v2"}])
        + "---\n"
        + DR
    )
    routes = folder / "routes.yaml"
    routes.write_text(VS.format(subset="v1", weight=100))
    with Mesh(folder) as first, Mesh(str(folder)) as second:
        assert first.snapshot.version == second.snapshot.version == 1
        routes.write_text(VS.format(subset="v2", weight=100))
        assert wait_for(lambda: first.status.version == 2 and second.status.version == 2)
        for mesh in (first, second):
            with mesh.client() as client:
                assert client.get("http://reviews:9080/").headers["x-upstream"] == "v2"

        routes.write_text(VS.format(subset="v1", weight="heavy"))
        assert wait_for(lambda: not first.status.ok and not second.status.ok)
        assert "routes.yaml:10 spec.http[0].route[0].weight" in first.status.error  # type: ignore[operator]
        with first.client() as client:
            assert client.get("http://reviews:9080/").headers["x-upstream"] == "v2"


def test_in_flight_request_finishes_on_its_snapshot(
    upstreams: Callable[..., list[Upstream]],
) -> None:
    """A streamed response that began before an update completes from the endpoint it started on."""
    v1, v2 = upstreams("v1", "v2")
    services = service_yaml("reviews", [v1, v2], labels=[{"version": "v1"}, {"version": "v2"}])
    registry = MemoryRegistry(
        {"s.yaml": services + "---\n" + DR, "r.yaml": VS.format(subset="v1", weight=100)}
    )
    with Mesh(registry) as mesh, mesh.client() as client:
        with client.stream("GET", "http://reviews:9080/?bytes=200000") as response:
            registry.put("r.yaml", VS.format(subset="v2", weight=100))
            assert mesh.status.version == 2
            assert len(response.read()) == 200_000
            assert response.headers["x-upstream"] == "v1"
        assert client.get("http://reviews:9080/").headers["x-upstream"] == "v2"


def test_each_endpoint_has_its_own_pool_and_departed_pools_close(
    upstreams: Callable[..., list[Upstream]],
) -> None:
    """Pools are per endpoint; when an endpoint leaves the registry its pool is closed."""
    a, b = upstreams("a", "b")
    registry = MemoryRegistry({"s.yaml": service_yaml("reviews", [a, b])})
    with Mesh(registry, seed=3) as mesh:
        transport = mesh.transport()
        with httpx.Client(transport=transport) as client:
            for _ in range(10):
                client.get("http://reviews:9080/")
            pools = dict(transport._pools.entries)
            assert set(pools) == {
                ("http", a.address, a.port, None),
                ("http", b.address, b.port, None),
            }
            departed = pools[("http", b.address, b.port, None)].resource
            assert departed.connections  # a kept-alive connection

            registry.put("s.yaml", service_yaml("reviews", [a]))
            client.get("http://reviews:9080/")  # the next request reconciles pools
            assert set(transport._pools.entries) == {("http", a.address, a.port, None)}
            assert departed.connections == []


def test_one_mesh_shared_by_threads(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
) -> None:
    """Eight threads share one client: every request succeeds and active counts return to zero."""
    ups = upstreams("t1", "t2", "t3")
    mesh = make_mesh(service_yaml("reviews", ups))
    counts: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    with mesh.client() as client:

        def work() -> None:
            try:
                for _ in range(40):
                    name = client.get("http://reviews:9080/").headers["x-upstream"]
                    with lock:
                        counts[name] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    assert sum(counts.values()) == 320
    assert set(counts) == {"t1", "t2", "t3"}
    assert all(mesh.stats.get((u.address, u.port)).active == 0 for u in ups)


def test_one_mesh_shared_by_tasks(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
) -> None:
    """A hundred concurrent asyncio tasks share one async client."""
    ups = upstreams("a1", "a2")
    mesh = make_mesh(service_yaml("reviews", ups))

    async def run() -> list[int]:
        async with mesh.async_client() as client:
            responses = await asyncio.gather(
                *(client.get("http://reviews:9080/") for _ in range(100))
            )
            return [r.status_code for r in responses]

    assert asyncio.run(run()) == [200] * 100
    assert all(mesh.stats.get((u.address, u.port)).active == 0 for u in ups)


def test_client_kwargs_pass_through_to_httpx(
    upstreams: Callable[..., list[Upstream]],
    make_mesh: Callable[..., Mesh],
) -> None:
    """Client options (headers, base_url, timeout) reach httpx; transport options the pools."""
    (up,) = upstreams("kw")
    mesh = make_mesh(service_yaml("reviews", [up]))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with mesh.client(
        base_url="http://reviews:9080", headers={"x-team": "a"}, timeout=3, limits=limits
    ) as client:
        response = client.get("/x")
        pool = next(iter(client._transport._pools.entries.values())).resource  # type: ignore[attr-defined]
    assert response.status_code == 200
    assert up.received[-1].headers["x-team"] == "a"
    assert pool._max_connections == 1


def test_mesh_close_stops_watching_and_closes_pools(
    upstreams: Callable[..., list[Upstream]],
    tmp_path: Path,
) -> None:
    """close() ends the watcher thread and closes the pools of the mesh's transports."""
    (up,) = upstreams("c")
    (tmp_path / "s.yaml").write_text(service_yaml("reviews", [up]))
    before = {t.name for t in threading.enumerate()}
    mesh = Mesh(tmp_path)
    client = mesh.client()
    client.get("http://reviews:9080/")
    pool = next(iter(client._transport._pools.entries.values())).resource  # type: ignore[attr-defined]
    assert pool.connections
    mesh.close()
    assert pool.connections == []
    assert wait_for(lambda: {t.name for t in threading.enumerate()} <= before)
    mesh.close()  # idempotent


def test_closing_one_mesh_leaves_a_shared_registry_serving_others(
    upstreams: Callable[..., list[Upstream]],
) -> None:
    """A registry passed in is not closed by Mesh.close(): other Meshes on it keep updating."""
    v1, v2 = upstreams("v1", "v2")
    services = service_yaml("reviews", [v1, v2], labels=[{"version": "v1"}, {"version": "v2"}])
    registry = MemoryRegistry(
        {"s.yaml": services + "---\n" + DR, "r.yaml": VS.format(subset="v1", weight=100)}
    )
    first, second = Mesh(registry), Mesh(registry)
    first.close()
    registry.put("r.yaml", VS.format(subset="v2", weight=100))
    assert first.status.version == 1
    assert second.status.version == 2
    second.close()


def test_cluster_resolution_memo_is_bounded_and_stays_right() -> None:
    """Resolving a destination is memoized per snapshot; request ports are the caller's to
    choose, so many of them must neither grow the memo without bound nor go wrong."""
    one_port = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http}]
  endpoints: [{address: 127.0.0.1}]
"""
    with Mesh(MemoryRegistry({"m.yaml": one_port}), watch=False) as mesh:
        snapshot = mesh.snapshot
        first = snapshot.resolve(None, "reviews", 9080)
        assert isinstance(first, Cluster)
        # A service with one port serves a request on any port (Istio's single-port rule).
        clusters = {snapshot.resolve(None, "reviews", port) for port in range(1, 6000)}
        assert clusters == {first}
        assert 0 < len(snapshot._resolved) <= _RESOLVED_CAP
