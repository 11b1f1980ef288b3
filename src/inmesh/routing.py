"""Match a request to a route and a weighted destination (Envoy's route table).

Pure: a compiled ``RouteTable`` and a ``RequestView`` in, a ``Decision`` out. Nothing here
knows httpx or grpc; the adapters present their request through ``RequestView``.

Semantics follow Envoy as Istio configures it: routes are tried in order and the first
whose match blocks accept the request wins; the blocks of one route are ORed and the
conditions inside one block are ANDed; a route with no match block accepts everything.
Regexes are RE2 and must match the whole value. Weights are relative: a destination's
share is its weight over the sum.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol
from urllib.parse import parse_qsl

import re2

from inmesh._namedtuples import build as _tuple
from inmesh.config.model import (
    HeaderOperations,
    Headers,
    HTTPMatch,
    HTTPRedirect,
    HTTPRewrite,
    HTTPRoute,
    RouteDestination,
    StringMatch,
)

__all__ = [
    "CompiledDestination",
    "CompiledMatch",
    "CompiledRoute",
    "Decision",
    "Forward",
    "NoRoute",
    "Redirect",
    "RequestView",
    "RouteTable",
    "apply_header_ops",
    "compile_regex",
    "compile_route",
    "query_value",
    "redirect_location",
    "rewrite_path",
]


class RequestView(Protocol):
    """What routing needs to know of a request; adapters implement it lazily."""

    @property
    def method(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def authority(self) -> str: ...
    @property
    def path(self) -> str:
        """The path without the query string, as sent (not percent-decoded)."""
        ...

    @property
    def query(self) -> str: ...
    def header(self, name: str) -> str | None:
        """The value of a lower-case header name; several values joined by ``,``."""
        ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is reported by validation, not on stderr
_RE2_NOCASE = re2.Options()
_RE2_NOCASE.log_errors = False
_RE2_NOCASE.case_sensitive = False


def compile_regex(pattern: str, *, ignore_case: bool = False) -> Callable[[str], bool]:
    """A full-match predicate for an RE2 pattern.

    RE2 rather than ``re``: linear time, so a careless or hostile pattern cannot stall the
    request path. Matching bytes is about three times faster than str in google-re2's
    binding, hence the encode.
    """
    compiled = re2.compile(pattern.encode(), _RE2_NOCASE if ignore_case else _RE2_OPTIONS)
    fullmatch = compiled.fullmatch
    return lambda value: fullmatch(value.encode()) is not None


def _string_matcher(match: StringMatch, *, ignore_case: bool = False) -> Callable[[str], bool]:
    value = match.value
    if match.kind == "regex":
        return compile_regex(value, ignore_case=ignore_case)
    if ignore_case:
        value = value.lower()
        if match.kind == "exact":
            return lambda s: s.lower() == value
        return lambda s: s.lower().startswith(value)
    if match.kind == "exact":
        return value.__eq__
    return lambda s: s.startswith(value)


Condition = Callable[[RequestView], bool]


def _header_condition(name: str, match: StringMatch | None, *, invert: bool) -> Condition:
    if match is None:  # `{}`: the header is present
        if invert:
            return lambda r: r.header(name) is None
        return lambda r: r.header(name) is not None
    test = _string_matcher(match)
    if invert:  # withoutHeaders: a missing header counts as empty
        return lambda r: not test(r.header(name) or "")

    def present_and_matches(r: RequestView) -> bool:
        value = r.header(name)
        return value is not None and test(value)

    return present_and_matches


def query_value(request: RequestView, name: str) -> str | None:
    for key, value in parse_qsl(request.query, keep_blank_values=True):
        if key == name:
            return value
    return None


def _query_condition(name: str, match: StringMatch | None) -> Condition:
    if match is None:
        return lambda r: query_value(r, name) is not None
    test = _string_matcher(match)

    def matches(r: RequestView) -> bool:
        value = query_value(r, name)
        return value is not None and test(value)

    return matches


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledMatch:
    """One match block compiled to predicates. ``source_ok`` is decided at compile time:
    the caller's labels are fixed for the life of a Mesh."""

    spec: HTTPMatch
    index: int
    conditions: tuple[tuple[str, Condition], ...]
    source_ok: bool

    def first_failure(self, request: RequestView) -> str | None:
        """The field that rejected the request (for ``explain``), or None if it matches."""
        if not self.source_ok:
            return "sourceLabels"
        for field, condition in self.conditions:
            if not condition(request):
                return field
        return None


