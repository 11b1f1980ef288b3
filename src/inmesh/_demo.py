"""``inmesh demo``: three versions of a service on loopback, routed by Istio YAML.

It starts reviews v1, v2 and v3 (real HTTP servers on 127.0.0.1), writes a registry
folder, and shows: a header route (end-user: jason → v2), a weighted split (80% v1 /
20% v3), a live edit of the folder taking effect, and a broken edit being rejected while
the last good configuration keeps serving.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from inmesh.mesh import Mesh, MeshStatus
from inmesh.testing.upstream import Upstream

SERVICES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
  - {{address: 127.0.0.1, ports: {{http: {v3}}}, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
"""

ROUTES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - name: jason-sees-v2
    match:
    - headers:
        end-user: {{exact: jason}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - name: canary
    route:
    - destination: {{host: reviews, subset: v1}}
      weight: {v1}
    - destination: {{host: reviews, subset: v3}}
      weight: {v3}
"""

BROKEN = ROUTES.replace("weight: {v3}", "weight: -{v3}")


def _write(path: Path, text: str) -> None:
    # Write then rename, as editors and config tools do: a watcher never sees half a file.
    temporary = path.with_suffix(".tmp~")
    temporary.write_text(text)
    temporary.replace(path)


def _wait_for_update(updates: list[MeshStatus], seen: int, event: threading.Event) -> MeshStatus:
    deadline = time.monotonic() + 10
    while len(updates) <= seen:
        if not event.wait(max(0.0, deadline - time.monotonic())):
            raise SystemExit("demo: the mesh did not see the edit within 10 s")
        event.clear()
    return updates[-1]


def run(*, requests: int = 100) -> int:
    versions = [Upstream(f"reviews-{v}") for v in ("v1", "v2", "v3")]
    for upstream in versions:
        upstream.start()
    ports = {u.name.split("-")[1]: u.port for u in versions}
    try:
        with tempfile.TemporaryDirectory(prefix="inmesh-demo-") as folder:
            registry = Path(folder)
            _write(registry / "reviews.yaml", SERVICES.format(**ports))
            _write(registry / "routes.yaml", ROUTES.format(v1=80, v3=20))
            print(
                f"registry: {registry}/ (reviews v1, v2, v3 on 127.0.0.1 ports "
                f"{ports['v1']}, {ports['v2']}, {ports['v3']})\n"
            )

            updates: list[MeshStatus] = []
            updated = threading.Event()

            def listen(status: MeshStatus) -> None:
                updates.append(status)
                updated.set()

            with Mesh(registry, workload="productpage", seed=7) as mesh, mesh.client() as http:
                mesh.on_update(listen)
                reply = http.get("http://reviews:9080/reviews/0", headers={"end-user": "jason"})
                info = reply.extensions["inmesh"]
                print(
                    f"GET http://reviews:9080/reviews/0  end-user: jason  →  "
                    f"{reply.json()['name']}  ({info.cluster} at {info.endpoint}, "
                    f"Host seen upstream: {reply.json()['headers']['host']})"
                )

                counts = Counter(
                    http.get("http://reviews:9080/reviews/0").json()["name"]
                    for _ in range(requests)
                )
                print(f"\n{requests} anonymous requests, canary route 80% v1 / 20% v3:")
                for name in sorted(counts):
                    print(f"  {name}: {counts[name]:4d}  {'#' * (counts[name] * 40 // requests)}")

                print("\nediting routes.yaml: 100% to v3 ...")
                seen = len(updates)
                saved = time.monotonic()
                _write(registry / "routes.yaml", ROUTES.format(v1=0, v3=100))
                status = _wait_for_update(updates, seen, updated)
                took = (time.monotonic() - saved) * 1000
                counts = Counter(
                    http.get("http://reviews:9080/reviews/0").json()["name"] for _ in range(20)
                )
                print(
                    f"  version {status.version} in force {took:.0f} ms after the save; "
                    f"20 requests → {dict(counts)}"
                )

                print("\nsaving a broken edit (a negative weight) ...")
                seen = len(updates)
                _write(registry / "routes.yaml", BROKEN.format(v1=0, v3=100))
                status = _wait_for_update(updates, seen, updated)
                print("  rejected:")
                for problem in status.problems:
                    print(f"    {problem}")
                name = http.get("http://reviews:9080/reviews/0").json()["name"]
                print(f"  version {mesh.status.version} still serves: a request goes to {name}")

                reply = http.get("http://127.0.0.1:{}/not-in-the-mesh".format(ports["v1"]))
                print(
                    f"\na host outside the registry passes through: {reply.status_code} "
                    f"from {reply.json()['name']}"
                )
    finally:
        for upstream in versions:
            upstream.stop()
    print("\nnext: `inmesh explain <folder> --url http://reviews:9080/ -H 'end-user: jason'`")
    return 0
