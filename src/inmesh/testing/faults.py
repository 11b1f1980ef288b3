"""The test fault overlay: faults a test injects into every Mesh of the process.

``OVERLAY`` is the one mutable global of inmesh, and it is explicit: the transports ask
it, before they send, whether a fault applies to a call, and tell it, when they are done,
what the call came to. The pytest plugin's ``mesh_faults`` fixture and ``mesh_fault``
marker install rules on it for one test and undo them when the test ends; ``MeshFaults``
does the same outside pytest. Nothing here does I/O, sleeps or reads the clock: an
``Injection`` says what to do, the transport does it.

Theory of operation.

- **Rules are tried in the order they were installed; the first that matches a call
  decides it**, as the first matching route of a VirtualService does. A rule matches a
  call when its host, protocol and filters match and, if it has ``first=N``, it has not
  yet seen N calls. Its ``percent`` then draws whether this call gets the fault; a call
  the draw spares goes through unharmed (later rules are not asked). So put specific
  rules before general ones.
- **Protocols.** An abort names the protocol it answers: ``http_status`` aborts HTTP
  calls, ``grpc_status`` gRPC calls (a rule may name both). A delay-only rule applies
  to both. A rule that does not apply to a call's protocol is skipped for that call.
- **Reproducible draws.** Each installed rule draws from its own ``random.Random``,
  seeded from the overlay's seed and the rule's number (its position in installation
  order since the last ``seed()``), so which calls a ``percent`` rule hits depends only
  on the seed, the rules and the order of the calls — never on other tests.
- **Concurrency.** ``active`` is a plain attribute the transports read without a lock
  on every request; it is only ever written under the lock. ``match`` checks a rule's
  filters on an immutable tuple of the installed rules, and takes the lock only to
  count a call against ``first`` and draw ``percent``, so a ``first=N`` rule faults
  exactly N calls however many threads race for them.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from types import TracebackType
from typing import Any, Final, NamedTuple

from inmesh.exceptions import ConfigError, Problem
from inmesh.grpc_status import GRPC_STATUS_NAMES as _GRPC_STATUS_BY_CODE

__all__ = [
    "GRPC_STATUS_NAMES",
    "OVERLAY",
    "CallRecord",
    "FaultOverlay",
    "FaultRule",
    "Injection",
    "InstalledFault",
    "MeshFaults",
]

#: The gRPC status names an abort may use (every status but OK).
GRPC_STATUS_NAMES: Final = frozenset(_GRPC_STATUS_BY_CODE[1:])


class Injection(NamedTuple):
    """What to do to one call."""

    delay: float | None  # seconds to wait before the call goes upstream
    abort_status: int | None  # answer with this HTTP status (body "fault filter abort")
    grpc_status: str | None  # answer a gRPC call with this status name ("UNAVAILABLE")


class CallRecord(NamedTuple):
    """One call, as the mesh saw it."""

    host: str
    method: str
    path: str
    subset: str | None
    endpoint: str | None  # "127.0.0.1:8001"; None if never sent
    status: int | None  # what the caller got
    grpc_status: str | None
    attempts: int
    injected: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class FaultRule:
    """A fault for calls to ``host`` (the logical host; matched case-insensitively).

    Aborts: ``http_status`` (200-599) for HTTP calls, ``grpc_status`` (a status name such
    as ``"UNAVAILABLE"``) for gRPC calls; ``delay`` (seconds) before the call goes out;
    a rule may delay and abort. ``percent`` (0-100) of the matching calls get the fault;
    ``first=N`` limits the rule to the first N matching calls. Filters, all optional:
    ``method``; ``path_prefix`` (the path without the query string); ``headers``, exact
    values, names case-insensitive; ``subset``, the DestinationRule subset routing chose.

    Built with ``FaultRule("ratings", http_status=503)``; ``headers`` is then a tuple of
    ``(name, value)`` pairs, and ``FaultRule.of`` also takes a mapping.
    """

    host: str
    _: KW_ONLY
    http_status: int | None = None
    grpc_status: str | None = None
    delay: float | None = None
    percent: float = 100.0
    first: int | None = None
    method: str | None = None
    path_prefix: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    subset: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []

        def bad(field: str, message: str) -> None:
            problems.append(f"{field}\0{message}")

        host = self.host
        if not isinstance(host, str) or not host:
            bad("host", f"must be a non-empty host name, not {host!r}")
        else:
            name, colon, port = host.rpartition(":")
            if colon and port.isdigit() and ":" not in name:
                bad("host", f"is the logical host without a port: {name!r}, not {host!r}")
            object.__setattr__(self, "host", host.lower())
        if self.http_status is not None and not (
            _is_int(self.http_status) and 200 <= self.http_status <= 599
        ):
            bad("http_status", f"must be an HTTP status from 200 to 599, not {self.http_status!r}")
        if self.grpc_status is not None:
            status = self.grpc_status.upper() if isinstance(self.grpc_status, str) else None
            if status not in GRPC_STATUS_NAMES:
                bad(
                    "grpc_status",
                    f"must be a gRPC status name other than OK (such as 'UNAVAILABLE'), "
                    f"not {self.grpc_status!r}",
                )
            else:
                object.__setattr__(self, "grpc_status", status)
        if self.delay is not None:
            if not (_is_number(self.delay) and math.isfinite(self.delay) and self.delay >= 0):
                bad("delay", f"must be a number of seconds ≥ 0, not {self.delay!r}")
            else:
                object.__setattr__(self, "delay", float(self.delay))
        if self.http_status is None and self.grpc_status is None and self.delay is None:
            bad("", "a fault needs http_status, grpc_status or delay")
        if not (_is_number(self.percent) and 0 <= self.percent <= 100):
            bad("percent", f"must be a number from 0 to 100, not {self.percent!r}")
        else:
            object.__setattr__(self, "percent", float(self.percent))
        if self.first is not None and not (_is_int(self.first) and self.first >= 1):
            bad("first", f"must be a whole number ≥ 1, not {self.first!r}")
        if self.method is not None:
            if not isinstance(self.method, str) or not self.method:
                bad("method", f"must be an HTTP method name, not {self.method!r}")
            else:
                object.__setattr__(self, "method", self.method.upper())
        if self.path_prefix is not None and not (
            isinstance(self.path_prefix, str) and self.path_prefix.startswith("/")
        ):
            bad("path_prefix", f"must be a path starting with '/', not {self.path_prefix!r}")
        if self.subset is not None and not (isinstance(self.subset, str) and self.subset):
            bad("subset", f"must be a subset name, not {self.subset!r}")
        raw: Any = self.headers
        try:
            if isinstance(raw, Mapping):  # tolerated at run time; FaultRule.of is the typed way
                raw = raw.items()
            pairs = tuple((str(name).lower(), value) for name, value in raw)
        except (TypeError, ValueError):
            bad("headers", f"must be (name, value) pairs, not {self.headers!r}")
        else:
            for name, value in pairs:
                if not name or not isinstance(value, str):
                    bad(f"headers[{name!r}]", f"must be a header value string, not {value!r}")
            object.__setattr__(self, "headers", pairs)
        if problems:
            source = f"fault rule for {host!r}"
            raise ConfigError(
                [
                    Problem(source=source, line=None, path=path, message=message)
                    for path, _, message in (p.partition("\0") for p in problems)
                ]
            )

    @classmethod
    def of(
        cls, host: str, /, *, headers: Mapping[str, str] | None = None, **options: Any
    ) -> FaultRule:
        """A rule from the keywords the fixture and marker take (``headers`` a mapping)."""
        if isinstance(headers, Mapping):
            pairs = tuple(headers.items())
        elif headers is None:
            pairs = ()
        else:
            pairs = headers
        return cls(host, headers=pairs, **options)

    @property
    def applies_to_http(self) -> bool:
        return self.http_status is not None or self.grpc_status is None

    @property
    def applies_to_grpc(self) -> bool:
        return self.grpc_status is not None or self.http_status is None

    def filters_match(
        self,
        host: str,
        method: str,
        path: str,
        header: Callable[[str], str | None],
        subset: str | None,
    ) -> bool:
        """Whether a call passes this rule's host and filters (``host`` already lower-case)."""
        return (
            self.host == host
            and (self.method is None or self.method == method.upper())
            and (self.path_prefix is None or path.startswith(self.path_prefix))
            and (self.subset is None or self.subset == subset)
            and all(header(name) == value for name, value in self.headers)
        )

    def __str__(self) -> str:
        parts = [repr(self.host)]
        for name in ("http_status", "grpc_status", "delay"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.percent != 100:
            parts.append(f"percent={self.percent:g}")
        for name in ("first", "method", "path_prefix", "subset"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}")
        if self.headers:
            parts.append(f"headers={dict(self.headers)!r}")
        return f"fault({', '.join(parts)})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class InstalledFault:
    """A rule installed on an overlay: the handle ``add`` returns, to ``remove`` it later.

    ``matched`` counts the calls the rule decided (spared ones included), ``hits`` the
    calls it faulted; ``remaining`` is how many calls a ``first=N`` rule has left (None
    without ``first``).
    """

    __slots__ = (
        "_grpc",
        "_hits",
        "_http",
        "_installed",
        "_matched",
        "_remaining",
        "_rng",
        "number",
        "rule",
    )

    def __init__(self, rule: FaultRule, number: int, seed: int) -> None:
        self.rule = rule
        self.number = number
        self._rng = _rng(seed, number)
        self._remaining = rule.first
        self._matched = 0
        self._hits = 0
        self._installed = True
        self._http = Injection(rule.delay, rule.http_status, None) if rule.applies_to_http else None
        self._grpc = Injection(rule.delay, None, rule.grpc_status) if rule.applies_to_grpc else None

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def matched(self) -> int:
        return self._matched

    @property
    def remaining(self) -> int | None:
        return self._remaining

    @property
    def installed(self) -> bool:
        return self._installed

    def __repr__(self) -> str:
        state = "" if self._installed else " removed"
        return f"<InstalledFault #{self.number} {self.rule} hits={self._hits}{state}>"


def _rng(seed: int, number: int) -> random.Random:
    # A str seed is hashed with SHA-512 by random.seed: stable across runs and versions,
    # unlike hash() of a tuple.
    return random.Random(f"inmesh-fault:{seed}:{number}")


class FaultOverlay:
    """Faults and recorded calls shared by every Mesh of the process (see the module doc).

    The transports call ``match`` before a call goes out and ``record`` after it, both
    only when ``active`` is true.
    """

    def __init__(self, *, seed: int = 0) -> None:
        # Read on every request without the lock: a plain attribute, written under it.
        self.active = False
        self._recording = False
        self._lock = threading.Lock()
        self._faults: tuple[InstalledFault, ...] = ()
        self._calls: list[CallRecord] = []
        self._seed = seed
        self._next_number = 0

    # ------------------------------------------------------------------ the transports' side

    def match(
        self,
        *,
        host: str,
        method: str,
        path: str,
        header: Callable[[str], str | None],
        subset: str | None,
        grpc: bool = False,
    ) -> Injection | None:
        """The fault for this call, or None. ``grpc`` is True for gRPC calls.

        ``host`` is the logical host the caller addressed, ``path`` the path without the
        query, ``header`` looks a request header (or gRPC metadata) value up by name, and
        ``subset`` is the subset routing chose (None for none).
        """
        faults = self._faults
        if not faults:
            return None
        host = host.lower()
        for fault in faults:
            injection = fault._grpc if grpc else fault._http
            if injection is None or not fault.rule.filters_match(
                host, method, path, header, subset
            ):
                continue
            percent = fault.rule.percent
            with self._lock:
                if not fault._installed:
                    continue
                if fault._remaining is not None:
                    if fault._remaining == 0:
                        continue
                    fault._remaining -= 1
                fault._matched += 1
                hit = percent >= 100 or fault._rng.random() * 100 < percent
                if hit:
                    fault._hits += 1
            return injection if hit else None
        return None

    def record(self, call: CallRecord) -> None:
        """Keep ``call`` if recording is on."""
        if self._recording:
            with self._lock:
                if self._recording:
                    self._calls.append(call)

    # ------------------------------------------------------------------ the tests' side

    @property
    def recording(self) -> bool:
        return self._recording

    @recording.setter
    def recording(self, on: bool) -> None:
        with self._lock:
            self._recording = bool(on)
            self._refresh()

    @property
    def calls(self) -> list[CallRecord]:
        """The calls recorded so far, oldest first (a copy)."""
        with self._lock:
            return list(self._calls)

    @property
    def faults(self) -> tuple[InstalledFault, ...]:
        """The installed rules, in the order they are tried."""
        return self._faults

    def add(self, rule: FaultRule) -> InstalledFault:
        """Install ``rule`` after the rules already installed; return its handle."""
        if not isinstance(rule, FaultRule):
            raise TypeError(f"expected a FaultRule, not {type(rule).__name__}")
        with self._lock:
            fault = InstalledFault(rule, self._next_number, self._seed)
            self._next_number += 1
            self._faults = (*self._faults, fault)
            self._refresh()
        return fault

    def remove(self, fault: InstalledFault) -> None:
        """Uninstall one rule; removing a rule that is no longer installed does nothing."""
        with self._lock:
            fault._installed = False
            self._faults = tuple(f for f in self._faults if f is not fault)
            self._refresh()

    def clear(self) -> None:
        """Uninstall every rule (recording and recorded calls stay)."""
        with self._lock:
            for fault in self._faults:
                fault._installed = False
            self._faults = ()
            self._refresh()

    def forget_calls(self) -> None:
        """Drop the calls recorded so far."""
        with self._lock:
            self._calls.clear()

    def seed(self, seed: int) -> None:
        """Seed the draws: installed rules are renumbered 0, 1, ... and restart their draws.

        A rule installed later is numbered after them; numbering starts at 0 again only on
        ``seed`` and ``reset``.
        """
        if not _is_int(seed):
            raise TypeError(f"a seed is an int, not {type(seed).__name__}")
        with self._lock:
            self._seed = seed
            for number, fault in enumerate(self._faults):
                fault.number = number
                fault._rng = _rng(seed, number)
            self._next_number = len(self._faults)

    def reset(self) -> None:
        """Back to a new overlay's state, keeping the seed: no rules, no calls, not recording."""
        with self._lock:
            for fault in self._faults:
                fault._installed = False
            self._faults = ()
            self._calls.clear()
            self._recording = False
            self._next_number = 0
            self._refresh()

    def _refresh(self) -> None:  # under the lock
        self.active = bool(self._faults) or self._recording

    def __repr__(self) -> str:
        return (
            f"<FaultOverlay {len(self._faults)} rules recording={self._recording} "
            f"seed={self._seed}>"
        )


OVERLAY: Final = FaultOverlay()
"""The process-wide overlay every Mesh consults: a fault installed here applies everywhere."""


class MeshFaults:
    """The faults and recorded calls of one test: what the ``mesh_faults`` fixture gives.

    Outside pytest, use it as a context manager::

        with MeshFaults(seed=7) as faults:
            faults.abort("ratings", http_status=503)
            ...
            assert [c.status for c in faults.calls] == [503]

    Entering resets the overlay (no rules, no calls), seeds it and turns recording on;
    leaving resets it again, whatever happened.
    """

    def __init__(
        self, overlay: FaultOverlay = OVERLAY, *, seed: int = 0, record: bool = True
    ) -> None:
        self.overlay = overlay
        self._seed = seed
        self._record = record

    def start(self) -> MeshFaults:
        """Reset and seed the overlay, and start recording if asked to; return self."""
        self.overlay.reset()
        self.overlay.seed(self._seed)
        if self._record:
            self.overlay.recording = True
        return self

    def close(self) -> None:
        """Uninstall every rule, stop recording and drop the calls."""
        self.overlay.reset()

    def __enter__(self) -> MeshFaults:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ rules

    def abort(
        self,
        host: str,
        *,
        http_status: int | None = None,
        grpc_status: str | None = None,
        delay: float | None = None,
        percent: float = 100.0,
        first: int | None = None,
        method: str | None = None,
        path_prefix: str | None = None,
        headers: Mapping[str, str] | None = None,
        subset: str | None = None,
    ) -> InstalledFault:
        """Answer calls to ``host`` with ``http_status`` (HTTP) or ``grpc_status`` (gRPC)
        instead of sending them, after ``delay`` seconds if given."""
        if http_status is None and grpc_status is None:
            raise TypeError("abort() needs http_status or grpc_status (use delay() to delay)")
        return self.add(
            FaultRule.of(
                host,
                http_status=http_status,
                grpc_status=grpc_status,
                delay=delay,
                percent=percent,
                first=first,
                method=method,
                path_prefix=path_prefix,
                headers=headers,
                subset=subset,
            )
        )

    def delay(
        self,
        host: str,
        *,
        seconds: float,
        percent: float = 100.0,
        first: int | None = None,
        method: str | None = None,
        path_prefix: str | None = None,
        headers: Mapping[str, str] | None = None,
        subset: str | None = None,
    ) -> InstalledFault:
        """Hold calls to ``host`` for ``seconds`` before they go upstream (HTTP and gRPC)."""
        return self.add(
            FaultRule.of(
                host,
                delay=seconds,
                percent=percent,
                first=first,
                method=method,
                path_prefix=path_prefix,
                headers=headers,
                subset=subset,
            )
        )

    def add(self, rule: FaultRule) -> InstalledFault:
        """Install a rule after those already installed (the first match wins)."""
        return self.overlay.add(rule)

    def remove(self, fault: InstalledFault) -> None:
        """Uninstall one rule (the outage is over); a no-op if already removed."""
        self.overlay.remove(fault)

    def clear(self) -> None:
        """Uninstall every rule and drop the calls recorded so far; recording goes on."""
        self.overlay.clear()
        self.overlay.forget_calls()

    def seed(self, seed: int) -> None:
        """Reseed the ``percent`` draws (see ``FaultOverlay.seed``)."""
        self._seed = seed
        self.overlay.seed(seed)

    @property
    def rules(self) -> tuple[InstalledFault, ...]:
        """The installed rules, in the order they are tried."""
        return self.overlay.faults

    # ------------------------------------------------------------------ what happened

    @property
    def calls(self) -> list[CallRecord]:
        """The calls made through any Mesh since the test began, oldest first."""
        return self.overlay.calls

    def __repr__(self) -> str:
        return f"<MeshFaults {len(self.rules)} rules, {len(self.calls)} calls>"
