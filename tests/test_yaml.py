"""YAML and JSON text to Documents: values, the line of every field, and every refusal."""

from __future__ import annotations

import json
import math
import re
import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from inmesh.config.document import Document, FieldPath
from inmesh.config.yaml import documents_from_text
from inmesh.exceptions import ConfigError, Problem


def parse(text: str, source: str = "mesh.yaml") -> list[Document]:
    return documents_from_text(textwrap.dedent(text), source)


def problems(text: str, source: str = "mesh.yaml") -> tuple[Problem, ...]:
    with pytest.raises(ConfigError) as caught:
        documents_from_text(textwrap.dedent(text), source)
    return caught.value.problems


VIRTUAL_SERVICE = """\
# reviews routing
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
      weight: 10
    - destination:
        host: reviews
        subset: v3
      weight: 90
"""


def test_lines_of_nested_keys_and_list_items() -> None:
    """Every field path maps to its line: a key's own line, a list item's first line."""
    (document,) = parse(VIRTUAL_SERVICE)
    lines = document.lines
    assert lines[("apiVersion",)] == 2
    assert lines[("metadata", "name")] == 5
    assert lines[("spec", "hosts")] == 7
    assert lines[("spec", "hosts", 0)] == 7
    assert lines[("spec", "http", 0)] == 9
    assert lines[("spec", "http", 0, "match", 0, "headers", "end-user", "exact")] == 11
    assert lines[("spec", "http", 0, "route")] == 12
    assert lines[("spec", "http", 0, "route", 0, "destination", "subset")] == 13
    assert lines[("spec", "http", 0, "route", 0, "weight")] == 14
    assert lines[("spec", "http", 0, "route", 1)] == 15
    assert lines[("spec", "http", 0, "route", 1, "destination", "subset")] == 17
    assert lines[("spec", "http", 0, "route", 1, "weight")] == 18
    assert document.body["spec"]["http"][0]["route"][1] == {
        "destination": {"host": "reviews", "subset": "v3"},
        "weight": 90,
    }


def test_document_line_and_nearest_ancestor() -> None:
    """A document starts at its first content line; line_of falls back to an ancestor."""
    (document,) = parse(VIRTUAL_SERVICE)
    assert document.line == 2
    assert document.source == "mesh.yaml"
    assert document.line_of(("spec", "http", 0, "route", 1, "mirror")) == 15
    assert document.line_of(()) == 2


def test_every_path_of_the_body_has_a_line() -> None:
    """No field of the body is without a line, however deep."""
    (document,) = parse(VIRTUAL_SERVICE)
    assert set(_paths(document.body)) == set(document.lines)


def test_multi_document_indexes_and_lines() -> None:
    """Documents keep their position in the text, counting the empty ones skipped."""
    documents = parse(
        """\
        ---
        kind: A
        ---
        # nothing but a comment
        ---
        kind: B
        ---
        ---
        kind: C
        ...
        ---
        null
        """
    )
    assert [(d.body, d.index, d.line) for d in documents] == [
        ({"kind": "A"}, 0, 2),
        ({"kind": "B"}, 2, 6),
        ({"kind": "C"}, 4, 9),
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "---\n---\n...\n"])
def test_texts_without_documents(text: str) -> None:
    """Empty texts, comments and lone separators give no documents, and no error."""
    assert documents_from_text(text, "empty.yaml") == []


def test_scalars_resolve_as_pyyaml_does() -> None:
    """Ints, floats, bools, nulls and strings follow PyYAML's safe loader (YAML 1.1)."""
    (document,) = parse(
        """\
        int: 1
        octal: 010
        hex: 0x1f
        big: 1_000_000
        negative: -7
        float: 1.5
        exponent: 1.0e+3
        not_a_number: 1e3
        infinity: .inf
        bool: true
        yes: yes
        off: off
        null: ~
        empty:
        quoted: "1"
        single: 'true'
        text: hello world
        version: 1.10
        """
    )
    assert document.body == {
        "int": 1,
        "octal": 8,
        "hex": 31,
        "big": 1_000_000,
        "negative": -7,
        "float": 1.5,
        "exponent": 1000.0,
        "not_a_number": "1e3",
        "infinity": math.inf,
        "bool": True,
        "yes": True,
        "off": False,
        "null": None,
        "empty": None,
        "quoted": "1",
        "single": "true",
        "text": "hello world",
        "version": 1.1,
    }
    assert all(isinstance(key, str) for key in document.body)


