"""Fault injection: whether this request is delayed or aborted, and how.

``decide()`` turns a route's ``HTTPFault`` (and, when the mesh allows them, the caller's
``x-envoy-fault-*`` request headers) into a ``FaultPlan`` for one request. It draws from
the caller's seeded ``random.Random`` and does nothing else: the attempt loop waits out
the delay and answers the abort (body ``fault filter abort``, as Envoy's).

Semantics (Istio's ``HTTPFaultInjection`` as Envoy's fault filter applies it):

- A fault with no ``percentage`` never fires (Istio). A percentage is a 0-100 float; the
  fault fires when ``rng.random() * 100 < percentage``. At 100 or more it always fires and
  at 0 or less never, without a draw.
- Delay and abort are decided independently, the delay first. When both fire the request
  is delayed and then aborted, as Envoy does.
- Header faults (only when the caller passes ``header``, which it does only when
  MeshConfig ``allowHeaderFaults`` is on): ``x-envoy-fault-delay-request`` (milliseconds)
  and ``x-envoy-fault-abort-request`` (an HTTP status in [200, 600)) or
  ``x-envoy-fault-abort-grpc-request`` (a gRPC code, 0-16, or its name) replace the
  route's delay or abort. Their percentage is ``x-envoy-fault-*-request-percentage``,
  capped by the route's configured percentage for that fault if the route configures one
  (else by 100); without a valid percentage header the cap itself applies, as in Envoy's
  ``HeaderPercentageProvider``. A percentage header alone does nothing; a malformed value
  is ignored (as if absent). An abort with gRPC status OK is malformed: it aborts nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Final, NamedTuple

from inmesh.config.model import HTTPFault
from inmesh.resilience.retry import GRPC_STATUS_NAMES

__all__ = [
    "ABORT_GRPC_HEADER",
    "ABORT_HEADER",
    "ABORT_PERCENTAGE_HEADER",
    "DELAY_HEADER",
    "DELAY_PERCENTAGE_HEADER",
    "FAULT_ABORT_BODY",
    "FaultPlan",
    "decide",
    "fires",
]

DELAY_HEADER: Final = "x-envoy-fault-delay-request"
DELAY_PERCENTAGE_HEADER: Final = "x-envoy-fault-delay-request-percentage"
ABORT_HEADER: Final = "x-envoy-fault-abort-request"
ABORT_GRPC_HEADER: Final = "x-envoy-fault-abort-grpc-request"
ABORT_PERCENTAGE_HEADER: Final = "x-envoy-fault-abort-request-percentage"
FAULT_ABORT_BODY: Final = "fault filter abort"

_GRPC_CODES: Final = {name: code for code, name in enumerate(GRPC_STATUS_NAMES)}


class FaultPlan(NamedTuple):
    """What to inject into one request. ``decide`` returns None instead of an empty plan."""

    delay: float | None
    """Seconds to wait before the upstream call."""
    abort_status: int | None
    """The HTTP status to answer with instead of calling upstream."""
    grpc_status: str | None
    """The gRPC status name to answer with instead of calling upstream."""


def fires(percentage: float | None, rng: random.Random) -> bool:
    """One Bernoulli draw at ``percentage`` percent; None never fires (Istio)."""
    if percentage is None or percentage <= 0:
        return False
    if percentage >= 100:
        return True
    return rng.random() * 100 < percentage


def _number(text: str | None) -> float | None:
    """A finite, non-negative number, or None for anything else."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _integer(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _grpc_name(text: str | None) -> str | None:
    if text is None:
        return None
    code = _integer(text)
    if code is not None:
        name = GRPC_STATUS_NAMES[code] if code < len(GRPC_STATUS_NAMES) else None
    else:
        name = text.strip().upper()
        name = name if name in _GRPC_CODES else None
    return None if name == "OK" else name


def _capped(header_percentage: str | None, configured: float | None) -> float:
    cap = 100.0 if configured is None else configured
    asked = _number(header_percentage)
    return cap if asked is None else min(asked, cap)


def decide(
    fault: HTTPFault | None,
    rng: random.Random,
    header: Callable[[str], str | None] | None = None,
) -> FaultPlan | None:
    """The faults to inject into one request, or None when nothing fires.

    ``header`` looks up a request header by lower-case name; pass it only when header
    faults are allowed.
    """
    route_delay = fault.delay if fault is not None else None
    route_abort = fault.abort if fault is not None else None
    if header is None and route_delay is None and route_abort is None:
        return None

    delay: float | None = None
    configured = None if route_delay is None else route_delay.percentage
    asked_ms = _number(header(DELAY_HEADER)) if header is not None else None
    if asked_ms and header is not None:  # a zero delay is no delay: ignored like a bad value
        if fires(_capped(header(DELAY_PERCENTAGE_HEADER), configured), rng):
            delay = asked_ms / 1000.0
    elif route_delay is not None and fires(configured, rng):
        delay = route_delay.fixed_delay

    abort_status: int | None = None
    grpc_status: str | None = None
    configured = None if route_abort is None else route_abort.percentage
    asked_status: int | None = None
    asked_grpc: str | None = None
    if header is not None:
        asked_status = _integer(header(ABORT_HEADER))
        if asked_status is not None and not 200 <= asked_status < 600:
            asked_status = None
        asked_grpc = _grpc_name(header(ABORT_GRPC_HEADER))
    if header is not None and (asked_status is not None or asked_grpc is not None):
        if fires(_capped(header(ABORT_PERCENTAGE_HEADER), configured), rng):
            abort_status, grpc_status = asked_status, asked_grpc
    elif route_abort is not None and fires(configured, rng):
        abort_status, grpc_status = route_abort.http_status, route_abort.grpc_status

    if delay is None and abort_status is None and grpc_status is None:
        return None
    return FaultPlan(delay, abort_status, grpc_status)
