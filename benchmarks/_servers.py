"""Loopback upstreams in their own processes, so the client under test has the GIL alone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def upstream_processes(*names: str) -> Iterator[list[int]]:
    """Start one upstream process per name; yield their ports; stop them at exit."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "inmesh.testing.upstream", name],
            stdout=subprocess.PIPE, text=True,
        )
        for name in names
    ]
    try:
        ports = [int(p.stdout.readline()) for p in processes]  # type: ignore[union-attr]
        yield ports
    finally:
        for p in processes:
            p.terminate()
            p.wait(5)
