"""Outlier detection: eject endpoints that keep failing, Envoy's way, with Istio's defaults.

One ``OutlierDetector`` per cluster. It outlives snapshots: a config push calls
``update()``, which keeps every counter, ejection and multiplier. Thread-safe; the clock
comes in as ``now`` (monotonic seconds) and is never read here.

Theory of operation
-------------------
Each attempt's result is ``record()``-ed against its endpoint. Two consecutive-error
counters run per endpoint, as in Envoy's ``DetectorHostMonitorImpl::putHttpResponseCode``:

- **5xx**: every ``SERVER_ERROR``, ``GATEWAY_ERROR`` and ``CONNECT_FAILURE``;
- **gateway**: every ``GATEWAY_ERROR`` and ``CONNECT_FAILURE``; a plain 5xx such as 500
  resets it (it breaks the run of gateway errors).

A ``SUCCESS`` resets both. Local-origin failures (connect failure, reset, per-try timeout)
count as both kinds, as Envoy maps them when ``split_external_local_origin_errors`` is off,
which Istio leaves off. When a counter reaches its threshold (``consecutive_5xx_errors``,
``consecutive_gateway_errors``; 0 or None is off) the endpoint is detected at once, the
counter starts over, and the endpoint is ejected unless

- it is ejected already (it is not re-ejected, and its clock does not restart), or
- the cap forbids it: with ``n`` endpoints ejected out of ``total``, one more may go only if
  ``(n + 1) / total ≤ max_ejection_percent``, except that when none is ejected one always
  may. That is current Envoy's ``ejectHost`` with ``always_eject_one_host`` on (Envoy
  1.31); before that, Envoy tested ``n / total < max_ejection_percent``, which also let
  the first ejection through but could overshoot the cap by one. Without the exception a
  cluster of fewer than ten endpoints could never eject anything at Istio's default 10%.
  A ``max_ejection_percent`` of 0 ejects nothing.

An ejection lasts ``base_ejection_time × m``, capped at ``max(base, max_ejection_time)``,
where ``m`` is the endpoint's ejection multiplier: raised by one at each ejection (while
``m × base < max + base``, Envoy's rule) and lowered by one at each sweep that finds the
endpoint in service at least one ``interval`` after it came back.

Sweeps are Envoy's interval timer: they happen every ``interval`` seconds from the first
time the detector learns the time (``start``, else the first ``now`` it is given). They are
evaluated lazily: any call with a ``now`` past one or more sweep times first applies those
sweeps, in closed form, so an idle hour costs one pass over the endpoints rather than 360.
At a sweep an ejected endpoint whose time is up (``sweep - ejected_at ≥ duration``) returns;
so it returns at the first sweep at or after its ejection time has passed, never between.

``min_health_percent`` is for the caller, not the detector (Envoy's panic threshold, which
Istio sets from it): when the healthy share of the cluster, ``(total - ejected) × 100 /
total``, is below ``min_health_percent``, ignore the ejections and balance over every
endpoint. At Istio's default of 0 that never happens.

``version`` counts changes of the ejected set, so a caller can cache whatever it derives
from ``ejected()`` (a balancer) and rebuild only when the version moves.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Collection
from typing import Final

from inmesh.config.model import OutlierDetection
from inmesh.endpoints import EndpointKey
from inmesh.resilience.retry import GRPC_STATUS_NAMES, Outcome

__all__ = ["OutlierDetector", "Result", "classify"]

_MIN_INTERVAL: Final = 0.001  # seconds; Istio requires ≥ 1 ms, a zero would never sweep


class Result(enum.Enum):
    """How one attempt counts for outlier detection."""

    SUCCESS = "success"
    """Anything but a 5xx: resets both consecutive counters."""
    SERVER_ERROR = "server-error"
    """A 5xx that is not a gateway error (500, 501, ...)."""
    GATEWAY_ERROR = "gateway-error"
    """502, 503 or 504."""
    CONNECT_FAILURE = "connect-failure"
    """A local-origin failure: no connection, a reset, a per-try timeout. Counts as both a
    5xx and a gateway error."""


_EMPTY: Final[frozenset[EndpointKey]] = frozenset()
_GRPC_GATEWAY: Final = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE"})  # Envoy: 504, 503
_GRPC_SERVER: Final = frozenset({"UNKNOWN", "UNIMPLEMENTED", "INTERNAL", "DATA_LOSS"})  # 50x


def classify(outcome: Outcome) -> Result:
    """The ``Result`` of an attempt's ``Outcome``.

    A transport failure of any kind is a ``CONNECT_FAILURE``. A ``grpc-status``, when
    present, counts instead of the HTTP status, through Envoy's ``grpcToHttpStatus``:
    UNAVAILABLE and DEADLINE_EXCEEDED are gateway errors (503, 504); UNKNOWN,
    UNIMPLEMENTED, INTERNAL, DATA_LOSS and unknown codes are server errors (500, 501).
    """
    if outcome.failure is not None:
        return Result.CONNECT_FAILURE
    grpc_status = outcome.grpc_status
    if grpc_status is not None:
        name = grpc_status.upper()
        if name.isdigit():
            code = int(name)
            name = GRPC_STATUS_NAMES[code] if code < len(GRPC_STATUS_NAMES) else "UNKNOWN"
        if name in _GRPC_GATEWAY:
            return Result.GATEWAY_ERROR
        if name in _GRPC_SERVER or name not in GRPC_STATUS_NAMES:
            return Result.SERVER_ERROR
        return Result.SUCCESS
    status = outcome.status
    if status is None or not 500 <= status < 600:
        return Result.SUCCESS
    if status in (502, 503, 504):
        return Result.GATEWAY_ERROR
    return Result.SERVER_ERROR


class _Host:
    """The detector's figures for one endpoint. Dropped when all are back to zero."""

    __slots__ = ("backoff", "ejected_at", "five_xx", "gateway", "returned")

    def __init__(self) -> None:
        self.five_xx = 0  # consecutive 5xx (gateway errors and local failures included)
        self.gateway = 0  # consecutive gateway errors (local failures included)
        self.backoff = 0  # the ejection multiplier
        self.ejected_at: float | None = None
        self.returned: int | None = None  # the sweep number at which it last came back

    def idle(self) -> bool:
        return (
            self.ejected_at is None
            and self.backoff == 0
            and self.five_xx == 0
            and self.gateway == 0
        )


