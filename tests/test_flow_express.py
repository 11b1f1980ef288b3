"""The express path: a call whose route ``express()`` admits makes its first attempt with
``express_send`` and ``express_settle``, and only a first attempt that is not a plain
success goes on in ``attempt_flow(first=...)``. Together they must decide exactly as the
flow alone does: the same attempts to the same endpoints with the same timeouts, the same
answers, the same draws from the seeded generator, and the same budgets, ejections and
admission counts afterwards.

Pure tests: each scenario compiles a registry into two Meshes (two separate states), runs
the same scripted calls through both drivers on a fake clock, and compares transcripts.
The endpoints' answers are scripted too (which endpoint fails, and how), so failures,
retries, back-offs, ejections, overflows and spent deadlines all happen, deterministically.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from inmesh import Mesh
from inmesh.balancing import PickContext
from inmesh.endpoints import EndpointKey
from inmesh.flow import (
    Attempted,
    Finish,
    Send,
    Wait,
    attempt_flow,
    express,
    express_send,
    express_settle,
)
from inmesh.plan import LocalReply, Prepared, Upstream, prepare
from inmesh.registry import MemoryRegistry
from inmesh.resilience.retry import Failure, Outcome
from inmesh.routing import RequestView

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  ports: [{{number: 9090, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 10.0.0.1, labels: {{version: v1}}}}
  - {{address: 10.0.0.2, labels: {{version: v1}}}}
  - {{address: 10.0.0.3, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings}}
spec:
  host: ratings
  trafficPolicy:
{policy}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - route:
    - {{destination: {{host: ratings, subset: v1}}, weight: 70}}
    - {{destination: {{host: ratings, subset: v2}}, weight: 30}}
{route}
"""

OK = Outcome(200, grpc_status="OK")
UNAVAILABLE = Outcome(200, grpc_status="UNAVAILABLE")
INTERNAL = Outcome(200, grpc_status="INTERNAL")
NOT_FOUND = Outcome(200, grpc_status="NOT_FOUND")
CONNECT = Outcome(failure=Failure.CONNECT)
HTTP_503 = Outcome(503)


@dataclass(frozen=True)
class Scenario:
    policy: str  # trafficPolicy lines (indented four spaces)
    route: str = ""  # extra lines for the route (indented four spaces)
    mesh: str = ""  # a MeshConfig document, if any
    # Which endpoint answers how: (endpoint address, that endpoint's call number) -> outcome.
    behaviour: Callable[[str, int], Outcome] = lambda _address, _n: OK
    deadline: Callable[[int], float | None] = lambda _n: None  # caller's, from call start
    held: bool = False  # a place on 10.0.0.1 taken by another caller on every third call


