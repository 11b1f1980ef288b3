"""Retry decisions: which outcomes a route retries, how many times, and how long to wait.

The semantics are Envoy's ``retry_on`` as Istio configures it; tenacity supplies the stop
and wait strategies. Nothing here sleeps or reads the clock: the attempt loop asks
``RetryState.next_backoff()`` for a number of seconds and does the waiting itself.

Theory of operation
-------------------
An attempt ends in an ``Outcome``: a response status, or a transport ``Failure`` instead,
and for gRPC the ``grpc-status`` it carried. ``retriable(policy, outcome)`` says whether the
route's ``retryOn`` covers it. The table, taken from Envoy's router
(``RetryStateImpl::wouldRetryFromHeaders`` / ``wouldRetryFromReset``), not only its prose:

=========================  ===================================================================
token                      retries
=========================  ===================================================================
``5xx``                    any 5xx status; every transport failure (connect failure, reset,
                           refused stream, per-try timeout)
``gateway-error``          502, 503, 504; every transport failure, like ``5xx`` -- Envoy
                           counts an upstream reset as a 5xx for both tokens
``reset``                  every transport failure (connect failures included: they are
                           resets too); no status
``connect-failure``        connect failures only
``refused-stream``         REFUSED_STREAM resets only
``reset-before-request``   connect failures (no request byte was sent)
``retriable-4xx``          409
``retriable-status-codes`` the policy's ``retry_status_codes``
``cancelled`` ...          the gRPC status of the same name (``cancelled``,
                           ``deadline-exceeded``, ``internal``, ``resource-exhausted``,
                           ``unavailable``)
=========================  ===================================================================

A per-try timeout is an upstream reset in Envoy (``onPerTryTimeout`` resets the stream and
asks ``maybeRetryReset``), so it is retried by ``5xx``, ``gateway-error`` and ``reset``
and by nothing else. Codes written as plain numbers in ``retryOn`` are retried whether or
not the token ``retriable-status-codes`` is there: Istio adds the token for you. Tokens
inmesh cannot evaluate without response headers (``envoy-ratelimited``,
``retriable-headers``) or that need HTTP/3 (``http3-post-connect-failure``) match nothing.

A policy's table is compiled once (``functools.lru_cache`` on the frozen ``HTTPRetry``),
so the per-attempt check is a few set lookups.

Back-off is Envoy's fully jittered exponential back-off: after retry ``n`` is decided, the
wait is uniform in ``[0, (2**n - 1) * base)`` with ``base`` 25 ms, the bound capped at
``cap`` (Envoy: 10 × base = 250 ms). The first retry waits 0-25 ms, the second 0-75 ms, the
third 0-175 ms, then 0-250 ms. tenacity's own jitter strategies wait seconds, far too long
for a mesh; ``EnvoyJitter`` is the strategy instead, drawing from the caller's seeded
``random.Random``.
"""

from __future__ import annotations

import enum
import functools
import random
from typing import Final, NamedTuple

import tenacity

from inmesh.config.model import GRPC_STATUS_NAMES, HTTPRetry

__all__ = [
    "GRPC_STATUS_NAMES",
    "EnvoyJitter",
    "Failure",
    "Outcome",
    "RetryState",
    "retriable",
]


_DEFAULT_BASE: Final = 0.025  # Envoy's default base interval
_DEFAULT_CAP: Final = 0.25  # Envoy's default max interval: 10 × base
_MAX_EXPONENT: Final = 64  # beyond this 2**n × base is past any cap; keeps floats finite


class Failure(enum.Enum):
    """An attempt that ended without a response."""

    CONNECT = "connect-failure"
    """No connection: refused, unreachable, connect timeout, TLS handshake failure."""
    RESET = "reset"
    """The connection or stream broke before a response arrived."""
    REFUSED_STREAM = "refused-stream"
    """HTTP/2 REFUSED_STREAM: the server did not process the request at all."""
    TIMEOUT = "timeout"
    """The per-try timeout fired (the overall deadline is not a retriable failure)."""


class Outcome(NamedTuple):
    """What one attempt came to (a NamedTuple: one is built per attempt)."""

    status: int | None = None
    """The HTTP status, if a response arrived."""
    failure: Failure | None = None
    """A transport failure instead of a response."""
    grpc_status: str | None = None
    """The gRPC status name (``"UNAVAILABLE"``) from ``grpc-status``; a code number also works."""


# --------------------------------------------------------------------------- retry_on

_ALL_FAILURES: Final = frozenset(Failure)
_GATEWAY_STATUSES: Final = frozenset({502, 503, 504})
_GRPC_TOKENS: Final = {
    "cancelled": "CANCELLED",
    "deadline-exceeded": "DEADLINE_EXCEEDED",
    "internal": "INTERNAL",
    "resource-exhausted": "RESOURCE_EXHAUSTED",
    "unavailable": "UNAVAILABLE",
}
_FAILURE_TOKENS: Final = {
    "5xx": _ALL_FAILURES,
    "gateway-error": _ALL_FAILURES,
    "reset": _ALL_FAILURES,
    "connect-failure": frozenset({Failure.CONNECT}),
    "refused-stream": frozenset({Failure.REFUSED_STREAM}),
    "reset-before-request": frozenset({Failure.CONNECT}),
}


