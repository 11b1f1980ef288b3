"""Failure management under load: retry amplification, recovery from a bad endpoint, cost.

    python benchmarks/bench_resilience.py [--parts abc] [--requests 1000]
        [--outlier-requests 10000] [--rounds 20] [--overhead-requests 500]

A plain script, not run by CI. Three parts:

(a) **Retry amplification in a total outage.** One upstream answers every request 503;
    the route retries ``5xx`` twice. Attempts per request with the mesh-wide ratio budget
    on (MeshConfig ``retryBudget``'s defaults: 20% of requests plus 10 retries/s over a
    10 s window) and with ``retryBudget: {enabled: false}``. Requests go out from a few
    threads, so the whole run fits in one budget window.
(b) **One of three endpoints failing.** The bad endpoint answers 503, resets the
    connection, or refuses connections; the DestinationRule has outlier detection with
    Istio's defaults (5 consecutive 5xx, 10 s interval, 30 s ejection). Success rate under
    the default retry policy (which retries connect failures but not 503s or resets) and
    under ``retryOn: 5xx,reset``, sequential requests. Under the default policy the
    failures a caller sees are the consecutive5xxErrors that precede each ejection, so
    the rate depends on how many requests an ejection period carries: 10,000 requests by
    default, the traffic of a service at ~330 requests/s over one 30 s ejection.
(c) **Cost of the full policy stack.** The same two fast upstream processes reached by the
    bare httpx client, by a mesh with no failure-management policy, and by a mesh whose
    route has a timeout and retries and whose DestinationRule has outlierDetection,
    connectionPool and retryBudget. Paired rounds in one run, as ``bench_http.py`` does;
    the ratios are per round against the bare client.

(a) and (b) use ``inmesh.testing.upstream.Upstream`` in this process (a stdlib threaded
server, ~1 ms a request); (c) uses the minimal responder of ``_fast_upstream.py`` in
processes of their own on one core, with this process pinned to the other.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx

from _servers import paired_ratio, upstream_processes
from bench_http import Timing, per_request_async, per_request_sync
from inmesh import Mesh
from inmesh.registry import MemoryRegistry
from inmesh.testing.upstream import Upstream

URL = "http://reviews:9080/reviews/0"

BUDGET_OFF = """\
apiVersion: inmesh.io/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {retryBudget: {enabled: false}}
"""

RETRY_5XX = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    retries: {attempts: 2, retryOn: 5xx}
"""

RETRY_5XX_RESET = RETRY_5XX.replace("retryOn: 5xx", "retryOn: '5xx,reset'")

OUTLIER = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    # Istio's defaults, written out.
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
"""

FULL_ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    timeout: 5s
    retries: {attempts: 2, perTryTimeout: 2s, retryOn: '5xx,reset'}
"""

FULL_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 1s}
      http: {http1MaxPendingRequests: 100, http2MaxRequests: 1000, maxRetries: 10}
    retryBudget: {percent: 20, minRetryConcurrency: 3}
"""


def service(ports: list[int]) -> str:
    endpoints = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {port}}}}}" for port in ports)
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  ports: [{{number: 9080, name: http}}]
  endpoints:
{endpoints}
"""


def make_mesh(*documents: str) -> Mesh:
    return Mesh(MemoryRegistry({"bench.yaml": "---\n".join(documents)}), seed=1)


# ---------------------------------------------------------------------------- (a)


def amplification(requests: int, threads: int, *, budget: bool) -> tuple[int, int, float]:
    """(attempts the caller's responses report, requests the upstream received, seconds)."""
    with Upstream("down") as down:
        down.behave(status=503)
        documents = [service([down.port]), RETRY_5XX]
        if not budget:
            documents.append(BUDGET_OFF)
        with make_mesh(*documents) as mesh, mesh.client() as client:

            def one(_: int) -> int:
                response = client.get(URL)
                assert response.status_code == 503
                attempts: int = response.extensions["inmesh"].attempts
                return attempts

            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                attempts = sum(pool.map(one, range(requests)))
            elapsed = time.perf_counter() - start
        return attempts, len(down.received), elapsed


def part_a(requests: int) -> None:
    threads = 16
    print(f"(a) retry amplification: 1 upstream answering 503 to everything, {requests} requests")
    print(f"    from {threads} threads, route retries {{attempts: 2, retryOn: 5xx}}")
    reserve = 10 * 10  # minRetriesPerSecond × ttl
    print(
        f"    default budget allows 0.2 × requests + {reserve} retries per 10 s window:"
        f" ≤ {requests + 0.2 * requests + reserve:.0f} attempts if the run fits in one window"
    )
    for label, budget in (("mesh-wide budget on (default)", True), ("retryBudget disabled", False)):
        attempts, received, elapsed = amplification(requests, threads, budget=budget)
        print(
            f"    {label:30} attempts {attempts:5d} (upstream saw {received:5d})"
            f"   attempts/requests {attempts / requests:.2f}   ({elapsed:.1f} s)"
        )


# ---------------------------------------------------------------------------- (b)


@contextmanager
def three_endpoints(failure: str) -> Iterator[tuple[list[Upstream], Upstream]]:
    """Three upstreams, the middle one failing as ``failure`` says."""
    with ExitStack() as stack:
        ups = [stack.enter_context(Upstream(name)) for name in ("good1", "bad", "good2")]
        bad = ups[1]
        if failure == "503":
            bad.behave(status=503)
        elif failure == "reset":
            bad.behave(reset=1)
        else:  # refused: nobody listens on its port any more
            bad.stop()
        yield ups, bad


