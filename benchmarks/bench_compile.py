"""Time to load and compile a large registry: 1,000 services, 10,000 endpoints.

    python benchmarks/bench_compile.py [--services 1000] [--endpoints-per-service 10]

Each service has a ServiceEntry (10 endpoints over two versions), a DestinationRule
with two subsets, and a VirtualService with a header match and a weighted split. The
stages are timed separately: YAML text to documents, validation, snapshot compile.
"""

from __future__ import annotations

import argparse
import time

from inmesh.config.parse import parse_documents
from inmesh.config.yaml import documents_from_text
from inmesh.snapshot import Caller, compile_snapshot
from inmesh.state import MeshState


def registry(services: int, per_service: int) -> str:
    docs = []
    for s in range(services):
        endpoints = "\n".join(
            f"  - {{address: 10.{s // 250}.{s % 250}.{e}, labels: {{version: v{e % 2 + 1}}}}}"
            for e in range(per_service)
        )
        docs.append(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc-{s}}}
spec:
  hosts: [svc-{s}.mesh]
  ports: [{{number: 8080, name: http}}]
  endpoints:
{endpoints}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc-{s}}}
spec:
  host: svc-{s}.mesh
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{s}}}
spec:
  hosts: [svc-{s}.mesh]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: svc-{s}.mesh, subset: v2}}}}]
  - route:
    - {{destination: {{host: svc-{s}.mesh, subset: v1}}, weight: 90}}
    - {{destination: {{host: svc-{s}.mesh, subset: v2}}, weight: 10}}
""")
    return "---\n".join(docs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints-per-service", type=int, default=10)
    args = parser.parse_args()
    text = registry(args.services, args.endpoints_per_service)
    t0 = time.perf_counter()
    docs = documents_from_text(text, "bench.yaml")
    t1 = time.perf_counter()
    resources = parse_documents(docs)
    t2 = time.perf_counter()
    snapshot = compile_snapshot(resources, caller=Caller(), state=MeshState())
    t3 = time.perf_counter()
    endpoints = sum(len(c.endpoints) for c in snapshot.clusters if c.key.subset is None)
    print(f"{args.services} services, {endpoints} endpoints, {len(resources)} resources")
    print(f"  YAML -> documents   {(t1 - t0) * 1000:8.1f} ms")
    print(f"  validate            {(t2 - t1) * 1000:8.1f} ms")
    print(f"  compile snapshot    {(t3 - t2) * 1000:8.1f} ms")
    print(f"  total               {(t3 - t0) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
