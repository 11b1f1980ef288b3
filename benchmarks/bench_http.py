"""The mesh client against the bare httpx client, same upstreams, same run.

    python benchmarks/bench_http.py [--requests 500] [--rounds 20] [--slow-upstream]
        [--share-cores]

Two upstream processes on 127.0.0.1 (a minimal keep-alive responder, so the client's own
work is a visible share of each request; the client has core 0 to itself, the upstreams
the other cores). The bare client alternates between their URLs; the mesh client calls
the logical host ``reviews:9080`` whose VirtualService matches a header and splits 50/50
by weight between two subsets, each with the default LEAST_REQUEST balancer. Rounds
alternate bare and mesh so drift in the machine hits both alike; the figure is the
median per-request time over rounds, and the ratio mesh / bare.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator

import httpcore
import httpx

from _servers import print_pairs, upstream_processes
from inmesh import Mesh
from inmesh.registry import MemoryRegistry

REGISTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  ports: [{{number: 9080, name: http}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {a}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {b}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}, uri: {{prefix: /admin}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - match: [{{uri: {{prefix: /reviews}}}}]
    route:
    - {{destination: {{host: reviews, subset: v1}}, weight: 50}}
    - {{destination: {{host: reviews, subset: v2}}, weight: 50}}
"""


Timing = tuple[float, float]  # (wall seconds, client CPU seconds) per request


def per_request_sync(client: httpx.Client, urls: list[str], count: int) -> Timing:
    start, cpu = time.perf_counter(), time.thread_time()
    for i in range(count):
        client.get(urls[i & 1])
    return (time.perf_counter() - start) / count, (time.thread_time() - cpu) / count


async def per_request_async(client: httpx.AsyncClient, urls: list[str], count: int) -> Timing:
    start, cpu = time.perf_counter(), time.thread_time()
    for i in range(count):
        await client.get(urls[i & 1])
    return (time.perf_counter() - start) / count, (time.thread_time() - cpu) / count


class _MemoryPool:
    """An httpcore pool that answers at once from memory: no sockets, no upstream."""

    class _Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"{}"

        def close(self) -> None:
            pass

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        for _ in request.stream:  # type: ignore[union-attr]
            pass
        return httpcore.Response(
            200,
            headers=[(b"content-length", b"2")],
            content=self._Body(),
            extensions={"http_version": b"HTTP/1.1"},
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> _MemoryPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def transport_overhead(mesh: Mesh, rounds: int, count: int = 2000) -> None:
    """The transports' own cost, with the network taken out: both clients talk to the same
    in-memory pool, so the difference is the mesh's work per request (plan, flow, pick)."""
    bare_transport = httpx.HTTPTransport()
    bare_transport._pool = _MemoryPool()  # type: ignore[assignment]
    mesh_transport = mesh.transport()
    mesh_transport._pools._factory = lambda _key: _MemoryPool()
    bare_ts, mesh_ts = [], []
    with (
        httpx.Client(transport=bare_transport) as bare,
        httpx.Client(transport=mesh_transport) as meshed,
    ):
        for _ in range(rounds):
            for client, url, into in (
                (bare, "http://127.0.0.1:8080/reviews/0", bare_ts),
                (meshed, "http://reviews:9080/reviews/0", mesh_ts),
            ):
                start = time.thread_time()
                for _ in range(count):
                    client.get(url)
                into.append((time.thread_time() - start) / count)
    bare_t, mesh_t = min(bare_ts), min(mesh_ts)
    print(
        f"  in-memory pool (no network), best of {rounds}: bare client {bare_t * 1e6:.1f} µs,"
        f" mesh client {mesh_t * 1e6:.1f} µs: the mesh adds {(mesh_t - bare_t) * 1e6:.1f} µs"
        " of CPU per request"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--slow-upstream",
        action="store_true",
        help="use the stdlib test upstream (~1 ms a request) instead of the fast one",
    )
    parser.add_argument(
        "--share-cores",
        action="store_true",
        help="leave the upstreams unpinned (they may share the client's core)",
    )
    args = parser.parse_args()
    upstreams = upstream_processes("a", "b", fast=not args.slow_upstream, pin=not args.share_cores)
    with upstreams as (a, b):
        bare_urls = [f"http://127.0.0.1:{a}/reviews/0", f"http://127.0.0.1:{b}/reviews/0"]
        mesh_urls = ["http://reviews:9080/reviews/0"] * 2
        mesh = Mesh(MemoryRegistry({"bench.yaml": REGISTRY.format(a=a, b=b)}), seed=1)
        results: dict[str, list[Timing]] = {
            k: [] for k in ("sync bare", "sync mesh", "async bare", "async mesh")
        }
        with httpx.Client() as bare, mesh.client() as meshed:
            per_request_sync(bare, bare_urls, 200)  # warm up connections and code paths
            per_request_sync(meshed, mesh_urls, 200)
            for r in range(args.rounds):
                # Alternate which goes first, so neither always runs on a warmer machine.
                for kind in ("bare", "mesh") if r % 2 == 0 else ("mesh", "bare"):
                    client, urls = (bare, bare_urls) if kind == "bare" else (meshed, mesh_urls)
                    results[f"sync {kind}"].append(per_request_sync(client, urls, args.requests))

        async def run_async() -> None:
            async with httpx.AsyncClient() as bare_a, mesh.async_client() as meshed_a:
                await per_request_async(bare_a, bare_urls, 200)
                await per_request_async(meshed_a, mesh_urls, 200)
                for r in range(args.rounds):
                    for kind in ("bare", "mesh") if r % 2 == 0 else ("mesh", "bare"):
                        client, urls = (
                            (bare_a, bare_urls) if kind == "bare" else (meshed_a, mesh_urls)
                        )
                        results[f"async {kind}"].append(
                            await per_request_async(client, urls, args.requests)
                        )

        asyncio.run(run_async())
        transport_overhead(mesh, rounds=7)
        mesh.close()

    print(f"{args.requests} requests x {args.rounds} rounds, alternating; median per request")
    print("  (client CPU: this thread's CPU time, insensitive to the upstreams' scheduling)")
    print_pairs(results, ("sync", "async"))


if __name__ == "__main__":
    main()
