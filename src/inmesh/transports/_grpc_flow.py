"""A stand-in for ``inmesh.flow.attempt_flow`` until the core takes two small changes.

The gRPC adapter needs (1) the test overlay asked with ``grpc=True``, so ``grpc_status``
rules apply to gRPC calls and ``http_status`` rules do not; (2) the caller's own deadline
(gRPC ``timeout=``) folded into the flow's deadline, the tighter winning, and checked
before each try (a fault delay may have spent it). This is ``attempt_flow`` with exactly
those changes;
``inmesh.transports.grpc`` uses the core's own flow as soon as it accepts ``grpc=`` and
``deadline=``, and this module is then to be deleted.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any

from inmesh.balancing import PickContext
from inmesh.config.model import HTTPRetry, MeshConfig
from inmesh.endpoints import EndpointKey
from inmesh.flow import (
    TIMEOUT_BODY,
    Attempted,
    Command,
    Discard,
    Finish,
    Send,
    Wait,
    _header_timeout,
    fault_abort,
)
from inmesh.plan import LocalReply, Upstream
from inmesh.resilience.faults import decide
from inmesh.resilience.outlier import classify
from inmesh.resilience.retry import Failure, RetryState, retriable
from inmesh.routing import RequestView
from inmesh.testing.faults import OVERLAY

__all__ = ["attempt_flow"]


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
) -> Generator[Command, Any, Finish]:
    cluster = upstream.cluster
    state = cluster.state
    route = upstream.forward.route.spec if upstream.forward is not None else None

    # 1. Faults.
    fault = None if route is None else route.fault
    injection: Any = None
    if OVERLAY.active:
        injection = OVERLAY.match(
            host=request.host,
            method=request.method,
            path=request.path,
            header=request.header,
            subset=cluster.key.subset,
            grpc=grpc,
        )
    header_faults = mesh_config.allow_header_faults
    if injection is None and (fault is not None or header_faults):
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
        asked = _header_timeout(request)
        if asked is not None and (limit is None or asked < limit):
            limit = asked
        if limit is not None:
            deadline = now + limit
    if caller_deadline is not None and (deadline is None or caller_deadline < deadline):
        deadline = caller_deadline  # the caller's own deadline (gRPC timeout=): tighter wins
    per_try = None if retry is None else retry.per_try_timeout

    # 3. Budgets see every original request.
    ratio, budget, retry_limit, outlier = (
        state.ratio,
        state.budget,
        state.retry_limit,
        state.outlier,
    )
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
            if deadline is not None and now >= deadline:  # spent before the first try (delay)
                reply = LocalReply(504, TIMEOUT_BODY)
                return Finish(reply, None, attempt, None, injected)
            attempt += 1
            context = (
                pick
                if not tried
                else PickContext(rng=rng, hash_key=upstream.hash_key, exclude=tried)
            )
            balancer = cluster.balancer if outlier is None else cluster.balancer_at(now)
            endpoint = balancer.pick(context)
            if endpoint is None:
                reply = LocalReply(503, f"no healthy upstream in {cluster.name}")
                return Finish(reply, None, attempt - 1, None, injected)
            limits = state.limits(endpoint.key)
            if limits is not None and not limits.try_admit():
                reply = LocalReply(
                    503, f"upstream overflow: {cluster.name} {endpoint}", overloaded=True
                )
                return Finish(reply, None, attempt - 1, endpoint, injected)
            timeout = per_try
            if deadline is not None:
                remaining = deadline - now
                timeout = remaining if timeout is None else min(timeout, remaining)
            done: Attempted = yield Send(endpoint, attempt, timeout, limits)
            now = done.now
            if holds_budget and budget is not None:
                budget.end_retry()
                holds_budget = False
            if holds_limit and retry_limit is not None:
                retry_limit.end()
                holds_limit = False
            tried.append(endpoint.key)
            outcome = done.outcome
            if outlier is not None:
                outlier.record(endpoint.key, classify(outcome), now, total=len(cluster.endpoints))
            timed_out = outcome.failure is Failure.TIMEOUT
            if deadline is not None and now >= deadline and (timed_out or outcome.status is None):
                return Finish(LocalReply(504, TIMEOUT_BODY), None, attempt, endpoint, injected)

            backoff = None
            if retry is not None and replayable and retriable(retry, outcome):
                if retrying is None:  # made on the first failure: most calls never need one
                    retrying = RetryState(retry, rng)
                backoff = retrying.next_backoff(outcome, attempt=attempt)
            if backoff is not None and deadline is not None and now + backoff >= deadline:
                backoff = None
            if backoff is not None and budget is not None:
                holds_budget = budget.try_begin_retry(now)
                if not holds_budget:
                    backoff = None
            if backoff is not None and retry_limit is not None:
                holds_limit = retry_limit.try_begin()
                if not holds_limit:
                    backoff = None
                    if holds_budget and budget is not None:
                        budget.end_retry()
                        holds_budget = False
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
                return Finish(None, done.result, attempt, endpoint, injected)
            yield Discard(done.result)
            now = yield Wait(backoff)
    finally:
        if holds_budget and budget is not None:
            budget.end_retry()
        if holds_limit and retry_limit is not None:
            retry_limit.end()
        if budget is not None:
            budget.request_finished(now)
