"""Shared fixtures: real loopback upstreams and meshes built from YAML text."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, settings

from inmesh import Mesh
from inmesh.registry import MemoryRegistry
from inmesh.testing.upstream import Upstream

# Property tests are reproducible (each test's examples derive from its name, not from a
# database or the clock) and judge no timing: this suite runs on shared 2-core machines,
# where a stall, or hypothesis building its character tables on a fresh install, can make
# one draw take seconds.
settings.register_profile(
    "inmesh",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("inmesh")


@pytest.fixture
def upstreams() -> Iterator[Callable[..., list[Upstream]]]:
    """Start named loopback upstreams; all are stopped when the test ends."""
    started: list[Upstream] = []

    def start(*names: str) -> list[Upstream]:
        new = [Upstream(name).start() for name in names]
        started.extend(new)
        return new

    yield start
    for upstream in started:
        upstream.stop()


def service_yaml(
    host: str,
    endpoints: list[Upstream],
    *,
    port: int = 9080,
    labels: list[dict[str, str]] | None = None,
    extra: str = "",
) -> str:
    """A ServiceEntry for ``host:port`` whose endpoints are the given upstreams."""
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: ServiceEntry",
        f"metadata: {{name: {host.replace('.', '-')}}}",
        "spec:",
        f"  hosts: [{host}]",
        f"  ports: [{{number: {port}, name: http, protocol: HTTP}}]",
        "  resolution: STATIC",
        "  endpoints:",
    ]
    for i, upstream in enumerate(endpoints):
        label = labels[i] if labels else {"name": upstream.name}
        rendered = ", ".join(f"{k}: {v}" for k, v in label.items())
        lines.append(
            f"  - {{address: {upstream.address}, ports: {{http: {upstream.port}}}, "
            f"labels: {{{rendered}}}{extra}}}"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture
def make_mesh() -> Iterator[Callable[..., Mesh]]:
    """Build a Mesh over a MemoryRegistry holding the given YAML; closed after the test."""
    meshes: list[Mesh] = []

    def make(*documents: str, **options: object) -> Mesh:
        registry = MemoryRegistry({"mesh.yaml": "\n---\n".join(documents)})
        mesh = Mesh(registry, seed=options.pop("seed", 1234), **options)  # type: ignore[arg-type]
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.close()


Spec = tuple[str, str, dict[str, str]]  # method, url, headers


def send_all(mesh: Mesh, mode: str, specs: list[Spec]) -> list[httpx.Response]:
    """Send requests through a mesh client of the given flavour; bodies are read."""
    if mode == "sync":
        with mesh.client() as client:
            return [client.request(m, u, headers=h) for m, u, h in specs]

    async def run() -> list[httpx.Response]:
        async with mesh.async_client() as client:
            return [await client.request(m, u, headers=h) for m, u, h in specs]

    return asyncio.run(run())


def send(
    mesh: Mesh, mode: str, url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> httpx.Response:
    return send_all(mesh, mode, [(method, url, headers or {})])[0]