def test_timestamps_stay_text() -> None:
    """A date is kept as written: bodies hold only JSON's kinds of values."""
    (document,) = parse("created: 2024-01-31\nat: 2024-01-31T10:00:00Z\n")
    assert document.body == {"created": "2024-01-31", "at": "2024-01-31T10:00:00Z"}


def test_duplicate_keys_are_problems() -> None:
    """A repeated key is reported where it repeats, naming the first occurrence."""
    found = problems(
        """\
        kind: VirtualService
        spec:
          hosts: [a]
          http: []
          hosts: [b]
        kind: DestinationRule
        """
    )
    assert [str(problem) for problem in found] == [
        "mesh.yaml:5 spec.hosts: duplicate key (first at line 3)",
        "mesh.yaml:6 kind: duplicate key (first at line 1)",
    ]


def test_duplicate_keys_in_flow_mappings_and_every_document() -> None:
    """Duplicates are found in flow style too, in every document of the text."""
    found = problems(
        """\
        labels: {app: a, app: b}
        ---
        ok: 1
        ---
        list:
        - {x: 1, y: 2, x: 3}
        """
    )
    assert [(p.line, p.path) for p in found] == [(1, "labels.app"), (6, "list[0].x")]


def test_syntax_error_with_line() -> None:
    """A syntax error raises ConfigError (a ValueError) with the line and a short message."""
    with pytest.raises(ValueError, match="mapping values are not allowed") as caught:
        documents_from_text("kind: A\nspec:\n  hosts: a: b\n", "bad.yaml")
    assert isinstance(caught.value, ConfigError)
    (problem,) = caught.value.problems
    assert (problem.source, problem.line, problem.path) == ("bad.yaml", 3, "")
    assert str(problem).startswith("bad.yaml:3: ")


def test_unclosed_flow_reports_where_it_began() -> None:
    """An unclosed bracket is reported where parsing failed and says where it started."""
    (problem,) = problems("kind: A\nhosts: [a, b\nport: 80\n")
    assert problem.line == 3
    assert "started at line 2" in problem.message


def test_problems_of_every_document_are_collected() -> None:
    """After a syntax error parsing resumes at the next '---', so later problems show too."""
    found = problems(
        """\
        kind: A
        bad: [1, 2
        ---
        kind: B
        spec: {a: 1, a: 2}
        ---
        kind: C
        x: "unterminated
        ---
        kind: D
        """
    )
    assert [p.line for p in found] == [3, 5, 9]
    assert found[1].path == "spec.a"


def test_unsafe_and_unknown_tags_are_refused() -> None:
    """Python tags are never constructed; other non-JSON tags are problems too."""
    found = problems(
        """\
        a: !!python/object/apply:os.system ["echo hacked"]
        b: !!binary aGVsbG8=
        c: !custom value
        d: !!set {x: null}
        e: !!int twelve
        """
    )
    assert [(p.line, p.path) for p in found] == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")]
    assert "!!python/object/apply:os.system" in found[0].message


def test_explicit_standard_tags() -> None:
    """Explicit standard tags work as in PyYAML: !!str keeps text, !!float converts."""
    (document,) = parse('a: !!str 1\nb: !!float "2"\nc: !!map {x: 1}\nd: !!seq [1]\n')
    assert document.body == {"a": "1", "b": 2.0, "c": {"x": 1}, "d": [1]}


def test_keys_are_their_text() -> None:
    """Keys that YAML 1.1 would read as bools or numbers stay strings as written."""
    (document,) = parse("on: 1\n8080: http\nnull: x\n")
    assert document.body == {"on": 1, "8080": "http", "null": "x"}


def test_complex_keys_are_refused() -> None:
    """A mapping or list used as a key cannot become a field name."""
    (problem,) = problems("? [a, b]\n: value\n")
    assert "key" in problem.message