def recovery(failure: str, route: str | None, requests: int) -> tuple[int, Counter[str], int]:
    """(successes, failures by kind, attempts the bad endpoint received)."""
    with three_endpoints(failure) as (ups, bad):
        documents = [service([u.port for u in ups]), OUTLIER]
        if route is not None:
            documents.append(route)
        failures: Counter[str] = Counter()
        ok = 0
        with make_mesh(*documents) as mesh, mesh.client() as client:
            for _ in range(requests):
                try:
                    status = client.get(URL).status_code
                except httpx.TransportError as exc:
                    failures[type(exc).__name__] += 1
                    continue
                if status == 200:
                    ok += 1
                else:
                    failures[str(status)] += 1
        return ok, failures, len(bad.received)


def part_b(requests: int) -> None:
    print()
    print(f"(b) one of three endpoints failing, {requests} sequential requests,")
    print("    outlierDetection {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}")
    policies: list[tuple[str, str | None]] = [
        ("default retry policy", None),
        ("retryOn 5xx,reset", RETRY_5XX_RESET),
    ]
    for failure, what in (
        ("503", "answers 503"),
        ("reset", "resets the connection"),
        ("refused", "refuses connections"),
    ):
        print(f"    bad endpoint {what}:")
        for label, route in policies:
            ok, failures, bad_saw = recovery(failure, route, requests)
            rate = 100 * ok / requests
            verdict = "meets" if rate >= 99.9 else "misses"
            kinds = ", ".join(f"{n} {kind}" for kind, n in failures.most_common()) or "none"
            seen = f"{bad_saw} requests" if failure != "refused" else "-"
            print(
                f"      {label:22} success {rate:7.3f}%  ({verdict} 99.9%)"
                f"   failures: {kinds}   bad endpoint saw {seen}"
            )


# ---------------------------------------------------------------------------- (c)


def part_c(requests: int, rounds: int) -> None:
    print()
    kinds = ("bare", "mesh", "full")
    with upstream_processes("a", "b", fast=True) as (a, b):
        bare_urls = [f"http://127.0.0.1:{a}/reviews/0", f"http://127.0.0.1:{b}/reviews/0"]
        mesh_urls = [URL, URL]
        plain = make_mesh(service([a, b]))
        full = make_mesh(service([a, b]), FULL_ROUTE, FULL_RULE)
        results: dict[str, list[Timing]] = {
            f"{flavour} {kind}": [] for flavour in ("sync", "async") for kind in kinds
        }

        def order(r: int) -> tuple[str, ...]:
            # Rotate who goes first, so none always runs on a warmer (or cooler) machine.
            return kinds[r % 3 :] + kinds[: r % 3]

        with httpx.Client() as bare, plain.client() as meshed, full.client() as stacked:
            sync_clients = {"bare": (bare, bare_urls), "mesh": (meshed, mesh_urls)}
            sync_clients["full"] = (stacked, mesh_urls)
            for client, urls in sync_clients.values():
                per_request_sync(client, urls, 200)  # warm up connections and code paths
            for r in range(rounds):
                for kind in order(r):
                    client, urls = sync_clients[kind]
                    results[f"sync {kind}"].append(per_request_sync(client, urls, requests))

        async def run_async() -> None:
            async with (
                httpx.AsyncClient() as bare_a,
                plain.async_client() as meshed_a,
                full.async_client() as stacked_a,
            ):
                clients: dict[str, tuple[httpx.AsyncClient, list[str]]] = {
                    "bare": (bare_a, bare_urls),
                    "mesh": (meshed_a, mesh_urls),
                    "full": (stacked_a, mesh_urls),
                }
                for client, urls in clients.values():
                    await per_request_async(client, urls, 200)
                for r in range(rounds):
                    for kind in order(r):
                        client, urls = clients[kind]
                        results[f"async {kind}"].append(
                            await per_request_async(client, urls, requests)
                        )

        asyncio.run(run_async())
        plain.close()
        full.close()

    print(f"(c) per-request cost, {requests} requests x {rounds} rounds, median per request")
    print("    mesh: routing only (the default retry policy and mesh-wide budget are on);")
    print("    full: + route timeout 5s, retries {attempts: 2, perTryTimeout: 2s},")
    print("          DR outlierDetection + connectionPool + retryBudget")
    label: dict[str, Callable[[Timing], float]] = {
        "wall": lambda t: t[0],
        "client CPU": lambda t: t[1],
    }
    for flavour in ("sync", "async"):
        for what, pick in label.items():
            bare_ts = [pick(t) for t in results[f"{flavour} bare"]]
            line = f"    {flavour:5} {what:10}  bare {statistics.median(bare_ts) * 1e6:6.1f} µs"
            for kind in ("mesh", "full"):
                ts = [pick(t) for t in results[f"{flavour} {kind}"]]
                ratio, low, high = paired_ratio(ts, bare_ts)
                line += (
                    f"   {kind} {statistics.median(ts) * 1e6:6.1f} µs"
                    f" {ratio:.3f}x ({low:.2f}-{high:.2f})"
                )
            print(line)
    print("    (ratios: median of each round's mesh/bare pair, interquartile range in brackets)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. 'ab'")
    parser.add_argument("--requests", type=int, default=1000, help="(a) requests per case")
    parser.add_argument("--outlier-requests", type=int, default=10000, help="(b) per case")
    parser.add_argument("--rounds", type=int, default=20, help="(c) rounds")
    parser.add_argument("--overhead-requests", type=int, default=500, help="(c) per round")
    args = parser.parse_args()
    if "a" in args.parts:
        part_a(args.requests)
    if "b" in args.parts:
        part_b(args.outlier_requests)
    if "c" in args.parts:
        part_c(args.overhead_requests, args.rounds)


if __name__ == "__main__":
    main()