def _compile_match(spec: HTTPMatch, index: int, caller_labels: Mapping[str, str]) -> CompiledMatch:
    conditions: list[tuple[str, Condition]] = []
    if spec.port is not None:
        port = spec.port
        conditions.append(("port", lambda r: r.port == port))
    if spec.method is not None:
        method = _string_matcher(spec.method)
        conditions.append(("method", lambda r: method(r.method)))
    if spec.scheme is not None:
        scheme = _string_matcher(spec.scheme)
        conditions.append(("scheme", lambda r: scheme(r.scheme)))
    if spec.authority is not None:
        authority = _string_matcher(spec.authority)
        conditions.append(("authority", lambda r: authority(r.authority)))
    if spec.uri is not None:
        # Istio ignores case for exact and prefix uri matches only, not for regexes.
        ignore_case = spec.ignore_uri_case and spec.uri.kind != "regex"
        text = spec.uri.value
        # The common uri matches test the path directly: one call fewer on every request.
        if spec.uri.kind == "prefix" and not ignore_case:
            conditions.append(("uri", lambda r: r.path.startswith(text)))
        elif spec.uri.kind == "exact" and not ignore_case:
            conditions.append(("uri", lambda r: r.path == text))
        else:
            uri = _string_matcher(spec.uri, ignore_case=ignore_case)
            conditions.append(("uri", lambda r: uri(r.path)))
    for name, header in spec.headers.items():
        conditions.append((f"headers.{name}", _header_condition(name, header, invert=False)))
    for name, header in spec.without_headers.items():
        conditions.append((f"withoutHeaders.{name}", _header_condition(name, header, invert=True)))
    for name, param in spec.query_params.items():
        conditions.append((f"queryParams.{name}", _query_condition(name, param)))
    source_ok = all(caller_labels.get(k) == v for k, v in spec.source_labels.items())
    return CompiledMatch(spec=spec, index=index, conditions=tuple(conditions), source_ok=source_ok)


class CompiledDestination(NamedTuple):
    """A weighted destination with the header edits that apply when it is drawn
    (the route's, then the destination's own), gathered once at compile time."""

    spec: RouteDestination
    request_ops: tuple[HeaderOperations, ...]
    response_ops: tuple[HeaderOperations, ...]

    @property
    def weight(self) -> int:
        return self.spec.weight


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledRoute:
    spec: HTTPRoute
    matches: tuple[CompiledMatch, ...]
    destinations: tuple[CompiledDestination, ...]
    cumulative: tuple[int, ...]  # running sums of weights, for a bisect pick
    total_weight: int
    # The blocks this caller can match (sourceLabels decided), each with its bare
    # conditions: what ``RouteTable.decide`` tests, with no call per block.
    live: tuple[tuple[CompiledMatch, tuple[Condition, ...]], ...] = ()

    def pick(self, rng: random.Random) -> CompiledDestination | None:
        """A destination drawn by weight (None if every weight is zero)."""
        if len(self.destinations) == 1:
            return self.destinations[0] if self.total_weight > 0 else None
        if self.total_weight <= 0:
            return None
        point = rng.random() * self.total_weight
        return self.destinations[bisect.bisect_right(self.cumulative, point)]

    def share(self, destination: CompiledDestination) -> float:
        return destination.spec.weight / self.total_weight if self.total_weight else 0.0


def _ops(
    *headers: Headers | None,
) -> tuple[tuple[HeaderOperations, ...], tuple[HeaderOperations, ...]]:
    request = tuple(h.request for h in headers if h is not None and h.request is not None)
    response = tuple(h.response for h in headers if h is not None and h.response is not None)
    return request, response


def compile_route(spec: HTTPRoute, caller_labels: Mapping[str, str]) -> CompiledRoute:
    running = 0
    cumulative = []
    destinations = []
    for destination in spec.route:
        running += destination.weight
        cumulative.append(running)
        destinations.append(
            # Envoy applies the most specific edits first, so the route's own win over a
            # destination's (most_specific_header_mutations_wins is off by default).
            CompiledDestination(destination, *_ops(destination.headers, spec.headers))
        )
    matches = tuple(_compile_match(m, i, caller_labels) for i, m in enumerate(spec.match))
    return CompiledRoute(
        spec=spec,
        matches=matches,
        destinations=tuple(destinations),
        cumulative=tuple(cumulative),
        total_weight=running,
        live=tuple(
            (block, tuple(condition for _, condition in block.conditions))
            for block in matches
            if block.source_ok
        ),
    )


