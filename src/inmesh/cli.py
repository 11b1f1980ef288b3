"""The ``inmesh`` command: ``check``, ``explain`` and ``demo``.

``inmesh check PATH`` validates a file or folder as a Mesh would load it and prints every
problem as ``file:line field.path: message`` (exit 1 on any), like ``istioctl analyze``.
``inmesh explain PATH --url URL [-H 'name: value'] [--workload W]`` prints which rule
matched and why, the destinations and their shares, the cluster, the balancer and its
endpoints. ``inmesh demo`` starts a few local services and routes to them.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from inmesh.exceptions import ConfigError, MeshError

if TYPE_CHECKING:
    from inmesh.config.model import Resource
    from inmesh.snapshot import Snapshot

__all__ = ["main"]


def _load(
    path: str, *, workload: str | None, labels: dict[str, str] | None, locality: str | None
) -> tuple[list[Resource], Snapshot]:
    """Read, validate and compile a registry as a Mesh would, for the given caller."""
    from inmesh.config.parse import parse_documents
    from inmesh.endpoints import Locality
    from inmesh.registry import open_registry
    from inmesh.snapshot import Caller, compile_snapshot
    from inmesh.state import MeshState

    if labels is None:
        labels = {"app": workload} if workload else {}
    with open_registry(path) as registry:
        resources = parse_documents(registry.read())
    caller = Caller(
        workload=workload, labels=labels, locality=Locality.parse(locality) if locality else None
    )
    return resources, compile_snapshot(resources, caller=caller, state=MeshState())


def _check(args: argparse.Namespace) -> int:
    try:
        resources, _ = _load(args.path, workload=None, labels=None, locality=None)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        count = len(exc.problems)
        print(f"\n{count} problem{'s' if count != 1 else ''} found in {args.path}", file=sys.stderr)
        return 1
    kinds = Counter(type(r).__name__ for r in resources)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "no resources"
    print(f"{args.path}: ok ({summary})")
    return 0


def _parse_labels(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    labels = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"inmesh explain: --labels takes k=v[,k=v...], got {item!r}")
        labels[key.strip()] = value.strip()
    return labels


def _explain(args: argparse.Namespace) -> int:
    from inmesh.explain import StaticRequest, explain

    headers = {}
    for header in args.header or []:
        name, sep, value = header.partition(":")
        if not sep:
            raise SystemExit(f"inmesh explain: -H takes 'name: value', got {header!r}")
        headers[name.strip().lower()] = value.strip()
    try:
        _, snapshot = _load(
            args.path,
            workload=args.workload,
            labels=_parse_labels(args.labels),
            locality=args.locality,
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print("\nfix these first: `inmesh check` lists them", file=sys.stderr)
        return 1
    request = StaticRequest.from_url(args.url, method=args.method, headers=headers)
    # The same hash source a Mesh uses for useSourceIp: the workload, else the host name.
    print(explain(snapshot, request, source=args.workload or socket.gethostname()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from inmesh._demo import run

    return run(requests=args.requests)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inmesh", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate a registry file or folder")
    check.add_argument("path")
    check.set_defaults(run=_check)

    explain = commands.add_parser("explain", help="show where a request would go and why")
    explain.add_argument("path", help="registry file or folder")
    explain.add_argument("--url", required=True, help="e.g. http://reviews:9080/reviews/0")
    explain.add_argument("-X", "--method", default="GET")
    explain.add_argument("-H", "--header", action="append", help="'name: value' (repeatable)")
    explain.add_argument("--workload", help="the calling workload (its labels default to app=W)")
    explain.add_argument("--labels", help="the caller's labels, k=v[,k=v...]")
    explain.add_argument("--locality", help="the caller's region/zone/subzone")
    explain.set_defaults(run=_explain)

    demo = commands.add_parser("demo", help="start local services and route to them")
    demo.add_argument("--requests", type=int, default=100, help="requests for the weighted split")
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except MeshError as exc:
        print(f"inmesh {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