class OutlierDetector:
    """Consecutive-error outlier detection for one cluster (see the module docstring)."""

    __slots__ = (
        "_ejected",
        "_hosts",
        "_lock",
        "_next_sweep",
        "_origin",
        "_settings",
        "_started",
        "_swept",
        "_version",
    )

    def __init__(self, settings: OutlierDetection, *, start: float | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._hosts: dict[EndpointKey, _Host] = {}
        self._ejected = _EMPTY
        self._version = 0
        # Sweep k happens at origin + k × interval, k ≥ 1; sweeps 1.._swept are applied.
        self._started = False
        self._origin = 0.0
        self._swept = 0
        self._next_sweep = -math.inf  # lock-free fast path of ejected(): nothing due before
        if start is not None:
            self._begin(start)

    # ------------------------------------------------------------------ public

    @property
    def settings(self) -> OutlierDetection:
        return self._settings

    @property
    def version(self) -> int:
        """Bumped on every change of the ejected set."""
        return self._version

    def update(self, settings: OutlierDetection) -> None:
        """A config push: adopt ``settings``, keep counters, ejections and multipliers.

        Ejection times are computed from the current settings whenever they are checked (as
        Envoy reads its runtime values), so a new ``base_ejection_time`` applies to the
        endpoints ejected now too. A new ``interval`` re-anchors the sweeps at the last one.
        """
        with self._lock:
            old = self._interval()
            self._settings = settings
            new = self._interval()
            if self._started and new != old:
                self._origin += self._swept * old
                for host in self._hosts.values():
                    if host.returned is not None:
                        host.returned -= self._swept
                self._swept = 0
                self._next_sweep = self._origin + new

    def record(self, key: EndpointKey, result: Result, now: float, *, total: int) -> bool:
        """Count one attempt's ``result`` against endpoint ``key``.

        ``total`` is the number of endpoints in the cluster now (the base of
        ``max_ejection_percent``). True if the ejected set changed during this call (an
        ejection, or a return that fell due).
        """
        if result is Result.SUCCESS and now < self._next_sweep and key not in self._hosts:
            # Most attempts: a success of an endpoint with nothing against it, no sweep
            # due. Lock-free reads; a failure recorded concurrently orders after this.
            return False
        with self._lock:
            changed = self._sweep(now)
            host = self._hosts.get(key)
            if result is Result.SUCCESS:
                if host is not None:
                    host.five_xx = host.gateway = 0
                    if host.idle():
                        del self._hosts[key]
                return changed
            if host is None:
                host = self._hosts[key] = _Host()
            host.five_xx += 1
            host.gateway = 0 if result is Result.SERVER_ERROR else host.gateway + 1
            settings = self._settings
            limit_5xx = settings.consecutive_5xx_errors or 0
            limit_gateway = settings.consecutive_gateway_errors or 0
            hit_5xx = 0 < limit_5xx <= host.five_xx
            hit_gateway = 0 < limit_gateway <= host.gateway
            if not (hit_5xx or hit_gateway):
                return changed
            # A run that reached its threshold is one detection: it starts over whether or
            # not the endpoint can be ejected (Envoy resets the counter after ejectHost even
            # when the cap blocked it). For an endpoint already ejected Envoy returns before
            # that reset, leaving the counter past a threshold it tests with ==, so the
            # endpoint cannot be detected again until a success; here it starts over too.
            if hit_5xx:
                host.five_xx = 0
            if hit_gateway:
                host.gateway = 0
            if host.ejected_at is not None or not self._may_eject(total):
                if host.idle():
                    del self._hosts[key]
                return changed
            self._eject(host, now)
            return True

    def ejected(self, now: float) -> frozenset[EndpointKey]:
        """The endpoints ejected at ``now`` (returns that fell due are applied first)."""
        if now < self._next_sweep:  # racy read, but any value it sees was true just now
            return self._ejected
        with self._lock:
            self._sweep(now)
            return self._ejected

    def retain(self, keys: Collection[EndpointKey]) -> bool:
        """Forget endpoints not in ``keys`` (gone from the cluster); True if the ejected set
        changed. A forgotten endpoint no longer counts against ``max_ejection_percent``."""
        keep = keys if isinstance(keys, set | frozenset) else set(keys)
        with self._lock:
            gone = [key for key in self._hosts if key not in keep]
            if not gone:
                return False
            was_ejected = False
            for key in gone:
                was_ejected |= self._hosts.pop(key).ejected_at is not None
            if was_ejected:
                self._publish()
            return was_ejected

    def multiplier(self, key: EndpointKey) -> int:
        """The ejection multiplier of ``key`` as of the last sweep applied (for explain)."""
        host = self._hosts.get(key)
        return 0 if host is None else host.backoff

    def __repr__(self) -> str:
        return f"OutlierDetector(ejected={sorted(self._ejected)}, version={self._version})"

    # ------------------------------------------------------------------ internals (lock held)

    def _interval(self) -> float:
        return max(self._settings.interval, _MIN_INTERVAL)

    def _duration(self, backoff: int) -> float:
        base = self._settings.base_ejection_time
        return min(base * backoff, max(base, self._settings.max_ejection_time))

    def _sweep_time(self, k: int) -> float:
        return self._origin + k * self._interval()

    def _begin(self, now: float) -> None:
        self._started = True
        self._origin = now
        self._swept = 0
        self._next_sweep = now + self._interval()

    def _may_eject(self, total: int) -> bool:
        percent = self._settings.max_ejection_percent
        if percent <= 0:
            return False
        ejected = len(self._ejected)
        return ejected == 0 or (ejected + 1) * 100 <= percent * max(total, 1)

    def _eject(self, host: _Host, now: float) -> None:
        base = self._settings.base_ejection_time
        if base <= 0:
            host.backoff = 1
        elif host.backoff * base < self._settings.max_ejection_time + base:
            host.backoff += 1
        host.ejected_at = now
        self._publish()

    def _publish(self) -> None:
        self._ejected = frozenset(k for k, h in self._hosts.items() if h.ejected_at is not None)
        self._version += 1

    def _due(self, now: float) -> int:
        """The number of the last sweep at or before ``now``."""
        k = max(0, math.floor((now - self._origin) / self._interval()))
        # Division can land one off at a boundary: settle on the times _sweep_time gives.
        while self._sweep_time(k + 1) <= now:
            k += 1
        while k > 0 and self._sweep_time(k) > now:
            k -= 1
        return k

    def _return_sweep(self, ejected_at: float, duration: float, after: int) -> int:
        """The first sweep numbered above ``after`` at which the ejection time has passed."""
        k = max(after + 1, math.ceil((ejected_at + duration - self._origin) / self._interval()))
        while k > after + 1 and self._sweep_time(k - 1) - ejected_at >= duration:
            k -= 1
        while self._sweep_time(k) - ejected_at < duration:
            k += 1
        return k

    def _sweep(self, now: float) -> bool:
        """Apply every sweep due by ``now``; True if the ejected set changed."""
        if not self._started:
            self._begin(now)
            return False
        if now < self._next_sweep:
            return False
        due = self._due(now)
        last = self._swept
        if due <= last:
            return False
        returned = False
        for key, host in list(self._hosts.items()):
            if host.ejected_at is not None:
                back = self._return_sweep(host.ejected_at, self._duration(host.backoff), last)
                if back > due:
                    continue
                host.ejected_at = None
                host.returned = back
                returned = True
                # Every later sweep finds it in service at least one interval after its return.
                host.backoff = max(0, host.backoff - (due - back))
            elif host.backoff > 0 and host.returned is not None:
                host.backoff = max(0, host.backoff - (due - max(last, host.returned)))
            if host.idle():
                del self._hosts[key]
        self._swept = due
        self._next_sweep = self._sweep_time(due + 1)
        if returned:
            self._publish()
        return returned
