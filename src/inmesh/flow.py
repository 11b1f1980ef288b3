"""The attempt flow: one request's faults, deadline, retries and budgets, written once.

``attempt_flow`` is a generator that decides and never acts. It yields what it wants
done — ``Wait`` this long, ``Send`` an attempt to this endpoint, ``Discard`` a result
that will not be delivered — and is sent back what happened (the time after a wait, an
``Attempted`` after a send). When it returns, its ``Finish`` says what the caller gets:
a local reply (fault abort, overflow, timeout, no healthy upstream) or the last real
attempt's result. The sync and async drivers in ``transports/`` run it line for line
alike; the gRPC adapter can run the same flow.

Theory of operation, as Envoy's router does it:

1. Faults first (the pytest overlay, then the route's ``fault``): a delay waits before
   anything is sent; an abort answers at once and is never retried. A route that
   carries a fault has its timeout and retries switched off, as Istio documents.
2. The deadline is the tightest of the route ``timeout`` and the caller's
   ``x-envoy-upstream-rq-timeout-ms``; each attempt gets ``perTryTimeout`` within it.
   (The caller's own httpx timeouts are applied by the driver, per operation.)
3. Each attempt picks an endpoint (avoiding ones this request already tried), passes
   the endpoint's connection-pool limits (overflow: 503 ``x-envoy-overloaded``, never
   sent, never retried), and reports its outcome to outlier detection.
4. A failed attempt is retried when the policy's ``retryOn`` matches, attempts remain,
   the request body can be replayed, the retry budgets (mesh-wide ratio budget,
   DestinationRule ``retryBudget``, ``maxRetries``) have room, and the back-off fits
   before the deadline. Otherwise the caller gets the last real response or error.

The express path. For most calls steps 1 and 2 decide nothing (no fault, no mesh
timeout) and the first attempt is answered: the flow then comes down to counting the call
in the budgets, picking and admitting an endpoint, sending, and recording a success. For
a call whose route ``express()`` admits, a driver may do exactly that with
``express_send`` and ``express_settle``, plain functions that cost a fraction of the
generator and its protocol (a driver that can tell a plain success by itself, as a gRPC
call that returns is one, records it with ``express_succeeded``, which is what
``express_settle`` does for one). When the first attempt is not a plain success, the driver
hands it to ``attempt_flow(first=...)``, which carries on from that point as if it had
made the attempt itself: one decision procedure, entered two ways, with the same draws
on the same generator in the same order (``tests/test_flow_express.py`` holds the two
to the same transcripts).
"""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any, NamedTuple

from inmesh._namedtuples import build as _tuple
from inmesh.balancing import PickContext
from inmesh.config.model import HTTPRetry, MeshConfig
from inmesh.endpoints import Endpoint, EndpointKey
from inmesh.plan import LocalReply, Upstream
from inmesh.resilience.faults import decide
from inmesh.resilience.limits import EndpointLimits
from inmesh.resilience.outlier import Result, classify
from inmesh.resilience.retry import Failure, Outcome, RetryState, retriable
from inmesh.routing import RequestView
from inmesh.snapshot import Cluster
from inmesh.testing.faults import OVERLAY

__all__ = [
    "Attempted",
    "Discard",
    "Finish",
    "Send",
    "Wait",
    "attempt_flow",
    "express",
    "express_abandon",
    "express_send",
    "express_settle",
    "express_succeeded",
    "fault_abort",
]


FAULT_ABORT_BODY = "fault filter abort"
_SUCCESS = Result.SUCCESS  # what ``classify`` makes of every plain success
TIMEOUT_BODY = "upstream request timeout"


class Wait(NamedTuple):
    """Sleep this long; send back the time afterwards."""

    seconds: float


class Send(NamedTuple):
    """Send attempt ``attempt`` (1-based) to ``endpoint`` within ``timeout`` seconds (None:
    no mesh limit). The driver releases ``limits`` when the response is closed."""

    endpoint: Endpoint
    attempt: int
    timeout: float | None
    limits: EndpointLimits | None


class Discard(NamedTuple):
    """Close the response held by ``result``: it will not be delivered (a retry follows)."""

    result: Any


