"""What every registry is: a source of documents that can say when they changed.

A registry only reads and watches; validating the documents, compiling them and keeping
the last good configuration when a new one fails is the Mesh's job. To miss no change,
call ``watch()`` before the first ``read()``: a registry's ``watch()`` returns once its
watch is in force.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

from inmesh.config.document import Document

__all__ = ["Listeners", "Registry"]

logger = logging.getLogger("inmesh.registry")


class Registry(abc.ABC):
    """A source of configuration documents: a file or folder, etcd, memory, ..."""

    name: str
    """What to call this source in logs and status: the path, ``"memory"``, ..."""

    @abc.abstractmethod
    def read(self) -> list[Document]:
        """Every document the source holds now, ordered by source name, then index.

        Raises ``ConfigError`` with every syntax problem of every part of the source, or
        ``RegistryError`` if the source cannot be read at all.
        """

    @abc.abstractmethod
    def watch(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change()`` after every change to the source, from now on.

        It may be called from any thread, and one call may stand for several changes.
        Several listeners may be registered; each is called for each change.
        """

    def unwatch(self, on_change: Callable[[], None]) -> None:  # noqa: B027  # optional: see below
        """Stop calling ``on_change`` (one registration of it), e.g. when a Mesh closes.

        This default does nothing: a registry that cannot forget a listener keeps calling
        it, which is harmless to a listener that ignores calls once it is done (as a
        closed Mesh does). The file and memory registries do forget it.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop watching (and wait for the watcher to end). Closing twice is harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Listeners:
    """The ``on_change`` callbacks of one registry, for registry implementations.

    A listener that raises is logged and the others are still called: one broken
    listener must not stop the changes reaching the rest, nor kill a watcher thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: tuple[Callable[[], None], ...] = ()

    def add(self, callback: Callable[[], None]) -> None:
        """Register ``callback``."""
        with self._lock:
            self._callbacks = (*self._callbacks, callback)

    def remove(self, callback: Callable[[], None]) -> None:
        """Forget ``callback`` (one registration of it); unknown callbacks are ignored."""
        with self._lock:
            callbacks = list(self._callbacks)
            if callback in callbacks:
                callbacks.remove(callback)
                self._callbacks = tuple(callbacks)

    def clear(self) -> None:
        """Forget every callback."""
        with self._lock:
            self._callbacks = ()

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def notify(self, registry_name: str) -> None:
        """Call every callback once, outside the lock (a callback may well read or watch)."""
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                logger.exception("a change listener of registry %s failed", registry_name)