def flaky(address: str, n: int) -> Outcome:
    """10.0.0.1 fails every other call, in turns of several kinds; the rest answer."""
    if address == "10.0.0.1" and n % 2:
        return (UNAVAILABLE, CONNECT, INTERNAL, HTTP_503, NOT_FOUND)[n // 2 % 5]
    return OK


def down(address: str, _n: int) -> Outcome:
    """10.0.0.1 is down."""
    return CONNECT if address == "10.0.0.1" else OK


def all_down(_address: str, n: int) -> Outcome:
    return UNAVAILABLE if n % 7 else OK


LEAST = "    loadBalancer: {simple: LEAST_REQUEST}"

SCENARIOS = {
    "default retries, one flaky endpoint": Scenario(LEAST, behaviour=flaky),
    "retries of every gRPC kind": Scenario(
        LEAST,
        route="    retries: {attempts: 3, retryOn: 'unavailable,internal,connect-failure,5xx'}",
        behaviour=flaky,
    ),
    "retries off": Scenario(LEAST, route="    retries: {attempts: 0}", behaviour=flaky),
    "outlier detection ejects the down endpoint": Scenario(
        LEAST + "\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, "
        "baseEjectionTime: 5s, maxEjectionPercent: 100}",
        behaviour=down,
    ),
    "outlier detection, a success starts the count over": Scenario(
        LEAST + "\n    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 3, "
        "interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}",
        # Two failures, a success: ejected only if the success is not counted.
        behaviour=lambda address, n: OK if address != "10.0.0.1" or n % 3 == 2 else UNAVAILABLE,
    ),
    "outlier detection, everything failing": Scenario(
        "    outlierDetection: {consecutiveGatewayErrors: 1, interval: 1s, "
        "baseEjectionTime: 30s, maxEjectionPercent: 100}",
        behaviour=all_down,
    ),
    "connection-pool overflow": Scenario(
        LEAST + "\n    connectionPool: {http: {http2MaxRequests: 1, maxRetries: 1}}",
        behaviour=flaky,
        held=True,
    ),
    "a retry budget and a mesh budget spent": Scenario(
        "    retryBudget: {percent: 10, minRetryConcurrency: 1, budgetInterval: 2s}",
        route="    retries: {attempts: 5, retryOn: unavailable}",
        mesh="retryBudget: {retryRatio: 0.1, minRetriesPerSecond: 1, ttl: 2s}",
        behaviour=all_down,
    ),
    "a retry budget on active calls, header faults allowed, timeouts": Scenario(
        "    retryBudget: {percent: 50, minRetryConcurrency: 1}",
        route="    retries: {attempts: 3, retryOn: 'unavailable,reset,connect-failure'}",
        mesh="allowHeaderFaults: true",
        behaviour=lambda address, n: (
            Outcome(failure=Failure.TIMEOUT)
            if address == "10.0.0.2" and n % 3 == 0
            else flaky(address, n)
        ),
    ),
    "consistent hash on a header the call has": Scenario(
        "    loadBalancer: {consistentHash: {httpHeaderName: content-type}}",
        behaviour=lambda _address, n: flaky("10.0.0.1", n),  # wherever the hash leads
    ),
    "round robin": Scenario("    loadBalancer: {simple: ROUND_ROBIN}", behaviour=flaky),
    "the caller's deadline, spent before some calls and during others": Scenario(
        LEAST,
        behaviour=flaky,
        deadline=lambda n: (-1.0, 0.0005, 0.5, None)[n % 4],
    ),
}


class View:
    """A gRPC call without metadata, as the transport's view shows it."""

    host = "ratings"
    port = 9090
    authority = "ratings:9090"
    method = "POST"
    scheme = "http"
    path = "/ratings.Ratings/Get"
    query = ""

    def header(self, name: str) -> str | None:
        return "application/grpc" if name == "content-type" else None


VIEW: RequestView = View()


class Run:
    """One driver's Mesh, clock, generator and transcript."""

    def __init__(self, scenario: Scenario) -> None:
        registry = {"ratings.yaml": SERVICE.format(policy=scenario.policy, route=scenario.route)}
        if scenario.mesh:
            registry["mesh.yaml"] = MESH_CONFIG.format(spec=scenario.mesh)
        self.mesh = Mesh(MemoryRegistry(registry), seed=1)
        self.scenario = scenario
        self.rng = random.Random(7)
        self.pick = PickContext(rng=self.rng)
        self.now = 1000.0
        self.transcript: list[Any] = []
        self.calls: dict[str, int] = {}  # each endpoint's own count, for the scripted answers
        self.handed_over = 0  # express calls whose first attempt went on in the flow
        snapshot = self.mesh.snapshot
        self.prepared: Prepared = prepare(snapshot, VIEW)
        self.express_ids = {
            id(u) for u in self.prepared.upstreams() if express(u, snapshot.mesh_config)
        }

    def attempt(self, send: Send) -> Attempted:
        """An endpoint answers, 1 ms later; the limits place is given back."""
        address = send.endpoint.address
        n = self.calls[address] = self.calls.get(address, -1) + 1
        outcome = self.scenario.behaviour(address, n)
        self.transcript.append(("send", send.endpoint.key, send.attempt, send.timeout, outcome))
        self.now += 0.001
        if send.limits is not None:
            send.limits.release()
        return Attempted(outcome, f"{address} answer {n}", self.now)

    def flow(self, upstream: Upstream, deadline: float | None, first: Any = None) -> Finish:
        flow = attempt_flow(
            upstream,
            VIEW,
            rng=self.rng,
            now=self.now,
            replayable=True,
            mesh_config=self.mesh.snapshot.mesh_config,
            pick=self.pick_for(upstream),
            grpc=True,
            deadline=deadline,
            first=first,
        )
        try:
            command = next(flow)
            while True:
                if isinstance(command, Send):
                    command = flow.send(self.attempt(command))
                elif isinstance(command, Wait):
                    self.transcript.append(("wait", command.seconds))
                    self.now += command.seconds
                    command = flow.send(self.now)
                else:
                    self.transcript.append(("discard", command.result))
                    command = flow.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            flow.close()

    def pick_for(self, upstream: Upstream) -> PickContext:
        if upstream.hash_key is None:
            return self.pick
        return PickContext(rng=self.rng, hash_key=upstream.hash_key)

    def call(self, n: int, *, use_express: bool) -> None:
        decision = self.prepared(self.rng)
        if isinstance(decision, LocalReply):
            self.transcript.append(("reply", decision))
            return
        assert isinstance(decision, Upstream)
        offset = self.scenario.deadline(n)
        deadline = None if offset is None else self.now + offset
        held = None
        if self.scenario.held and n % 3 == 0:
            held = decision.cluster.state.limits(("10.0.0.1", 9090))
            assert held is not None
            assert held.try_admit()
        if use_express and id(decision) in self.express_ids:
            sent = express_send(decision, self.pick_for(decision), self.now, deadline)
            if isinstance(sent, Finish):
                finish = sent
            else:
                done = self.attempt(sent)
                settled = express_settle(decision, sent, done)
                if settled is None:
                    self.handed_over += 1
                    settled = self.flow(decision, deadline, first=(sent, done))
                finish = settled
        else:
            finish = self.flow(decision, deadline)
        if held is not None:
            held.release()
        endpoint = None if finish.endpoint is None else finish.endpoint.key
        self.transcript.append(("finish", finish.reply, finish.result, finish.attempts, endpoint))
        self.now += 0.01

    def state(self) -> Any:
        """Everything a call leaves behind, besides the transcript."""
        snapshot = self.mesh.snapshot
        figures = []
        for cluster in sorted(snapshot.clusters, key=lambda c: c.name):
            name, state = cluster.name, cluster.state
            keys: list[EndpointKey] = [e.key for e in cluster.endpoints]
            limits = [state.limits(k) for k in keys]
            figures.append(
                (
                    name,
                    None if state.ratio is None else round(state.ratio.balance(self.now), 9),
                    None if state.budget is None else (state.budget.active, state.budget.retries),
                    None if state.outlier is None else sorted(state.outlier.ejected(self.now)),
                    None if state.retry_limit is None else state.retry_limit.active,
                    [None if lim is None else lim.in_flight for lim in limits],
                )
            )
        return figures, self.rng.getstate()


MESH_CONFIG = """\
apiVersion: inmesh.io/v1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{{spec}}}
"""

CALLS = 300


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_express_decides_as_the_flow_does(name: str) -> None:
    scenario = SCENARIOS[name]
    express_run, flow_run = Run(scenario), Run(scenario)
    assert express_run.express_ids, "the scenario must take the express way"
    for n in range(CALLS):
        express_run.call(n, use_express=True)
        flow_run.call(n, use_express=False)
    assert express_run.transcript == flow_run.transcript
    assert express_run.state() == flow_run.state()
    # Both ways were taken: express calls settled at once, and some went on in the flow.
    assert 0 < express_run.handed_over < CALLS


def test_express_rules() -> None:
    """What keeps a route off the express way: anything the flow decides before the first
    attempt (a fault, a mirror, a route or per-try timeout) or after a success (a 1xx-3xx
    status listed for retry)."""
    allowed = {
        "": True,
        "    retries: {attempts: 2, retryOn: unavailable}": True,
        "    retries: {attempts: 2, perTryTimeout: 1s}": False,
        "    timeout: 2s": False,
        "    fault: {abort: {httpStatus: 503, percentage: {value: 0}}}": False,
        "    retries: {attempts: 2, retryOn: 'retriable-status-codes,200'}": False,
        "    retries: {attempts: 2, retryOn: 'retriable-status-codes,503'}": True,
    }
    for route, expected in allowed.items():
        run = Run(Scenario(LEAST, route=route))
        upstreams = run.prepared.upstreams()
        assert upstreams
        assert {express(u, run.mesh.snapshot.mesh_config) for u in upstreams} == {expected}, route


def test_a_mirrored_call_is_never_express() -> None:
    """A route that mirrors: the plans that carry the copy are off the express way (the
    flow's driver sends the copy); those drawn without it (past ``mirrorPercentage``)
    are on it."""
    route = "    mirror: {host: ratings, subset: v2}\n    mirrorPercentage: {value: 50}"
    run = Run(Scenario(LEAST, route=route))
    config = run.mesh.snapshot.mesh_config
    upstreams = run.prepared.upstreams()
    assert {u.mirror is None for u in upstreams} == {True, False}
    assert all(express(u, config) == (u.mirror is None) for u in upstreams)