class Attempted(NamedTuple):
    """What one attempt came to: its outcome, the driver's result (a response or an
    exception), and the time it ended."""

    outcome: Outcome
    result: Any
    now: float


class Finish(NamedTuple):
    """What the caller gets: ``reply`` (a local answer) or ``result`` of the last attempt."""

    reply: LocalReply | None
    result: Any
    attempts: int
    endpoint: Endpoint | None
    injected: bool = False


Command = Wait | Send | Discard


def fault_abort(status: int | None, grpc_status: str | None) -> LocalReply:
    # A gRPC-only abort still needs an HTTP status for HTTP callers: 500, as Envoy maps it.
    return LocalReply(status or 500, FAULT_ABORT_BODY, grpc_status=grpc_status)


def _header_timeout(raw: str) -> float | None:
    """``x-envoy-upstream-rq-timeout-ms`` in seconds; None if not a positive number."""
    try:
        millis = int(raw)
    except ValueError:
        return None
    return millis / 1000 if millis > 0 else None


def _no_healthy(cluster: Cluster) -> LocalReply:
    return LocalReply(503, f"no healthy upstream in {cluster.name}")


def _overflow(cluster: Cluster, endpoint: Endpoint) -> LocalReply:
    return LocalReply(503, f"upstream overflow: {cluster.name} {endpoint}", overloaded=True)


def express(upstream: Upstream, mesh_config: MeshConfig) -> bool:
    """May a call to ``upstream`` make its first attempt by ``express_send`` and
    ``express_settle``? Yes when the flow's steps 1 and 2 decide nothing that attempt
    depends on: no fault, no mirror, no route timeout, no per-try timeout, and no 1xx-3xx
    status listed for retry. Depends on the snapshot alone (so it can be kept with a
    prepared plan), and holds for requests without headers (a gRPC call without
    metadata): a header may ask for a fault or a timeout. The driver still checks the
    test overlay (``OVERLAY.active``) on every call."""
    if upstream.mirror is not None:
        return False
    route = upstream.forward.route.spec if upstream.forward is not None else None
    if route is not None and (route.fault is not None or route.timeout is not None):
        return False
    retry = (
        route.retries
        if route is not None and route.retries is not None
        else mesh_config.default_http_retry_policy
    )
    if retry.attempts > 0 and retry.per_try_timeout is not None:
        return False
    return not any(code < 400 for code in retry.retry_status_codes)


def express_send(
    upstream: Upstream, pick: PickContext, now: float, deadline: float | None
) -> Send | Finish:
    """The first attempt of an express call (see ``express``), decided as ``attempt_flow``
    decides it: the budgets count the call, then the deadline is checked and an endpoint
    picked and admitted. A ``Finish`` when there is nothing to send (deadline spent, no
    healthy endpoint, overflow): deliver it. Else send the ``Send`` and pass what it came
    to to ``express_settle``. ``deadline`` is the caller's own, as for ``attempt_flow``."""
    cluster = upstream.cluster
    state = cluster.state
    ratio, budget = state.ratio, state.budget
    if ratio is not None:
        ratio.deposit(now)
    if budget is not None:
        budget.request_started(now)
    if deadline is not None and now >= deadline:
        finish = Finish(LocalReply(504, TIMEOUT_BODY), None, 0, None)
    else:
        balancer = cluster.balancer if state.outlier is None else cluster.balancer_at(now)
        endpoint = balancer.pick(pick)
        if endpoint is None:
            finish = Finish(_no_healthy(cluster), None, 0, None)
        else:
            limits = state.limits(endpoint.key)
            if limits is None or limits.try_admit():
                timeout = None if deadline is None else deadline - now
                return _tuple(Send, (endpoint, 1, timeout, limits))
            finish = Finish(_overflow(cluster, endpoint), None, 0, endpoint)
    if budget is not None:
        budget.request_finished(now)
    return finish


