"""Shared benchmark helpers: loopback upstreams in their own processes (so the client under
test has the GIL alone), and the paired-round ratio report."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def upstream_processes(*names: str, fast: bool = True, pin: bool = True) -> Iterator[list[int]]:
    """Start one upstream process per name; yield their ports; stop them at exit. With
    ``pin``, the client and the upstreams get cores of their own (``pin_apart``); without,
    the client alone is pinned (to core 0) and the upstreams run where the OS puts them.

    ``fast`` uses the minimal responder in ``_fast_upstream.py``; otherwise inmesh's
    test upstream (a stdlib ThreadingHTTPServer, ~1 ms a request).
    """
    here = Path(__file__).parent
    command = [str(here / "_fast_upstream.py")] if fast else ["-m", "inmesh.testing.upstream"]
    processes = [
        subprocess.Popen([sys.executable, *command, name], stdout=subprocess.PIPE, text=True)
        for name in names
    ]
    try:
        ports = [int(p.stdout.readline()) for p in processes]  # type: ignore[union-attr]
        pin_apart([p.pid for p in processes] if pin else [])
        yield ports
    finally:
        for p in processes:
            p.terminate()
            p.wait(5)


def paired_ratio(mesh_ts: list[float], bare_ts: list[float]) -> tuple[float, float, float]:
    """The median and interquartile range of each round's mesh/bare ratio: rounds are run
    in alternation, so the machine's slow and fast phases cancel out in the pair."""
    ratios = sorted(m / b for m, b in zip(mesh_ts, bare_ts, strict=True))
    return statistics.median(ratios), ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]


def pin_apart(upstream_pids: list[int]) -> None:
    """The client (this process) on core 0, the upstreams on the other cores, where the OS
    allows it: neither preempts the other, which narrows the spread between rounds."""
    count = os.cpu_count() or 1
    if not hasattr(os, "sched_setaffinity") or count < 2:
        return
    for pid in upstream_pids:
        os.sched_setaffinity(pid, set(range(1, count)))
    os.sched_setaffinity(0, {0})


def print_pairs(results: dict[str, list[tuple[float, float]]], flavours: tuple[str, ...]) -> None:
    """One line per flavour and measure (wall, client CPU): medians and the paired ratio."""
    for flavour in flavours:
        for index, what in ((0, "wall"), (1, "client CPU")):
            bare_ts = [t[index] for t in results[f"{flavour} bare"]]
            mesh_ts = [t[index] for t in results[f"{flavour} mesh"]]
            bare_t, mesh_t = statistics.median(bare_ts), statistics.median(mesh_ts)
            ratio, low, high = paired_ratio(mesh_ts, bare_ts)
            print(
                f"  {flavour:5} {what:10}  bare {bare_t * 1e6:7.1f} µs"
                f"   mesh {mesh_t * 1e6:7.1f} µs"
                f"   ratio {ratio:.3f}x (IQR {low:.3f}-{high:.3f})"
                f"   ({(mesh_t - bare_t) * 1e6:+.1f} µs)"
            )
