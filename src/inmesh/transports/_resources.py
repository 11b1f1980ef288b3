"""Per-endpoint resources (httpcore pools, grpcio channels) with retirement, and the
bound on mirrored requests in flight: the bookkeeping both adapters share.

Each endpoint gets its own resource, so one slow endpoint cannot take what another
needs. When an endpoint leaves the registry its resource is retired: no new calls get
it, and it is closed once its last call ends. Closing (I/O) is the caller's, after the
bookkeeping is done.

Theory of operation. Every call takes and gives back its endpoint's resource, so that
pair is lock-free: the resource is found by a dict read and its calls are counted as the
length of a list (``append``/``pop``, each atomic, as in ``EndpointStats``). Only the
rare events lock: creating a resource, retiring one, and deciding to close one, which
happens exactly once, under the lock, marked by ``closed``. The order of the lock-free
steps makes that decision safe: ``acquire`` counts the call *before* it looks at
``retired``, and ``retire`` sets ``retired`` *before* it looks at the count, so one of
the two always sees the other. A call that finds its resource retired keeps it if it is
not closed yet (its own count holds it open; its ``release`` will close it), and
otherwise takes the locked path to a fresh one. The argument needs the two threads' steps
to be seen in program order, as they are under the GIL. A free-threaded build gives each
list operation its own lock but documents no such order for a plain ``len()`` after an
attribute store; there, a reordering could hand a call a departed endpoint's resource as
it closes (the call then fails as on a closed channel), or leave one open until the
client closes. grpcio itself does not support those builds yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from inmesh.endpoints import EndpointKey

if TYPE_CHECKING:
    from inmesh.state import MeshState

__all__ = ["EndpointResources", "Entry", "MirrorGate"]

K = TypeVar("K")
R = TypeVar("R")


class Entry(Generic[R]):
    """One endpoint's resource, its calls in flight, and a cache its user may fill."""

    __slots__ = ("cache", "calls", "closed", "resource", "retired")

    def __init__(self, resource: R) -> None:
        self.resource = resource
        self.calls: list[None] = []  # one item per call in flight
        self.retired = False
        self.closed = False  # decided under the lock, once
        self.cache: dict[Any, Any] = {}

    @property
    def active(self) -> int:
        """Calls in flight."""
        return len(self.calls)


class EndpointResources(Generic[K, R]):
    """Resources by key; ``endpoint_of(key)`` names the endpoint a key belongs to (None:
    never retired, e.g. passthrough)."""

    def __init__(
        self, factory: Callable[[K], R], endpoint_of: Callable[[K], EndpointKey | None]
    ) -> None:
        self._factory = factory
        self._endpoint_of = endpoint_of
        self.entries: dict[K, Entry[R]] = {}
        self._lock = threading.Lock()
        self.version = -1

    def acquire(self, key: K) -> Entry[R]:
        """The resource for ``key``, counted in use until ``release``."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.calls.append(None)  # count first, then look (see the module docstring)
            if not entry.retired or self._keep_retired(entry):
                return entry
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = Entry(self._factory(key))
            entry.calls.append(None)  # under the lock: ``retire`` cannot be midway
            return entry

    def _keep_retired(self, entry: Entry[R]) -> bool:
        """A counted call found ``entry`` retired: keep it unless it is closed already
        (then take the count back: the call gets a fresh resource)."""
        with self._lock:
            if not entry.closed:
                return True
            entry.calls.pop()
            return False

    def release(self, entry: Entry[R]) -> bool:
        """Count a call ended; True if the resource is now retired and idle (close it)."""
        entry.calls.pop()
        if not entry.retired or entry.calls:
            return False
        with self._lock:
            if entry.closed or entry.calls:
                return False
            entry.closed = True
            return True

    def retire(self, keep: frozenset[EndpointKey], version: int) -> list[R]:
        """Retire the resources of endpoints not in ``keep`` (once per snapshot version);
        return those idle now, to be closed."""
        with self._lock:
            if version <= self.version:
                return []
            self.version = version
            idle = []
            for key, entry in list(self.entries.items()):
                endpoint = self._endpoint_of(key)
                if endpoint is not None and endpoint not in keep:
                    del self.entries[key]
                    entry.retired = True  # set first, then look at the count
                    if not entry.calls:
                        entry.closed = True
                        idle.append(entry.resource)
            return idle

    def drain(self) -> list[R]:
        """Retire everything (closing time); return every resource, to be closed."""
        with self._lock:
            resources = [e.resource for e in self.entries.values()]
            for entry in self.entries.values():
                entry.retired = entry.closed = True
            self.entries.clear()
            return resources

    def __len__(self) -> int:
        return len(self.entries)


class MirrorGate:
    """The bound on mirrored requests in flight, shared by the HTTP and gRPC adapters:
    a copy beyond ``limit`` is dropped, and both outcomes are counted in ``MeshState``."""

    def __init__(self, state: MeshState) -> None:
        self._state = state
        self.lock = threading.Lock()
        self.in_flight = 0

    def admit(self, limit: int, *, replayable: bool = True) -> bool:
        """Room for one more copy? (A body that cannot be sent twice cannot be copied.)"""
        with self.lock:
            if replayable and self.in_flight < limit:
                self.in_flight += 1
                self._state.mirrors_sent += 1
                return True
            self._state.mirrors_dropped += 1
            return False

    def done(self, *, sent: bool = True) -> None:
        """A copy ended; ``sent=False``: it was admitted but never went out (count a drop)."""
        with self.lock:
            self.in_flight -= 1
            if not sent:
                self._state.mirrors_sent -= 1
                self._state.mirrors_dropped += 1