class _Rules(NamedTuple):
    """One policy's ``retry_on``, compiled."""

    failures: frozenset[Failure]
    any_5xx: bool
    statuses: frozenset[int]
    grpc: frozenset[str]  # names and code numbers as text: grpc-status is a number on the wire


@functools.lru_cache(maxsize=512)
def _rules(policy: HTTPRetry) -> _Rules:
    tokens = {token.strip().lower() for token in policy.retry_on}
    failures: set[Failure] = set()
    statuses: set[int] = set(policy.retry_status_codes)  # Istio: plain codes imply the token
    grpc: set[str] = set()
    for token in tokens:
        failures |= _FAILURE_TOKENS.get(token, frozenset())
        name = _GRPC_TOKENS.get(token)
        if name is not None:
            grpc.add(name)
            grpc.add(str(GRPC_STATUS_NAMES.index(name)))
    if "gateway-error" in tokens:
        statuses |= _GATEWAY_STATUSES
    if "retriable-4xx" in tokens:
        statuses.add(409)
    return _Rules(frozenset(failures), "5xx" in tokens, frozenset(statuses), frozenset(grpc))


def retriable(policy: HTTPRetry, outcome: Outcome) -> bool:
    """Whether ``policy.retry_on`` covers ``outcome`` (attempts left are not considered)."""
    rules = _rules(policy)
    if outcome.failure is not None:
        return outcome.failure in rules.failures
    status = outcome.status
    if status is not None and (status in rules.statuses or (rules.any_5xx and 500 <= status < 600)):
        return True
    grpc_status = outcome.grpc_status
    return grpc_status is not None and grpc_status.upper() in rules.grpc


# --------------------------------------------------------------------------- back-off


class EnvoyJitter(tenacity.wait.wait_base):
    """Envoy's back-off as a tenacity wait strategy.

    Before retry ``n`` (``retry_state.attempt_number``: the attempt that just failed), wait
    a uniform time in ``[0, min((2**n - 1) * base, cap))``, drawn from ``rng``.
    """

    def __init__(
        self, rng: random.Random, *, base: float = _DEFAULT_BASE, cap: float = _DEFAULT_CAP
    ) -> None:
        self.rng = rng
        self.base = base
        self.cap = cap

    def bound(self, n: int) -> float:
        """The exclusive upper bound of the wait before retry ``n`` (1-based)."""
        n = min(max(n, 1), _MAX_EXPONENT)
        return min(((1 << n) - 1) * self.base, self.cap)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.rng.random() * self.bound(retry_state.attempt_number)


def _refuse_to_sleep(seconds: float) -> None:
    # inmesh drives the loop and does its own waiting; tenacity's must never run.
    raise RuntimeError(f"tenacity tried to sleep {seconds}s inside inmesh's retry core")


class RetryState:
    """The retry bookkeeping of one call. Create it on the call's first failed attempt.

    It holds one ``tenacity.Retrying`` (stop after ``attempts + 1`` tries, wait
    ``EnvoyJitter``) and one ``tenacity.RetryCallState`` for this call alone: tenacity's
    objects carry per-call state and must not be shared by concurrent calls. Only their
    strategies are used; tenacity's loop and sleep never run. (``RetryCallState`` stamps a
    ``start_time`` from the clock when it is made; nothing here reads it.)
    """

    __slots__ = ("_call", "_policy", "_retrying")

    def __init__(
        self,
        policy: HTTPRetry,
        rng: random.Random,
        *,
        base: float = _DEFAULT_BASE,
        cap: float = _DEFAULT_CAP,
    ) -> None:
        self._policy = policy
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(policy.attempts, 0) + 1),
            wait=EnvoyJitter(rng, base=base, cap=cap),
            sleep=_refuse_to_sleep,
            reraise=True,
        )
        self._call = tenacity.RetryCallState(self._retrying, fn=None, args=(), kwargs={})

    @property
    def policy(self) -> HTTPRetry:
        return self._policy

    @property
    def retrying(self) -> tenacity.Retrying:
        """This call's tenacity object (for inspection)."""
        return self._retrying

    def next_backoff(self, outcome: Outcome, *, attempt: int) -> float | None:
        """After try number ``attempt`` (1-based) ended in ``outcome``: the seconds to wait
        before the next try, or ``None`` when there is to be no retry (not retriable, or
        the policy's attempts are used up)."""
        if not retriable(self._policy, outcome):
            return None
        call = self._call
        call.attempt_number = attempt
        if self._retrying.stop(call):
            return None
        backoff = float(self._retrying.wait(call))
        call.upcoming_sleep = backoff
        call.idle_for += backoff
        return backoff
