"""A raw configuration document: parsed YAML/JSON plus where each field came from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Document", "FieldPath"]

FieldPath = tuple[str | int, ...]
"""A path into a document: mapping keys and sequence indexes, e.g. ("spec", "http", 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    """One YAML document (one resource) as it stands in its source.

    ``lines`` maps a field path to the 1-based line of its value (for a mapping key:
    the line of the key), so a problem found while validating ``body`` can be reported
    as ``source:line path``. ``line`` is where the document starts.
    """

    source: str
    body: Any
    index: int = 0
    line: int | None = None
    # A factory, since dataclasses refuse an unhashable default such as a mappingproxy.
    lines: Mapping[FieldPath, int] = field(default_factory=lambda: MappingProxyType({}))

    def line_of(self, path: FieldPath) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        while path:
            found = self.lines.get(path)
            if found is not None:
                return found
            path = path[:-1]
        return self.line