def test_json_text() -> None:
    """JSON goes through the same parser, lines included, minified or not."""
    resource = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
    }
    (minified,) = documents_from_text(json.dumps(resource, separators=(",", ":")), "dr.json")
    assert minified.body == resource
    assert minified.lines[("spec", "subsets", 0, "labels", "version")] == 1
    (pretty,) = documents_from_text(json.dumps(resource, indent=2), "dr.json")
    assert pretty.body == resource
    assert pretty.lines[("spec", "subsets", 0, "labels", "version")] == 10
    assert pretty.line == 1


def test_json_numbers_and_escapes() -> None:
    """JSON's numbers are numbers (1e-05 too) and its escaped astral characters are read."""
    text = json.dumps({"small": 1e-05, "big": 1e21, "exp": 2.5e-8, "int": -3, "emoji": "😀/é"})
    assert "\\ud83d\\ude00" in text  # how json.dumps writes the emoji
    (document,) = documents_from_text(text, "numbers.json")
    assert document.body == {"small": 1e-05, "big": 1e21, "exp": 2.5e-8, "int": -3, "emoji": "😀/é"}
    (escaped,) = documents_from_text(r'{"a": "\\ud83d"}', "x.json")
    assert escaped.body == {"a": "\\ud83d"}


def test_json_duplicate_keys_are_problems() -> None:
    """JSON allows repeated keys; Kubernetes, and so inmesh, does not."""
    (problem,) = problems('{"kind": "A",\n "kind": "B"}', "x.json")
    assert (problem.source, problem.line, problem.path) == ("x.json", 2, "kind")


def test_aliases_are_fresh_copies_with_the_anchor_lines() -> None:
    """An alias gives its own copy of the anchored value; its lines are the anchor's."""
    (document,) = parse(
        """\
        retries: &retries
          attempts: 3
          retryOn: [5xx]
        http:
        - retries: *retries
        - retries: *retries
        """
    )
    first, second = (route["retries"] for route in document.body["http"])
    assert first == second == {"attempts": 3, "retryOn": ["5xx"]}
    assert first is not second
    assert first["retryOn"] is not second["retryOn"]
    assert document.lines[("http", 1, "retries")] == 6
    assert document.lines[("http", 1, "retries", "attempts")] == 2
    assert document.lines[("http", 1, "retries", "retryOn", 0)] == 3


def test_merge_keys() -> None:
    """'<<' merges: own keys win, then earlier sources; merged lines point at the source."""
    (document,) = parse(
        """\
        base: &base {timeout: 1s, retries: {attempts: 3}}
        extra: &extra {timeout: 9s, mirror: m}
        route:
          <<: [*base, *extra]
          retries: 2
        """
    )
    route = document.body["route"]
    assert route == {"timeout": "1s", "retries": 2, "mirror": "m"}
    assert document.lines[("route", "timeout")] == 1
    assert document.lines[("route", "mirror")] == 2
    assert document.lines[("route", "retries")] == 5
    # Nothing is left behind from the overridden mapping.
    assert ("route", "retries", "attempts") not in document.lines
    assert set(_paths(document.body)) == set(document.lines)


def test_merge_key_beside_a_duplicate() -> None:
    """Keys brought in by '<<' are not duplicates of the mapping's own keys."""
    (document,) = parse("a: &a {x: 1}\nb: {<<: *a, x: 2}\n")
    assert document.body["b"] == {"x": 2}


def test_recursive_alias_is_refused() -> None:
    """A node that contains an alias to itself cannot become a tree."""
    (problem,) = problems("a: &loop [1, *loop]\n")
    assert (problem.line, problem.path) == (1, "a[1]")


