"""Loopback upstreams in their own processes, so the client under test has the GIL alone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def upstream_processes(*names: str, fast: bool = True) -> Iterator[list[int]]:
    """Start one upstream process per name; yield their ports; stop them at exit.

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
        yield ports
    finally:
        for p in processes:
            p.terminate()
            p.wait(5)