# Decisions are NamedTuples rather than frozen dataclasses: one is built for every request,
# and a frozen dataclass pays an object.__setattr__ per field. The hot ones are built with
# ``_tuple`` (``inmesh._namedtuples``).


class Forward(NamedTuple):
    """Send upstream: the route that matched, which block, and the destination drawn."""

    route: CompiledRoute
    block: CompiledMatch | None
    destination: CompiledDestination


class Redirect(NamedTuple):
    route: CompiledRoute
    block: CompiledMatch | None
    redirect: HTTPRedirect


class NoRoute(NamedTuple):
    """No rule matched (404), or the matched rule's weights are all zero (503)."""

    status: int
    reason: str


Decision = Forward | Redirect | NoRoute


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteTable:
    """The compiled ``http`` routes of one VirtualService, in order."""

    name: str
    namespace: str
    origin: str
    routes: tuple[CompiledRoute, ...]

    def decide(self, request: RequestView, rng: random.Random) -> Decision:
        # ``CompiledRoute.match`` inlined: this runs for every request, and a call per
        # route and per block would cost more than the conditions themselves.
        matched: CompiledMatch | None
        for route in self.routes:
            matched = None
            if route.matches:
                for block, conditions in route.live:
                    for condition in conditions:
                        if not condition(request):
                            break
                    else:
                        matched = block
                        break
                if matched is None:
                    continue
            if route.spec.redirect is not None:
                return Redirect(route, matched, route.spec.redirect)
            destination = route.pick(rng)
            if destination is None:
                return NoRoute(503, f"route {route.spec.path} has no weight")
            return _tuple(Forward, (route, matched, destination))
        return NoRoute(404, f"no route of VirtualService {self.name} matched")


@functools.lru_cache(maxsize=1024)
def _regex_substitution(pattern: str) -> Callable[[str, str], str]:
    compiled = re2.compile(pattern, _RE2_OPTIONS)
    return lambda replacement, value: str(compiled.sub(replacement, value))


def rewrite_path(path: str, rewrite: HTTPRewrite, block: CompiledMatch | None) -> str:
    """The upstream path after ``rewrite``: Istio replaces the matched prefix when the
    block matched the uri by prefix, and the whole path otherwise."""
    if rewrite.uri_regex is not None:
        pattern, replacement = rewrite.uri_regex
        return _regex_substitution(pattern)(replacement, path)
    if rewrite.uri is None:
        return path
    uri = block.spec.uri if block is not None else None
    if uri is not None and uri.kind == "prefix":
        prefix = uri.value
        if block is not None and block.spec.ignore_uri_case:
            if path.lower().startswith(prefix.lower()):
                return rewrite.uri + path[len(prefix) :]
        elif path.startswith(prefix):
            return rewrite.uri + path[len(prefix) :]
    return rewrite.uri


def apply_header_ops(
    headers: list[tuple[bytes, bytes]], ops: HeaderOperations | None
) -> list[tuple[bytes, bytes]]:
    """Envoy's order: remove, then set (replace), then add (append)."""
    if ops is None:
        return headers
    drop = {n.encode() for n in ops.remove} | {n.encode() for n, _ in ops.set}
    if drop:
        headers = [(k, v) for k, v in headers if k.lower() not in drop]
    for name, value in ops.set:
        headers.append((name.encode(), value.encode()))
    for name, value in ops.add:
        headers.append((name.encode(), value.encode()))
    return headers


def redirect_location(request: RequestView, redirect: HTTPRedirect) -> str:
    """The Location of a redirect: each field set replaces that part of the request URL;
    the query string is kept unless the new uri brings its own (Envoy's strip_query off)."""
    scheme = redirect.scheme or request.scheme
    authority = redirect.authority or request.authority
    if redirect.port is not None:
        host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
        authority = f"{host}:{redirect.port}"
    if redirect.uri is None:
        target = request.path + (f"?{request.query}" if request.query else "")
    elif "?" in redirect.uri or not request.query:
        target = redirect.uri
    else:
        target = f"{redirect.uri}?{request.query}"
    return f"{scheme}://{authority}{target}"
