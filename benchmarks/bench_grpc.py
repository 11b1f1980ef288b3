"""The mesh gRPC channel against a bare grpcio channel, same server, same run.

    python benchmarks/bench_grpc.py [--calls 100] [--rounds 200]

One gRPC server process on 127.0.0.1 (raw-bytes echo, so the client's own work is a
visible share of each call; the client and the server each have a core of their own).
The bare channel calls the server's address; the mesh channel calls the logical
``ratings:9090``, whose VirtualService matches a metadata header and otherwise splits
50/50 by weight between two subsets (both the same server, two endpoints' worth of
channels: ports via two ServiceEntry endpoints would need two servers, and one keeps the
comparison fair), with the default LEAST_REQUEST balancer. Unary calls, sync and aio.
Rounds alternate bare and mesh so drift in the machine hits both alike; the figure is
the median per-call time over rounds, and the median of each round's mesh / bare ratio.
Rounds are short (100 calls, ~70 ms) and many: on a shared VM the speed drifts within a
second, and a pair of short rounds sees the same machine, where long ones did not.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio

from _servers import pin_apart, print_pairs
from inmesh import Mesh
from inmesh.registry import MemoryRegistry
from inmesh.transports.grpc import MeshChannel
from inmesh.transports.grpc_aio import MeshAioChannel

METHOD = "/ratings.Ratings/Get"

REGISTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  ports: [{{number: 9090, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{grpc: {port}}}, labels: {{version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}, uri: {{prefix: /ratings.Admin/}}}}]
    route: [{{destination: {{host: ratings, subset: v2}}}}]
  - match: [{{uri: {{prefix: /ratings.Ratings/}}}}]
    route:
    - {{destination: {{host: ratings, subset: v1}}, weight: 50}}
    - {{destination: {{host: ratings, subset: v2}}, weight: 50}}
"""

Timing = tuple[float, float]  # (wall seconds, client CPU seconds) per call


def serve() -> None:
    """The server process: echo every unary call; print the port, run until stdin closes."""
    handler = grpc.method_handlers_generic_handler(
        "ratings.Ratings", {"Get": grpc.unary_unary_rpc_method_handler(lambda r, _: r)}
    )
    server = grpc.server(ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(None)


def per_call_sync(call: Any, count: int) -> Timing:
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(count):
        call(b"x")
    return (time.perf_counter() - start) / count, (time.thread_time() - cpu) / count


async def per_call_aio(call: Any, count: int) -> Timing:
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(count):
        await call(b"x")
    return (time.perf_counter() - start) / count, (time.thread_time() - cpu) / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        pin_apart([server.pid])  # the client on one core; the server gets the other
        run(port, args.calls, args.rounds)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)


def run(port: int, calls: int, rounds: int) -> None:
    mesh = Mesh(MemoryRegistry({"bench.yaml": REGISTRY.format(port=port)}), seed=1)
    results: dict[str, list[Timing]] = {
        k: [] for k in ("sync bare", "sync mesh", "aio bare", "aio mesh")
    }
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}") as bare,
        MeshChannel(mesh, "ratings:9090") as meshed,
    ):
        callers = {"bare": bare.unary_unary(METHOD), "mesh": meshed.unary_unary(METHOD)}
        for call in callers.values():
            per_call_sync(call, 300)  # warm up connections and code paths
        for r in range(rounds):
            # Alternate which goes first, so neither always runs on a warmer machine.
            for kind in ("bare", "mesh") if r % 2 == 0 else ("mesh", "bare"):
                results[f"sync {kind}"].append(per_call_sync(callers[kind], calls))

    async def run_aio() -> None:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as bare_a,
            MeshAioChannel(mesh, "ratings:9090") as meshed_a,
        ):
            callers = {"bare": bare_a.unary_unary(METHOD), "mesh": meshed_a.unary_unary(METHOD)}
            for call in callers.values():
                await per_call_aio(call, 300)
            for r in range(rounds):
                for kind in ("bare", "mesh") if r % 2 == 0 else ("mesh", "bare"):
                    results[f"aio {kind}"].append(await per_call_aio(callers[kind], calls))

    asyncio.run(run_aio())
    mesh.close()

    print(f"{calls} unary calls x {rounds} rounds, alternating; median per call")
    print("  (client CPU: this thread's CPU time; grpcio's own threads are not counted)")
    print_pairs(results, ("sync", "aio"))


if __name__ == "__main__":
    main()
