"""YAML (and JSON) text to ``Document``s, with the line of every field.

This module owns the step from text to plain Python values: it composes the text with
PyYAML (the libyaml-backed ``CSafeLoader`` when available) and builds the values from
the node tree itself, because only the nodes carry the marks that let a later problem
say ``mesh.d/reviews.yaml:14 spec.http[0].route[1].weight``. It does no file I/O.

What it adds to, or refuses of, what ``yaml.safe_load_all`` would do:

- a duplicate key in a mapping is a problem (Kubernetes rejects it; PyYAML keeps the last);
- mapping keys are always the key's text (``on:`` is ``"on"``, not ``True``), since a field
  path uses ``int`` only for list indexes and Kubernetes keys are strings;
- timestamps stay the text they were written as, so a body holds only
  dict/list/str/int/float/bool/None; other non-JSON tags (``!!binary``, ``!!set``,
  ``!!python/...``, custom ``!Tags``) are problems;
- an alias is expanded into a fresh copy (the body is a tree, never a shared or cyclic
  graph), with a budget so that a "billion laughs" text fails instead of eating memory;
- a JSON text (one ``json.loads`` accepts) has JSON's numbers (``1e-05`` is a float, not
  the string YAML 1.1 makes of it) and its escaped surrogate pairs become characters;
- after a syntax error, parsing resumes at the next ``---``, so one run reports the
  problems of every document; absurd nesting is refused before libyaml can crash on it.
"""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Final

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from inmesh.config._reader import render_path
from inmesh.config.document import Document, FieldPath
from inmesh.exceptions import ConfigError, Problem

__all__ = ["documents_from_text"]

_Base: type[yaml.SafeLoader] | type[yaml.CSafeLoader]
try:
    _Base = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml: same results, about 10× slower
    _Base = yaml.SafeLoader


class _Loader(_Base):  # type: ignore[valid-type,misc]  # a base chosen at import time
    """The safe loader, with plain-scalar tags resolved once per distinct text.

    PyYAML resolves each plain scalar by trying regexes in Python, which is most of the
    time spent composing a large file; configurations repeat their values (ports,
    labels, protocol names) so much that a per-text cache halves it. The safe loader has
    no path resolvers, so a plain scalar's tag depends on nothing but its text.

    With ``json_numbers``, a plain scalar in JSON's number grammar is a number even
    where YAML 1.1 would keep it text (``1e-05``, which JSON encoders write for small
    floats, has no dot, so PyYAML reads a string). Only valid JSON texts get this, where
    a plain scalar cannot be meant as text; in YAML, flow style included, such scalars
    stay text as PyYAML has it (``12e4567`` may well be a commit id).
    """

    def __init__(self, stream: str, *, json_numbers: bool = False) -> None:
        super().__init__(stream)
        self._plain_tags: dict[str, str] = {}
        self._json_numbers = json_numbers
        self.merges = False  # whether any '<<' was seen: mappings then take the slow path

    def resolve(self, kind: type[Node], value: Any, implicit: Any) -> str:
        # Only untagged nodes are resolved. With no path resolvers, a collection is a
        # plain map or seq and a quoted scalar a str, which is what PyYAML would answer.
        if kind is ScalarNode:
            if not implicit[0]:
                return _STR
            tag = self._plain_tags.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if tag == _MERGE:
                    self.merges = True
                elif tag == _STR and self._json_numbers and _JSON_NUMBER.fullmatch(value):
                    tag = _FLOAT
                self._plain_tags[value] = tag
            return tag
        if kind is MappingNode:
            return _MAP
        return _SEQ


_TAG: Final = "tag:yaml.org,2002:"
_STR: Final = _TAG + "str"
_MAP: Final = _TAG + "map"
_SEQ: Final = _TAG + "seq"
_MERGE: Final = _TAG + "merge"
_NULL: Final = _TAG + "null"
_FLOAT: Final = _TAG + "float"
_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")

# Values reached through aliases that a document may build before it is refused. Real
# configurations share a few blocks (a retry policy, a set of labels) a few dozen times;
# 10^5 is far above that and far below what hurts.
_ALIAS_BUDGET: Final = 100_000

# Only scalar construction is borrowed from PyYAML; it reads nothing but the node, so one
# shared instance is safe from any thread.
_SAFE: Final = SafeConstructor()


def _text(node: ScalarNode) -> Any:
    return node.value


def _null(_node: ScalarNode) -> Any:
    return None


def _bool(node: ScalarNode) -> Any:
    return _SAFE.construct_yaml_bool(node)


