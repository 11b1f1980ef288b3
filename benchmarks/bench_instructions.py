"""Instructions per request or call, mesh against bare clients: a measure that does not drift.

    python benchmarks/bench_instructions.py [--requests 1000]

Wall and CPU time on a shared VM move by up to 2x between runs, which hides a change of a
few percent. This counts the machine instructions one request costs instead, under
valgrind's callgrind (which must be installed), with the network taken out:

- HTTP: the sync transport over an in-memory httpcore pool (as ``bench_http.py``'s
  in-memory figure), the request shape of ``bench_http.py``; and the full policy stack of
  ``bench_resilience.py`` (c) (route timeout, retries, outlier detection, pool limits,
  retry budget) on the same pool.
- gRPC: the mesh channels of ``bench_grpc.py``, sync and aio, unary calls over endpoint
  channels that answer at once in Python (what is counted is nearly all the mesh's own
  work; a bare grpcio call costs several times as much in its C core).

Each count is a run of N requests minus a run of none, with PYTHONHASHSEED fixed, so
start-up cancels out and repeated runs agree within ~0.3%. Instructions are not time (the
mesh's work touches more memory per instruction than httpx's, and runs with cold caches
after a real call's I/O), so use this to compare two versions of the code, not as a ratio
to quote.

Run with ``--child KIND N`` it is the measured program itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(kind: str, count: int) -> None:
    sys.path.insert(0, str(HERE))
    if kind.startswith("grpc"):
        grpc_child(kind, count)
        return
    import httpx

    from bench_http import REGISTRY, _MemoryPool
    from inmesh import Mesh
    from inmesh.registry import MemoryRegistry

    mesh = Mesh(MemoryRegistry({"bench.yaml": REGISTRY.format(a=1111, b=2222)}), seed=1)
    if kind == "full":
        import bench_resilience

        mesh = bench_resilience.make_mesh(
            bench_resilience.service([1111, 2222]),
            bench_resilience.FULL_ROUTE,
            bench_resilience.FULL_RULE,
        )
    if kind in {"mesh", "full"}:
        transport: httpx.BaseTransport = mesh.transport()
        transport._pools._factory = lambda _key: _MemoryPool()  # type: ignore[attr-defined]
        url = "http://reviews:9080/reviews/0"
    else:
        transport = httpx.HTTPTransport()
        transport._pool = _MemoryPool()  # type: ignore[assignment]
        url = "http://127.0.0.1:8080/reviews/0"
    request = httpx.Client().build_request("GET", url)
    for _ in range(count):
        response = transport.handle_request(request)
        response.read()
        response.close()


class _AnsweringChannel:
    """An endpoint channel whose calls answer at once: the request, echoed."""

    def __init__(self, *, aio: bool) -> None:
        self._aio = aio

    def unary_unary(self, _method: str, **_: Any) -> Callable[..., Any]:
        if not self._aio:
            return lambda request, *_args, **_kwargs: request

        def call(request: Any, *_args: Any, **_kwargs: Any) -> Any:
            return _AnsweredCall(request)

        return call

    def close(self, *_: Any) -> Any:
        return asyncio.sleep(0) if self._aio else None


class _AnsweredCall:
    """A grpc.aio unary call whose answer is in hand: it is over once awaited (without
    suspending), and then runs its done callbacks, as grpc.aio does when a call ends."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._callbacks: list[Callable[[Any], None]] = []
        self._done = False

    def __await__(self) -> Any:
        self._done = True
        for callback in self._callbacks:
            callback(self)
        return self._response
        yield  # a generator: what ``await`` needs

    def done(self) -> bool:
        return self._done

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def cancel(self) -> bool:
        return False


def grpc_child(kind: str, count: int) -> None:
    from bench_grpc import METHOD, REGISTRY
    from inmesh import Mesh
    from inmesh.registry import MemoryRegistry
    from inmesh.transports import grpc as mesh_grpc
    from inmesh.transports import grpc_aio as mesh_grpc_aio

    mesh = Mesh(MemoryRegistry({"bench.yaml": REGISTRY.format(port=5555)}), seed=1)
    if kind == "grpc":
        mesh_grpc._SyncCore.make_channel = lambda *_: _AnsweringChannel(aio=False)  # type: ignore[method-assign]
        call = mesh_grpc.MeshChannel(mesh, "ratings:9090").unary_unary(METHOD)
        for _ in range(count + 1):  # the first call opens the endpoint channel
            call(b"x")
        return
    mesh_grpc_aio._AioCore.make_channel = lambda *_: _AnsweringChannel(aio=True)  # type: ignore[method-assign]

    async def calls() -> None:
        channel = mesh_grpc_aio.MeshAioChannel(mesh, "ratings:9090")
        unary = channel.unary_unary(METHOD)
        for _ in range(count + 1):
            await unary(b"x")

    asyncio.run(calls())


def instructions(kind: str, count: int) -> int:
    """Instructions of a whole child run (start-up included)."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            kind,
            str(count),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=True,
    )
    found = re.search(r"Collected : ([\d,]+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{result.stderr}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    kinds = ("bare", "mesh", "full", "grpc", "grpc-aio")
    runs = [(kind, n) for kind in kinds for n in (0, args.requests)]
    with ThreadPoolExecutor(2) as pool:  # valgrind is single-threaded: two at a time
        counts = dict(zip(runs, pool.map(lambda run: instructions(*run), runs), strict=True))
    per = {k: (counts[(k, args.requests)] - counts[(k, 0)]) / args.requests for k in kinds}
    print(f"instructions per request, sync transport, in-memory pool, {args.requests} requests")
    print(f"  bare httpx     {per['bare']:10,.0f}")
    for kind, label in (("mesh", "mesh"), ("full", "full stack")):
        own = per[kind] - per["bare"]
        print(f"  {label:14} {per[kind]:10,.0f}   the mesh's own work: {own:,.0f}")
    print("instructions per unary call, mesh gRPC channel, endpoint answering at once")
    print(f"  sync           {per['grpc']:10,.0f}")
    print(f"  aio            {per['grpc-aio']:10,.0f}")


if __name__ == "__main__":
    main()