def express_settle(upstream: Upstream, send: Send, done: Attempted) -> Finish | None:
    """What the caller gets from an express call's first attempt, when it is a plain
    success (a 1xx-3xx answer; for gRPC, status OK): recorded as the flow records it. None
    for anything else: nothing is recorded, and ``attempt_flow(first=(send, done))`` takes
    it from there (retries, outlier detection, the deadline)."""
    outcome = done.outcome
    status = outcome.status
    grpc_status = outcome.grpc_status
    if status is None or status >= 400 or (grpc_status is not None and grpc_status != "OK"):
        return None
    express_succeeded(upstream, send.endpoint, done.now)
    return _tuple(Finish, (None, done.result, 1, send.endpoint, False))


def express_succeeded(upstream: Upstream, endpoint: Endpoint, now: float) -> None:
    """An express call's first attempt to ``endpoint`` was answered with a plain success
    at ``now``: record it as ``express_settle`` does, for a driver that can tell a plain
    success without an ``Attempted`` (a gRPC call that did not raise has status OK) and
    delivers its result itself."""
    cluster = upstream.cluster
    state = cluster.state
    outlier, budget = state.outlier, state.budget
    if outlier is not None:
        outlier.record(endpoint.key, _SUCCESS, now, total=len(cluster.endpoints))
    if budget is not None:
        budget.request_finished(now)


def express_abandon(upstream: Upstream, now: float) -> None:
    """An express call's first attempt ended without an answer to settle (the driver
    raised, or the call was cancelled): give back what ``express_send`` counted, as
    closing the flow would."""
    budget = upstream.cluster.state.budget
    if budget is not None:
        budget.request_finished(now)