def _int(node: ScalarNode) -> Any:
    text: str = node.value
    if text.isdecimal() and text.isascii() and (text[0] != "0" or len(text) == 1):
        return int(text)  # the usual port or weight: skip the sign, base and ':' parsing
    return _SAFE.construct_yaml_int(node)


def _float(node: ScalarNode) -> Any:
    return _SAFE.construct_yaml_float(node)


_SCALARS: Final[dict[str, Callable[[ScalarNode], Any]]] = {
    _STR: _text,
    _NULL: _null,
    _TAG + "bool": _bool,
    _TAG + "int": _int,
    _FLOAT: _float,
    # JSON has no dates; Kubernetes would hand the text on, and so does inmesh.
    _TAG + "timestamp": _text,
    # ``=`` and ``<<`` written as values: SafeLoader has no constructor for these tags,
    # but as values they can only mean the characters themselves.
    _TAG + "value": _text,
    _MERGE: _text,
}


class _CollectorPause:
    """Keeps the cyclic garbage collector off while large texts are parsed.

    Parsing allocates a node, two marks and a value per scalar, all alive until the
    document is built, so the collector runs its full pass again and again over a growing
    heap: a third of the time of a 10,000-endpoint file. Nothing built here is cyclic, so
    there is nothing for it to find. Mercurial pauses it the same way around its
    manifest parser. Nested and concurrent parses share one pause (hence the counter),
    and the collector is switched back on only if it was on when the first one began.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._holders += 1

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._resume:
                gc.enable()


# The process has one collector, so its pause is the one piece of shared state here.
_PAUSE: Final = _CollectorPause()
_PAUSE_ABOVE: Final = 256 * 1024  # characters; a smaller text is parsed in a few ms anyway


class _Refused(Exception):
    """A document that cannot be built at all (alias bomb); its problem is already noted."""


def documents_from_text(text: str, source: str) -> list[Document]:
    """Parse a YAML or JSON text holding any number of documents (resources).

    Empty documents (a lone ``---``, only comments, an explicit ``null``) are skipped;
    ``index`` is the position of a document in the text counting every document, empty
    or not, so it names the same document as ``yq``'s ``documentIndex`` does.

    Raises ``ConfigError`` with every problem found in the text: syntax errors (after
    one, parsing resumes at the next ``---`` line to find more), duplicate keys,
    unsupported tags. No documents are returned from a text that has any problem.
    """
    if len(text) < _PAUSE_ABOVE:
        return _parse(text, source)
    with _PAUSE:
        return _parse(text, source)


def _parse(text: str, source: str) -> list[Document]:
    deep = _too_deep(text)
    if deep is not None:
        message = f"brackets nested more than {_MAX_FLOW_DEPTH} deep"
        raise ConfigError(
            [Problem(source=source, line=_line_at(text, deep), path="", message=message)]
        )
    json_numbers = _is_json(text)
    if json_numbers:
        text = _join_surrogates(text)
    problems: list[Problem] = []
    documents: list[Document] = []
    offset = 0  # the line (0-based) at which the part of the text being parsed starts
    part = text
    index = 0
    while True:
        # What yaml.compose_all does, keeping hold of the loader to ask it about merges.
        loader = _Loader(part, json_numbers=json_numbers)
        try:
            while loader.check_node():
                root = loader.get_node()
                if not _is_empty(root):
                    document = _document(
                        root,
                        source=source,
                        index=index,
                        offset=offset,
                        merges=loader.merges,
                        problems=problems,
                    )
                    if document is not None:
                        documents.append(document)
                index += 1
        except yaml.YAMLError as error:
            line = _error_line(error, text, offset)
            problems.append(Problem(source=source, line=line, path="", message=_message(error)))
            resume = _next_separator(text, after=max(line - 1 if line else 0, offset + 1))
            if resume is None:
                break
            offset, part = resume
            continue
        finally:
            loader.dispose()
        break
    if problems:
        raise ConfigError(problems)
    return documents


# libyaml's composer recurses in C for each level of nesting and overflows the stack (a
# segmentation fault, no exception) somewhere below 100,000 levels; only brackets can
# nest that deep in a text of sane size. The builder refuses ~450 levels anyway.
_MAX_FLOW_DEPTH: Final = 1_000
_FLOW: Final = re.compile(r"[\[\]{}]")


def _too_deep(text: str) -> int | None:
    """Where brackets first nest deeper than ``_MAX_FLOW_DEPTH``, if they do.

    Brackets inside quoted strings are counted too: a false alarm would need a thousand
    unclosed brackets in strings.
    """
    if text.count("[") + text.count("{") <= _MAX_FLOW_DEPTH:
        return None
    depth = 0
    for match in _FLOW.finditer(text):
        if match[0] in "[{":
            depth += 1
            if depth > _MAX_FLOW_DEPTH:
                return match.start()
        elif depth:
            depth -= 1
    return None


def _is_json(text: str) -> bool:
    """Whether the text is JSON (YAML in flow style may look like it, but read otherwise)."""
    text = text.lstrip(" \t\r\n\ufeff")
    if not text.startswith(("{", "[")):
        return False
    try:
        json.loads(text)  # C speed: a few ms for a megabyte, next to ~0.3 s for YAML
    except ValueError:
        return False
    return True


# An escaped UTF-16 surrogate pair, as json.dumps writes characters beyond the BMP (😀 is
# "\ud83d\ude00"), preceded by an even number of backslashes so the first is an escape.
# YAML has no such escapes (libyaml refuses them), so they are joined into the character.
_SURROGATE_PAIR: Final = re.compile(
    r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", re.IGNORECASE
)


def _join_surrogates(text: str) -> str:
    if "\\u" not in text:
        return text

    def join(match: re.Match[str]) -> str:
        high, low = int(match[2], 16), int(match[3], 16)
        return match[1] + chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))

    return _SURROGATE_PAIR.sub(join, text)


def _is_empty(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _document(
    root: Node, *, source: str, index: int, offset: int, merges: bool, problems: list[Problem]
) -> Document | None:
    builder = _Builder(source, offset, merges)
    try:
        body = builder.build(root, ())
    except _Refused:
        body = None
    except RecursionError:
        builder.problem(root, (), "the document is nested too deeply")
        body = None
    problems.extend(builder.problems)
    if builder.problems:
        return None
    return Document(
        source=source,
        body=body,
        index=index,
        line=root.start_mark.line + 1 + offset,
        lines=MappingProxyType(builder.lines),
    )


class _Builder:
    """Builds one document's values from its nodes, noting each field's line."""

    __slots__ = (
        "active",
        "expanded",
        "in_alias",
        "lines",
        "merges",
        "offset",
        "problems",
        "seen",
        "source",
    )

    def __init__(self, source: str, offset: int, merges: bool) -> None:
        self.source = source
        self.merges = merges
        self.offset = offset + 1  # marks are 0-based; lines are 1-based
        self.lines: dict[FieldPath, int] = {}
        self.problems: list[Problem] = []
        self.seen: set[int] = set()  # collection nodes built once: meeting one again is an alias
        self.active: set[int] = set()  # collection nodes being built: meeting one is a cycle
        self.in_alias = 0
        self.expanded = 0

    def problem(self, node: Node, path: FieldPath, message: str) -> None:
        self.problems.append(
            Problem(
                source=self.source,
                line=node.start_mark.line + self.offset,
                path=render_path(path),
                message=message,
            )
        )

    def build(self, node: Node, path: FieldPath) -> Any:
        if node.__class__ is ScalarNode:
            return self._scalar(node, path)
        key = id(node)
        if key in self.active:
            self.problem(node, path, "an alias refers to the node that contains it")
            return None
        alias = key in self.seen
        self.seen.add(key)
        if alias:
            self.in_alias += 1
        self.active.add(key)
        try:
            if self.in_alias:
                self.expanded += len(node.value)
                if self.expanded > _ALIAS_BUDGET:
                    self.problem(node, path, f"aliases expand to more than {_ALIAS_BUDGET} values")
                    raise _Refused
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path)
            raise AssertionError(f"unexpected YAML node {node!r}")  # pragma: no cover
        finally:
            self.active.discard(key)
            if alias:
                self.in_alias -= 1

    def _scalar(self, node: ScalarNode, path: FieldPath) -> Any:
        construct = _SCALARS.get(node.tag)
        if construct is None:
            self.problem(node, path, f"unsupported YAML tag {_short(node.tag)}")
            return None
        try:
            return construct(node)
        except (ValueError, yaml.YAMLError):
            self.problem(node, path, f"{node.value!r} is not a valid {_short(node.tag)}")
            return None

    # The two loops below inline the commonest case, a string scalar, because a large
    # registry is mostly that and a call per value is a third of the build time.

    def _sequence(self, node: SequenceNode, path: FieldPath) -> list[Any]:
        if node.tag != _SEQ:
            self.problem(node, path, f"unsupported YAML tag {_short(node.tag)}")
            return []
        result: list[Any] = []
        lines = self.lines
        offset = self.offset
        for position, item in enumerate(node.value):
            child = (*path, position)
            lines[child] = item.start_mark.line + offset
            if item.__class__ is ScalarNode and item.tag == _STR:
                result.append(item.value)
            else:
                result.append(self.build(item, child))
        return result

    def _mapping(self, node: MappingNode, path: FieldPath) -> dict[str, Any]:
        if node.tag != _MAP:
            self.problem(node, path, f"unsupported YAML tag {_short(node.tag)}")
            return {}
        pairs: list[tuple[Node, Node]] = node.value
        result: dict[str, Any] = {}
        own: set[str] | None = None  # this mapping's own keys, only needed with '<<'
        if self.merges and any(key_node.tag == _MERGE for key_node, _ in pairs):
            own = {key_node.value for key_node, _ in pairs if key_node.tag != _MERGE}
            # PyYAML's order: merged keys first, then the mapping's own, which win.
            merges = [value_node for key_node, value_node in pairs if key_node.tag == _MERGE]
            result = self._merged(merges, path, own)
            own = set()
        lines = self.lines
        offset = self.offset
        for key_node, value_node in pairs:
            if key_node.__class__ is not ScalarNode:
                self.problem(key_node, path, "a mapping key must be a plain value")
                continue
            name: str = key_node.value
            if own is not None:
                if key_node.tag == _MERGE:
                    continue
                duplicate = name in own
                own.add(name)
            else:
                duplicate = name in result
            line = key_node.start_mark.line + offset
            child = (*path, name)
            if duplicate:
                self.problems.append(
                    Problem(
                        source=self.source,
                        line=line,
                        path=render_path(child),
                        message=f"duplicate key (first at line {lines[child]})",
                    )
                )
                continue
            lines[child] = line
            if value_node.__class__ is ScalarNode and value_node.tag == _STR:
                result[name] = value_node.value
            else:
                result[name] = self.build(value_node, child)
        return result

    def _merged(self, merges: list[Node], path: FieldPath, own: set[str]) -> dict[str, Any]:
        """The keys that ``<<`` brings in: the first source of a key wins, own keys win over all."""
        sources: list[Node] = []
        for merge in merges:
            if isinstance(merge, SequenceNode):
                sources.extend(merge.value)
            else:
                sources.append(merge)
        result: dict[str, Any] = {}
        depth = len(path)
        for source in sources:
            if not isinstance(source, MappingNode):
                self.problem(source, path, "'<<' takes a mapping or a list of mappings")
                continue
            # Built aside, so that the lines of keys this mapping overrides are not kept.
            outer = self.lines
            self.lines = {}
            try:
                values = self.build(source, path)
            finally:
                inner, self.lines = self.lines, outer
            if not isinstance(values, dict):  # a cycle, already a problem
                continue
            taken = {key for key in values if key not in own and key not in result}
            for key in taken:
                result[key] = values[key]
            for field_path, line in inner.items():
                if field_path[depth] in taken:
                    outer[field_path] = line
        return result


def _short(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


def _error_line(error: yaml.YAMLError, text: str, offset: int) -> int | None:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1 + offset
    character = getattr(error, "character", None)
    if isinstance(character, int):
        # A reader error gives a position whose unit depends on the loader (characters or
        # UTF-8 bytes), but the offending character itself is unambiguous.
        found = text.find(chr(character))
        if found >= 0:
            return _line_at(text, found)
    return None


def _line_at(text: str, position: int) -> int:
    """The 1-based line, counted as YAML counts lines, of a position in the text."""
    return len(_LINE_BREAK.findall(text, 0, position)) + 1


def _message(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        message = error.problem or error.context or "invalid YAML"
        if error.problem and error.context:
            context_mark, problem_mark = error.context_mark, error.problem_mark
            if (
                context_mark is not None
                and problem_mark is not None
                and context_mark.line != problem_mark.line
            ):
                return f"{message} ({error.context} started at line {context_mark.line + 1})"
            return f"{message} ({error.context})"
        return str(message)
    if isinstance(error, yaml.reader.ReaderError):
        return f"unacceptable character #x{error.character:04x}: {error.reason}"
    return str(error).splitlines()[0]


# YAML 1.1 counts NEL and the Unicode line and paragraph separators as line breaks (and
# so do libyaml's marks); str.splitlines() would also count \v and \f, which YAML does not.
_LINE_BREAK: Final = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
_SEPARATOR: Final = re.compile(r"---(?:[ \t]|$)")


def _next_separator(text: str, after: int) -> tuple[int, str] | None:
    """The first ``---`` line at or after line ``after`` (0-based) and the text from it."""
    line = 0
    start = 0
    for match in _LINE_BREAK.finditer(text):
        if line >= after and _SEPARATOR.match(text, start, match.start()):
            return line, text[start:]
        line += 1
        start = match.end()
    if line >= after and _SEPARATOR.match(text, start):
        return line, text[start:]
    return None
