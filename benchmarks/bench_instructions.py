"""Instructions per request, mesh transport against bare httpx: a measure that does not drift.

    python benchmarks/bench_instructions.py [--requests 1000]

Wall and CPU time on a shared VM move by up to 2x between runs, which hides a change of a
few percent. This counts the machine instructions one request costs instead, under
valgrind's callgrind (which must be installed): the sync transport over an in-memory
httpcore pool (no network, as ``bench_http.py``'s in-memory figure), the same request
shape as ``bench_http.py``. Each count is a run of N requests minus a run of none, with
PYTHONHASHSEED fixed, so start-up cancels out and repeated runs agree within ~0.3%.
Instructions are not time (the mesh's work touches more memory per instruction than
httpx's), so use this to compare two versions of the code, not as a ratio to quote.

Run with ``--child bare|mesh N`` it is the measured program itself.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(kind: str, count: int) -> None:
    sys.path.insert(0, str(HERE))
    import httpx

    from bench_http import REGISTRY, _MemoryPool
    from inmesh import Mesh
    from inmesh.registry import MemoryRegistry

    mesh = Mesh(MemoryRegistry({"bench.yaml": REGISTRY.format(a=1111, b=2222)}), seed=1)
    if kind == "mesh":
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
    runs = [(kind, n) for kind in ("bare", "mesh") for n in (0, args.requests)]
    with ThreadPoolExecutor(2) as pool:  # valgrind is single-threaded: two at a time
        counts = dict(zip(runs, pool.map(lambda run: instructions(*run), runs), strict=True))
    per = {
        k: (counts[(k, args.requests)] - counts[(k, 0)]) / args.requests for k in ("bare", "mesh")
    }
    print(f"instructions per request, sync transport, in-memory pool, {args.requests} requests")
    print(f"  bare httpx     {per['bare']:10,.0f}")
    own = per["mesh"] - per["bare"]
    print(f"  mesh           {per['mesh']:10,.0f}   the mesh's own work: {own:,.0f}")


if __name__ == "__main__":
    main()
