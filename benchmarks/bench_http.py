"""The mesh client against the bare httpx client, same upstreams, same run.

    python benchmarks/bench_http.py [--requests 2000] [--rounds 5]

Two upstream processes on 127.0.0.1. The bare client alternates between their URLs; the
mesh client calls the logical host ``reviews:9080`` whose VirtualService matches a header
and splits 50/50 by weight between two subsets, each with the default LEAST_REQUEST
balancer. Rounds alternate bare and mesh so drift in the machine hits both alike; the
figure is the median per-request time over rounds, and the ratio mesh / bare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from inmesh import Mesh
from inmesh.registry import MemoryRegistry

from _servers import upstream_processes

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


def per_request_sync(client: httpx.Client, urls: list[str], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        client.get(urls[i & 1])
    return (time.perf_counter() - start) / count


async def per_request_async(client: httpx.AsyncClient, urls: list[str], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        await client.get(urls[i & 1])
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with upstream_processes("a", "b") as (a, b):
        bare_urls = [f"http://127.0.0.1:{a}/reviews/0", f"http://127.0.0.1:{b}/reviews/0"]
        mesh_urls = ["http://reviews:9080/reviews/0"] * 2
        mesh = Mesh(MemoryRegistry({"bench.yaml": REGISTRY.format(a=a, b=b)}), seed=1)
        results: dict[str, list[float]] = {k: [] for k in ("sync bare", "sync mesh", "async bare", "async mesh")}
        with httpx.Client() as bare, mesh.client() as meshed:
            per_request_sync(bare, bare_urls, 200)  # warm up connections and code paths
            per_request_sync(meshed, mesh_urls, 200)
            for _ in range(args.rounds):
                results["sync bare"].append(per_request_sync(bare, bare_urls, args.requests))
                results["sync mesh"].append(per_request_sync(meshed, mesh_urls, args.requests))

        async def run_async() -> None:
            async with httpx.AsyncClient() as bare_a, mesh.async_client() as meshed_a:
                await per_request_async(bare_a, bare_urls, 200)
                await per_request_async(meshed_a, mesh_urls, 200)
                for _ in range(args.rounds):
                    results["async bare"].append(await per_request_async(bare_a, bare_urls, args.requests))
                    results["async mesh"].append(await per_request_async(meshed_a, mesh_urls, args.requests))

        asyncio.run(run_async())
        mesh.close()

    print(f"{args.requests} requests x {args.rounds} rounds, median per request")
    for flavour in ("sync", "async"):
        bare_t = statistics.median(results[f"{flavour} bare"])
        mesh_t = statistics.median(results[f"{flavour} mesh"])
        print(f"  {flavour:5}  bare {bare_t * 1e6:7.1f} µs   mesh {mesh_t * 1e6:7.1f} µs   "
              f"ratio {mesh_t / bare_t:.3f}x   (+{(mesh_t - bare_t) * 1e6:.1f} µs)")


if __name__ == "__main__":
    main()