def test_alias_bomb_is_refused() -> None:
    """Aliases that would expand to billions of values fail fast instead of eating memory."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        previous = chr(ord("a") + level - 1)
        name = chr(ord("a") + level)
        levels.append(f"{name}: &{name} [{', '.join(['*' + previous] * 10)}]")
    (problem,) = problems("\n".join(levels) + "\n")
    assert "aliases expand" in problem.message


def test_undefined_alias_is_a_problem() -> None:
    """An alias to no anchor is reported with its line."""
    (problem,) = problems("a: 1\nb: *nowhere\n")
    assert problem.line == 2
    assert "alias" in problem.message


def test_windows_line_endings() -> None:
    """CRLF texts get the same lines as LF texts."""
    (document,) = documents_from_text("a: 1\r\nb:\r\n  - x\r\n", "crlf.yaml")
    assert document.lines[("b", 0)] == 3


def test_control_character_is_a_problem_with_its_line() -> None:
    """A character YAML does not allow is reported on its line."""
    (problem,) = problems("a: 1\nb: \x07\n")
    assert problem.line == 2
    assert "#x0007" in problem.message


def test_deep_nesting_is_fine() -> None:
    """A deeply (but sanely) nested document builds without trouble."""
    depth = 200
    text = "".join(f"{'  ' * level}k{level}:\n" for level in range(depth)) + "  " * depth + "x\n"
    (document,) = documents_from_text(text, "deep.yaml")
    assert document.lines[tuple(f"k{level}" for level in range(depth))] == depth


def test_absurd_nesting_is_refused_without_crashing() -> None:
    """Brackets nested 100,000 deep (which would crash libyaml) are a problem, with a line."""
    (problem,) = problems("kind: A\nspec: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert problem.line == 2
    assert "nested" in problem.message
    (problem,) = problems("a: " + "[" * 600 + "]" * 600 + "\n")  # deep, but within libyaml's
    assert "nested too deeply" in problem.message


def test_uses_libyaml_when_available() -> None:
    """The composer is libyaml's when PyYAML has it (about ten times faster)."""
    from inmesh.config import yaml as module

    if getattr(yaml, "__with_libyaml__", False):
        assert issubclass(module._Loader, yaml.CSafeLoader)
    else:  # pragma: no cover
        assert issubclass(module._Loader, yaml.SafeLoader)


def test_large_text_keeps_the_garbage_collector_state() -> None:
    """Parsing a large text pauses the cyclic collector and switches it back on after."""
    import gc

    text = "".join(f"- {{name: n{i}, port: {i}}}\n" for i in range(12_000))
    assert gc.isenabled()
    (document,) = documents_from_text(text, "big.yaml")
    assert gc.isenabled()
    assert document.lines[(11_999, "port")] == 12_000
    gc.disable()
    try:
        documents_from_text(text, "big.yaml")
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- properties ---------------------------------------------------------------------------

_keys = st.text(min_size=1, max_size=12)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_trees = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=100, deadline=None)
@given(tree=st.dictionaries(_keys, _trees, max_size=5), flow=st.booleans())
def test_round_trip_of_dumped_trees(tree: dict[str, Any], flow: bool) -> None:
    """Whatever PyYAML dumps, we read back as safe_load does, with a line for every field."""
    text = yaml.safe_dump(tree, default_flow_style=flow, allow_unicode=True)
    documents = documents_from_text(text, "prop.yaml")
    expected = yaml.safe_load(text)
    if not expected:
        assert documents == [] or documents[0].body == expected
        return
    (document,) = documents
    assert document.body == expected
    assert set(_paths(document.body)) == set(document.lines)
    # YAML also breaks lines at NEL, LS and PS, which allow_unicode writes as they are.
    line_count = len(re.findall("\r\n|[\r\n\x85\u2028\u2029]", text)) + 1
    assert all(1 <= line <= line_count for line in document.lines.values())


@settings(max_examples=50, deadline=None)
@given(tree=st.dictionaries(_keys, _trees, max_size=5))
def test_round_trip_of_json(tree: dict[str, Any]) -> None:
    """JSON texts (pretty-printed) read back equal to json.loads, lines included."""
    text = json.dumps(tree, indent=1)
    (document,) = documents_from_text(text, "prop.json")
    assert document.body == json.loads(text)
    for path, line in document.lines.items():
        if path and isinstance(path[-1], str):
            assert json.dumps(path[-1]) in text.splitlines()[line - 1]


def _paths(value: Any, prefix: FieldPath = ()) -> list[FieldPath]:
    found: list[FieldPath] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*prefix, key))
            found.extend(_paths(item, (*prefix, key)))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            found.append((*prefix, position))
            found.extend(_paths(item, (*prefix, position)))
    return found
