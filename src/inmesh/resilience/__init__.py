"""Failure management: the pure policy core behind the attempt loop.

One small module per concern, each a set of plain objects that decide and never act: no
I/O, no sleeping, no clock (``now`` comes in as monotonic seconds), no global random
generator (a seeded ``random.Random`` comes in). The attempt loop in ``inmesh.flow``
consults them in this order for each request:

``faults``
    ``decide()``: delay or abort this request? (VirtualService ``fault``, header faults)
``limits``
    ``EndpointLimits``: may one more request go to this endpoint, or does it overflow (503)?
    ``RetryLimit``: may one more retry be in flight to this cluster? (``connectionPool``)
``retry``
    ``retriable()`` and ``RetryState``: does ``retryOn`` cover this outcome, are attempts
    left, and how long is the back-off? (VirtualService ``retries``, Envoy's jitter)
``budget``
    ``RatioBudget`` (MeshConfig ``retryBudget``) and ``ConcurrencyBudget``
    (DestinationRule ``retryBudget``): may the mesh afford one more retry?
``outlier``
    ``OutlierDetector``: which endpoints are ejected for failing (``outlierDetection``)?

The per-cluster and per-endpoint objects are thread-safe and outlive config snapshots;
``update()`` re-configures them in place without losing their state.
"""

from __future__ import annotations

from inmesh.resilience.budget import ConcurrencyBudget, RatioBudget
from inmesh.resilience.faults import FAULT_ABORT_BODY, FaultPlan, decide
from inmesh.resilience.limits import EndpointLimits, RetryLimit
from inmesh.resilience.outlier import OutlierDetector, Result, classify
from inmesh.resilience.retry import EnvoyJitter, Failure, Outcome, RetryState, retriable

__all__ = [
    "FAULT_ABORT_BODY",
    "ConcurrencyBudget",
    "EndpointLimits",
    "EnvoyJitter",
    "Failure",
    "FaultPlan",
    "Outcome",
    "OutlierDetector",
    "RatioBudget",
    "Result",
    "RetryLimit",
    "RetryState",
    "classify",
    "decide",
    "retriable",
]
