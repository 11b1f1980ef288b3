"""Per-endpoint resources (httpcore pools, grpcio channels) with retirement, and the
bound on mirrored requests in flight: the bookkeeping both adapters share.

Each endpoint gets its own resource, so one slow endpoint cannot take what another
needs. When an endpoint leaves the registry its resource is retired: no new calls get
it, and it is closed once its last call ends. The bookkeeping runs under a lock; closing
(I/O) is the caller's, after the lock is released.
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

    __slots__ = ("active", "cache", "resource", "retired")

    def __init__(self, resource: R) -> None:
        self.resource = resource
        self.active = 0
        self.retired = False
        self.cache: dict[Any, Any] = {}


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
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = Entry(self._factory(key))
            entry.active += 1
            return entry

    def release(self, entry: Entry[R]) -> bool:
        """Count a call ended; True if the resource is now retired and idle (close it)."""
        with self._lock:
            entry.active -= 1
            return entry.retired and entry.active == 0

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
                    entry.retired = True
                    if entry.active == 0:
                        idle.append(entry.resource)
            return idle

    def drain(self) -> list[R]:
        """Retire everything (closing time); return every resource, to be closed."""
        with self._lock:
            resources = [e.resource for e in self.entries.values()]
            for entry in self.entries.values():
                entry.retired = True
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
