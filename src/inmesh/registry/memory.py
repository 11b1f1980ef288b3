"""A registry held in memory: named sources of YAML text or of already-parsed resources.

For tests and for programs that build their configuration themselves. Every change
calls the listeners synchronously, in the thread that made it, after the change is in
place, so a test can ``put()`` and then assert on the Mesh straight away.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from inmesh.config.document import Document
from inmesh.config.yaml import documents_from_text
from inmesh.exceptions import ConfigError, Problem, RegistryError
from inmesh.registry.base import Listeners, Registry

__all__ = ["Content", "MemoryRegistry"]

Content: TypeAlias = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""YAML text (any number of documents), one parsed resource, or a sequence of them."""

_Parsed: TypeAlias = tuple[Document, ...] | ConfigError


class MemoryRegistry(Registry):
    """Sources by name, each YAML text or parsed resources; thread-safe.

    Parsed resources (mappings) are copied into plain dicts and lists when put, so
    later changes to the caller's objects do not leak in; their documents have no line
    numbers. Text is parsed when read (so bad text is reported by ``read()``, as a file
    registry would), once per ``put()``.
    """

    def __init__(self, initial: Mapping[str, Content] | None = None) -> None:
        self.name = "memory"
        self._lock = threading.Lock()
        self._sources: dict[str, str | tuple[Document, ...]] = {}
        self._parsed: dict[str, _Parsed] = {}  # text sources already read
        self._listeners = Listeners()
        self._closed = False
        for name, content in (initial or {}).items():
            self._sources[name] = _stored(name, content)

    def put(self, name: str, content: Content) -> None:
        """Add or replace source ``name``, then call the listeners."""
        stored = _stored(name, content)
        with self._lock:
            self._sources[name] = stored
            self._parsed.pop(name, None)
        self._listeners.notify(self.name)

    def remove(self, name: str) -> None:
        """Remove source ``name``, then call the listeners; ``KeyError`` if there is none."""
        with self._lock:
            if name not in self._sources:
                raise KeyError(name)
            del self._sources[name]
            self._parsed.pop(name, None)
        self._listeners.notify(self.name)

    def clear(self) -> None:
        """Remove every source, then call the listeners."""
        with self._lock:
            self._sources.clear()
            self._parsed.clear()
        self._listeners.notify(self.name)

    def names(self) -> list[str]:
        """The names of the sources, sorted."""
        with self._lock:
            return sorted(self._sources)

    def read(self) -> list[Document]:
        """Every document, by source name then index; ``ConfigError`` for bad text."""
        with self._lock:
            sources = sorted(self._sources.items())
            parsed = dict(self._parsed)
        documents: list[Document] = []
        problems: list[Problem] = []
        for name, source in sources:
            if isinstance(source, tuple):
                documents.extend(source)
                continue
            result = parsed.get(name)
            if result is None:
                # Parsed outside the lock: a large text must not block put() meanwhile.
                try:
                    result = tuple(documents_from_text(source, name))
                except ConfigError as error:
                    result = error
                with self._lock:
                    if self._sources.get(name) is source:
                        self._parsed[name] = result
            if isinstance(result, ConfigError):
                problems.extend(result.problems)
            else:
                documents.extend(result)
        if problems:
            raise ConfigError(problems)
        return documents

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change()`` after every ``put``, ``remove`` and ``clear``."""
        if self._closed:
            raise RegistryError(f"registry {self.name} is closed")
        self._listeners.add(on_change)

    def unwatch(self, on_change: Callable[[], None]) -> None:
        """Stop calling ``on_change``."""
        self._listeners.remove(on_change)

    def close(self) -> None:
        """Forget the listeners; the sources stay readable."""
        self._closed = True
        self._listeners.clear()


def _stored(name: str, content: Content) -> str | tuple[Document, ...]:
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        content = [content]
    if not isinstance(content, Sequence):
        raise TypeError(
            f"source {name!r}: expected YAML text or resources (mappings), "
            f"got {type(content).__name__}"
        )
    documents: list[Document] = []
    for index, resource in enumerate(content):
        if not isinstance(resource, Mapping):
            raise TypeError(
                f"source {name!r}: resource {index} is a {type(resource).__name__}, not a mapping"
            )
        body = _plain(resource, f"{name}[{index}]")
        documents.append(Document(source=name, body=body, index=index))
    return tuple(documents)


def _plain(value: Any, where: str) -> Any:
    """``value`` as a tree of fresh dicts, lists and scalars, as parsed YAML would be."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            result[key] = _plain(item, f"{where}.{key}")
        return result
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_plain(item, f"{where}[{position}]") for position, item in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not a YAML value")
