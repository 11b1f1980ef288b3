"""Reading one document's plain values field by field while collecting every problem.

The parser never raises on a bad field: it notes a ``Problem`` (located by field path and
line) and carries on with a placeholder, so that one run reports everything wrong with a
document. ``Reader`` is the whole mechanism: it wraps one mapping at one path, hands out
typed fields, remembers which keys it was asked about, and on ``done()`` names every key
nobody asked for: as not (yet) supported when the object's table says it is a real Istio
field, as unknown otherwise, with a "did you mean" when a known name is close.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Final

from inmesh.config.document import Document, FieldPath
from inmesh.exceptions import Problem

__all__ = ["NOT_YET", "Problems", "Reader", "range_problem", "render_path", "suggestion"]

NOT_YET: Final = "not supported by inmesh yet"

_NO_NOTES: Final[Mapping[str, str]] = MappingProxyType({})
_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9_\-/]+")


def render_path(path: FieldPath) -> str:
    """``("spec", "http", 0, "weight")`` as ``spec.http[0].weight`` (kubectl's form).

    A key that is not a plain name (a label such as ``app.kubernetes.io/name``) is written
    ``['app.kubernetes.io/name']``, the same form the YAML reader uses.
    """
    parts: list[str] = []
    for step in path:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        elif _PLAIN_KEY.fullmatch(step):
            parts.append(f".{step}" if parts else step)
        else:
            parts.append(f"[{step!r}]")
    return "".join(parts)


class Problems:
    """The problems found in one document, each with its source, line and field path."""

    __slots__ = ("document", "found")

    def __init__(self, document: Document) -> None:
        self.document = document
        self.found: list[Problem] = []

    def add(self, path: FieldPath, message: str) -> None:
        self.found.append(
            Problem(
                source=self.document.source,
                line=self.document.line_of(path),
                path=render_path(path),
                message=message,
            )
        )

    def __len__(self) -> int:
        return len(self.found)

    def in_line_order(self) -> list[Problem]:
        """Top to bottom as the file reads (stable: same-line problems keep their order)."""
        return sorted(self.found, key=lambda problem: problem.line or 0)


def suggestion(word: str, known: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    by_lower = {name.lower(): name for name in known}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


class Reader:
    """One mapping of a document, read field by field.

    Every getter takes the key, records it as known, and returns a typed value or
    ``None`` when the field is absent (YAML ``null`` counts as absent, as it does for
    Kubernetes) or wrong (the problem is then already noted). ``notes`` maps the Istio
    field names this object does not implement to the message that rejects them.
    """

    __slots__ = ("body", "known", "notes", "path", "problems")

    def __init__(
        self,
        problems: Problems,
        path: FieldPath,
        value: object,
        notes: Mapping[str, str] = _NO_NOTES,
    ) -> None:
        self.problems = problems
        self.path = path
        self.notes = notes
        self.known: set[str] = set()
        if isinstance(value, Mapping):
            self.body: Mapping[object, object] = value
        else:
            self.body = {}
            problems.add(path, "must be a mapping")

    # ------------------------------------------------------------------ basics

    def at(self, key: str | int) -> FieldPath:
        return (*self.path, key)

    def problem(self, key: str | None, message: str) -> None:
        """Note a problem with field ``key``, or with this mapping itself when ``key`` is None."""
        self.problems.add(self.path if key is None else self.at(key), message)

    def present(self, key: str) -> bool:
        """Whether ``key`` is set (not absent, not null), without claiming it as read."""
        return self.body.get(key) is not None

    def __bool__(self) -> bool:
        return bool(self.body)

    def raw(self, key: str, *, required: bool = False) -> object:
        self.known.add(key)
        value = self.body.get(key)
        if value is None and required:
            self.problem(key, "required")
        return value

    # ------------------------------------------------------------------ scalars

    def string(self, key: str, *, required: bool = False, non_empty: bool = False) -> str | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        if not isinstance(value, str):
            self.problem(key, "must be a string")
            return None
        if not value and (required or non_empty):
            self.problem(key, "must not be empty")
            return None
        return value

    def integer(
        self,
        key: str,
        *,
        required: bool = False,
        low: int | None = None,
        high: int | None = None,
    ) -> int | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        # bool is an int subclass in Python, but `weight: true` is not a number.
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, "must be an integer")
            return None
        problem = range_problem(value, low, high)
        if problem is not None:
            self.problem(key, problem)
            return None
        return value

    def number(
        self,
        key: str,
        *,
        required: bool = False,
        low: float | None = None,
        high: float | None = None,
    ) -> float | None:
        """An integer or a decimal (YAML writes ``50`` and ``50.0`` alike) as a float."""
        value = self.raw(key, required=required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, "must be a number")
            return None
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            self.problem(key, "must be a finite number")
            return None
        problem = range_problem(number, low, high)
        if problem is not None:
            self.problem(key, problem)
            return None
        return number

    def boolean(self, key: str) -> bool | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.problem(key, "must be a boolean")
            return None
        return value

    def choice(
        self,
        key: str,
        allowed: Collection[str],
        *,
        notes: Mapping[str, str] = _NO_NOTES,
    ) -> str | None:
        """An enum field: one of ``allowed``; a value in ``notes`` gets its own message."""
        value = self.string(key)
        if value is None:
            return None
        if value in notes:
            self.problem(key, f"{value}: {notes[value]}")
            return None
        if value not in allowed:
            listed = ", ".join(allowed)
            self.problem(
                key, f"{value!r} is not one of {listed}{suggestion(value, [*allowed, *notes])}"
            )
            return None
        return value

    # ------------------------------------------------------------------ collections

    def child(
        self, key: str, notes: Mapping[str, str] = _NO_NOTES, *, required: bool = False
    ) -> Reader | None:
        """The nested mapping at ``key`` as a Reader, or None when absent or not a mapping."""
        value = self.raw(key, required=required)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.problem(key, "must be a mapping")
            return None
        return Reader(self.problems, self.at(key), value, notes)

    def sequence(self, key: str, *, required: bool = False) -> list[tuple[FieldPath, object]]:
        """The items of the list at ``key`` with their paths; empty when absent or wrong."""
        value = self.raw(key, required=required)
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            self.problem(key, "must be a list")
            return []
        if required and not value:
            self.problem(key, "must not be empty")
        return [((*self.at(key), index), item) for index, item in enumerate(value)]

    def children(
        self, key: str, notes: Mapping[str, str] = _NO_NOTES, *, required: bool = False
    ) -> list[Reader]:
        """A list of mappings, each as a Reader (a non-mapping item is noted and skipped)."""
        readers: list[Reader] = []
        for path, item in self.sequence(key, required=required):
            if isinstance(item, Mapping):
                readers.append(Reader(self.problems, path, item, notes))
            else:
                self.problems.add(path, "must be a mapping")
        return readers

    def strings(self, key: str, *, required: bool = False) -> list[tuple[FieldPath, str]]:
        """A list of strings with their paths (a non-string item is noted and skipped)."""
        found: list[tuple[FieldPath, str]] = []
        for path, item in self.sequence(key, required=required):
            if isinstance(item, str):
                found.append((path, item))
            else:
                self.problems.add(path, "must be a string")
        return found

    def entries(self, key: str, *, required: bool = False) -> list[tuple[str, FieldPath, object]]:
        """A free-form mapping (labels, headers): its (name, path, value) entries."""
        value = self.raw(key, required=required)
        if value is None:
            return []
        if not isinstance(value, Mapping):
            self.problem(key, "must be a mapping")
            return []
        found: list[tuple[str, FieldPath, object]] = []
        for name, item in value.items():
            if not isinstance(name, str):
                self.problems.add((*self.at(key), str(name)), "a key must be a string")
                continue
            found.append((name, (*self.at(key), name), item))
        return found

    def string_map(self, key: str, *, required: bool = False) -> dict[str, tuple[FieldPath, str]]:
        """A free-form mapping of strings to strings: name → (path, value)."""
        found: dict[str, tuple[FieldPath, str]] = {}
        for name, path, item in self.entries(key, required=required):
            if isinstance(item, str):
                found[name] = (path, item)
            else:
                self.problems.add(path, "must be a string")
        return found

    # ------------------------------------------------------------------ the end

    def done(self) -> None:
        """Name every key that no getter asked for: unsupported or unknown."""
        for key in self.body:
            name = key if isinstance(key, str) else str(key)
            if name in self.known:
                continue
            if name in self.notes:
                self.problems.add(self.at(name), self.notes[name])
            else:
                hint = suggestion(name, self.known | set(self.notes))
                self.problems.add(self.at(name), f"unknown field {name!r}{hint}")


def range_problem(value: float, low: float | None, high: float | None) -> str | None:
    """The bound that ``value`` breaks, as a message; None when it is within both."""
    if low is not None and value < low:
        return f"must be ≥ {low}"
    if high is not None and value > high:
        return f"must be ≤ {high}"
    return None