def attempt_flow(
    upstream: Upstream,
    request: RequestView,
    *,
    rng: random.Random,
    now: float,
    replayable: bool,
    mesh_config: MeshConfig,
    pick: PickContext,
    grpc: bool = False,
    deadline: float | None = None,
    first: tuple[Send, Attempted] | None = None,
) -> Generator[Command, Any, Finish]:
    """The flow of one call (see the module docstring). ``deadline`` is the caller's own
    absolute deadline (gRPC ``timeout=``) on the same clock as ``now``; ``grpc`` says the
    call is gRPC, for the test overlay's protocol-specific faults. ``first`` is an express
    call's first attempt (``express_send``) and what it came to, when ``express_settle``
    did not settle it: the flow starts after it, its call already counted."""
    cluster = upstream.cluster
    state = cluster.state
    route = upstream.forward.route.spec if upstream.forward is not None else None

    # 1. Faults (for an express call, none: ``express`` saw to that).
    fault = None if route is None else route.fault
    injection: Any = None
    if OVERLAY.active and first is None:
        injection = OVERLAY.match(
            host=request.host,
            method=request.method,
            path=request.path,
            header=request.header,
            subset=cluster.key.subset,
            grpc=grpc,
        )
    header_faults = mesh_config.allow_header_faults
    if injection is None and (fault is not None or header_faults) and first is None:
        injection = decide(fault, rng, request.header if header_faults else None)
    injected = injection is not None
    if injection is not None:
        if injection.delay:
            now = yield Wait(injection.delay)
        if injection.abort_status is not None or injection.grpc_status is not None:
            reply = fault_abort(injection.abort_status, injection.grpc_status)
            return Finish(reply, None, 0, None, injected=True)

    # 2. Policy: a route with a fault has no timeout and no retries (Istio).
    retry: HTTPRetry | None = None
    caller_deadline, deadline = deadline, None
    if fault is None:
        retry = (
            route.retries
            if route is not None and route.retries is not None
            else (mesh_config.default_http_retry_policy)
        )
        if retry.attempts <= 0:
            retry = None
        limit = None if route is None else route.timeout
        raw = request.header("x-envoy-upstream-rq-timeout-ms")
        if raw is not None:
            asked = _header_timeout(raw)
            if asked is not None and (limit is None or asked < limit):
                limit = asked
        if limit is not None:
            deadline = now + limit
    if caller_deadline is not None and (deadline is None or caller_deadline < deadline):
        deadline = caller_deadline  # the caller's own deadline: the tighter wins
    per_try = None if retry is None else retry.per_try_timeout

    # 3. Budgets see every original request (an express call's, in ``express_send``).
    ratio, budget, retry_limit, outlier = (
        state.ratio,
        state.budget,
        state.retry_limit,
        state.outlier,
    )
    if first is None:
        if ratio is not None:
            ratio.deposit(now)
        if budget is not None:
            budget.request_started(now)
    tried: list[EndpointKey] = []
    retrying: RetryState | None = None
    holds_budget = holds_limit = False
    attempt = 0
    try:
        while True:
            attempt += 1
            done: Attempted
            endpoint: Endpoint | None
            if first is not None:  # an express call's first attempt, made already
                (endpoint, _, _, limits), done = first
                first = None
            else:
                if deadline is not None and now >= deadline:  # spent before this try (a delay)
                    return Finish(LocalReply(504, TIMEOUT_BODY), None, attempt - 1, None, injected)
                context = (
                    pick
                    if not tried
                    else PickContext(rng=rng, hash_key=upstream.hash_key, exclude=tried)
                )
                balancer = cluster.balancer if outlier is None else cluster.balancer_at(now)
                endpoint = balancer.pick(context)
                if endpoint is None:
                    return Finish(_no_healthy(cluster), None, attempt - 1, None, injected)
                limits = state.limits(endpoint.key)
                if limits is not None and not limits.try_admit():
                    reply = _overflow(cluster, endpoint)
                    return Finish(reply, None, attempt - 1, endpoint, injected)
                timeout = per_try
                if deadline is not None:
                    remaining = deadline - now
                    timeout = remaining if timeout is None else min(timeout, remaining)
                done = yield _tuple(Send, (endpoint, attempt, timeout, limits))
            now = done.now
            if holds_budget and budget is not None:
                budget.end_retry()
                holds_budget = False
            if holds_limit and retry_limit is not None:
                retry_limit.end()
                holds_limit = False
            outcome = done.outcome
            if outlier is not None and (
                outcome.status is not None
                or outcome.failure is not None
                or outcome.grpc_status is not None
            ):
                # The caller's own timeouts and client errors say nothing of the endpoint.
                outlier.record(endpoint.key, classify(outcome), now, total=len(cluster.endpoints))
            timed_out = outcome.failure is Failure.TIMEOUT
            if deadline is not None and now >= deadline and (timed_out or outcome.status is None):
                return Finish(LocalReply(504, TIMEOUT_BODY), None, attempt, endpoint, injected)

            # A 1xx-3xx answer (for gRPC, one with status OK) is retried only when its code
            # is listed: most calls end here without consulting the policy's tables.
            status = outcome.status
            grpc_status = outcome.grpc_status
            plain = (
                status is not None and status < 400 and (grpc_status is None or grpc_status == "OK")
            )
            backoff = None
            if (
                retry is not None
                and replayable
                and (not plain or status in retry.retry_status_codes)
                and retriable(retry, outcome)
            ):
                if retrying is None:  # made on the first failure: most calls never need one
                    retrying = RetryState(retry, rng)
                backoff = retrying.next_backoff(outcome, attempt=attempt)
                if backoff is not None and deadline is not None and now + backoff >= deadline:
                    backoff = None
                if backoff is not None and budget is not None:
                    holds_budget = budget.try_begin_retry(now)
                    if not holds_budget:
                        backoff = None
                # Envoy: with a retry budget, maxRetries is ignored.
                if backoff is not None and retry_limit is not None and budget is None:
                    holds_limit = retry_limit.try_begin()
                    if not holds_limit:
                        backoff = None
                # The ratio budget last: a withdrawal cannot be given back if another says no.
                if backoff is not None and ratio is not None and not ratio.try_withdraw(now):
                    backoff = None
                    if holds_budget and budget is not None:
                        budget.end_retry()
                        holds_budget = False
                    if holds_limit and retry_limit is not None:
                        retry_limit.end()
                        holds_limit = False
            if backoff is None:
                if timed_out:
                    return Finish(LocalReply(504, TIMEOUT_BODY), None, attempt, endpoint, injected)
                return _tuple(Finish, (None, done.result, attempt, endpoint, injected))
            tried.append(endpoint.key)  # the next pick avoids it
            yield Discard(done.result)
            now = yield Wait(backoff)
    finally:
        if holds_budget and budget is not None:
            budget.end_retry()
        if holds_limit and retry_limit is not None:
            retry_limit.end()
        if budget is not None:
            budget.request_finished(now)
