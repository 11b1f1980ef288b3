"""Istio's resources (and inmesh's MeshConfig) as ``Document``s → the frozen model values.

This module owns the step from plain YAML values to ``inmesh.config.model``: the
apiVersion/kind dispatch, metadata, one small function per Istio object, Istio's own
validation rules (the ones ``istioctl validate`` and the admission webhook apply), and
the tables of real Istio fields that inmesh does not implement, which are rejected by
name rather than ignored. Every document is read to the end whatever goes wrong, so one
``ConfigError`` carries every problem of every document, each located as
``source:line field.path: message``.

Defaults follow Istio: a lone route destination gets weight 100, ``redirectCode`` 301, a
ring hash 1024 entries, a maglev table 65537, an endpoint weight 1, the namespace
``default``; a ``retries`` block without ``retryOn`` gets Istio's default conditions, a
connection-pool limit of 0 means unlimited, outlier detection counts 5 consecutive 5xx
every 10s and ejects for 30s, at most 10% of the endpoints. Two deliberate departures,
both because inmesh routes inside the client and has no sidecar to fall back on:
``resolution`` defaults to STATIC (Istio's NONE means "pass through to the original IP",
which needs a proxy), and a port's protocol defaults to HTTP (Istio sniffs it).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Final, Literal

import re2

from inmesh.config._reader import (
    NOT_YET,
    Problems,
    Reader,
    range_problem,
    render_path,
    suggestion,
)
from inmesh.config.document import Document, FieldPath
from inmesh.config.model import (
    DEFAULT_RETRY,
    DEFAULT_RETRY_ON,
    GRPC_STATUS_NAMES,
    ConnectionPoolSettings,
    ConsistentHash,
    CookieHashKey,
    Destination,
    DestinationRule,
    Distribute,
    Failover,
    FaultAbort,
    FaultDelay,
    HashKey,
    HeaderHashKey,
    HeaderOperations,
    Headers,
    HTTPFault,
    HTTPMatch,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPSettings,
    LoadBalancerSettings,
    LocalityLbSetting,
    Maglev,
    MeshConfig,
    Origin,
    OutboundMode,
    OutlierDetection,
    Port,
    QueryHashKey,
    RatioRetryBudget,
    Resource,
    RetryBudget,
    RingHash,
    RouteDestination,
    ServiceEntry,
    SimpleLB,
    SourceIpHashKey,
    StringMatch,
    Subset,
    TCPSettings,
    TrafficPolicy,
    VirtualService,
    WorkloadEntry,
    WorkloadSpec,
)
from inmesh.exceptions import ConfigError, Problem

__all__ = ["parse_documents", "parse_duration"]


# =========================================================================== durations

_DURATION: Final = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_NANOS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "ns": 1,
        "us": 1_000,
        "µs": 1_000,  # micro sign
        "μs": 1_000,  # Greek mu: Go accepts both
        "ms": 1_000_000,
        "s": 1_000_000_000,
        "m": 60_000_000_000,
        "h": 3_600_000_000_000,
    }
)
_MS: Final = 1_000_000
_MAX_DURATION_NS: Final = 315_576_000_000 * 1_000_000_000  # protobuf Duration's limit


def parse_duration(value: object) -> float:
    """Istio's duration text (``"1.5s"``, ``"100ms"``, ``"1m30s"``, ``"2h"``) in seconds.

    Accepts the protobuf JSON form (seconds with an ``s``) and Go's ``time.Duration``
    form that Istio also reads (``ns``, ``us``/``µs``, ``ms``, ``s``, ``m``, ``h``,
    combined as in ``1h30m``). Istio's rule applies: at least 1ms and a whole number of
    milliseconds. The arithmetic is exact; the result is ``milliseconds / 1000``.
    Raises ``ValueError`` with a message fit to follow a field path.
    """
    if not isinstance(value, str):
        raise ValueError("must be a duration string such as '1.5s' or '100ms'")
    text = value[1:] if value.startswith("+") else value
    if text.startswith("-"):
        raise ValueError(f"{value!r} is negative: a duration must be at least 1ms")
    if text == "0":  # Go's one unit-less duration
        raise ValueError("a duration must be at least 1ms")
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"{value!r} is not a duration: write a number and a unit (h, m, s, ms), "
            "e.g. '1.5s' or '100ms'"
        )
    nanos = sum(
        (Fraction(number) * _NANOS[unit] for number, unit in _DURATION_PART.findall(text)),
        Fraction(0),
    )
    if nanos < _MS:
        raise ValueError(f"{value!r} is too short: a duration must be at least 1ms")
    if nanos > _MAX_DURATION_NS:
        raise ValueError(f"{value!r} is too long")
    if nanos % _MS:
        raise ValueError(f"{value!r} is finer than Istio's precision: use whole milliseconds")
    return int(nanos // _MS) / 1000


def _is_zero_duration(value: object) -> bool:
    """``"0"``, ``"0s"``, ``"0ms"``, ``"0m0s"``: the zero some fields use to mean "off"."""
    if not isinstance(value, str):
        return False
    text = value[1:] if value.startswith("+") else value
    if text == "0":
        return True
    return _DURATION.fullmatch(text) is not None and not any(
        Fraction(number) for number, _ in _DURATION_PART.findall(text)
    )


def _duration(r: Reader, key: str, *, required: bool = False, zero: bool = False) -> float | None:
    """Field ``key`` as seconds, or None when absent (or, with ``zero``, written as zero)."""
    value = r.raw(key, required=required)
    if value is None or (zero and _is_zero_duration(value)):
        return None
    try:
        return parse_duration(value)
    except ValueError as error:
        r.problem(key, str(error))
        return None


# =========================================================================== the tables

_NETWORKING_VERSIONS: Final = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
_INMESH_VERSIONS: Final = ("inmesh.io/v1",)
_LATER_KINDS: Final = frozenset({"PeerAuthentication", "AuthorizationPolicy"})

# Object fields a kubectl dump carries that mean nothing to inmesh (the server sets them).
_SERVER_METADATA: Final = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "ownerReferences",
    "finalizers",
)
_METADATA_NOTES: Final = MappingProxyType(
    {"generateName": "not supported by inmesh: give the resource a name"}
)

_NO_COOKIES: Final = (
    "not supported: inmesh cannot set cookies (it hashes a cookie the request already has)"
)

_SERVICE_ENTRY_NOTES: Final = MappingProxyType(
    {
        "addresses": NOT_YET + " (inmesh routes by host name, not by virtual IP)",
        "subjectAltNames": NOT_YET,
    }
)
_WORKLOAD_NOTES: Final = MappingProxyType({"network": NOT_YET})
_RESOLUTION_NOTES: Final = MappingProxyType(
    {
        "NONE": "not supported by inmesh: a mesh inside the client needs the endpoints "
        "(use STATIC or DNS)",
        "DNS_ROUND_ROBIN": NOT_YET,
    }
)
_VIRTUAL_SERVICE_NOTES: Final = MappingProxyType(
    {"tcp": NOT_YET + " (only http routes)", "tls": NOT_YET + " (only http routes)"}
)
_HTTP_ROUTE_NOTES: Final = MappingProxyType(
    {
        **dict.fromkeys(("corsPolicy", "delegate", "directResponse"), NOT_YET),
        "mirrors": NOT_YET + " (a single mirror: use mirror)",
    }
)
_RETRY_NOTES: Final = MappingProxyType(
    dict.fromkeys(("retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"), NOT_YET)
)
_DELAY_NOTES: Final = MappingProxyType({"exponentialDelay": NOT_YET})
_ABORT_NOTES: Final = MappingProxyType({"http2Error": NOT_YET})
_MATCH_NOTES: Final = MappingProxyType(dict.fromkeys(("sourceNamespace", "statPrefix"), NOT_YET))
_REDIRECT_NOTES: Final = MappingProxyType({"derivePort": NOT_YET})
_DESTINATION_RULE_NOTES: Final = MappingProxyType({"workloadSelector": NOT_YET})
_TRAFFIC_POLICY_NOTES: Final = MappingProxyType(
    dict.fromkeys(("tls", "portLevelSettings", "tunnel", "proxyProtocol"), NOT_YET)
)
_TCP_POOL_NOTES: Final = MappingProxyType(
    dict.fromkeys(("tcpKeepalive", "maxConnectionDuration", "idleTimeout"), NOT_YET)
)
_HTTP_POOL_NOTES: Final = MappingProxyType(
    dict.fromkeys(("h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"), NOT_YET)
)
_OUTLIER_NOTES: Final = MappingProxyType(
    {
        "consecutiveErrors": "deprecated by Istio: use consecutive5xxErrors (any 5xx) or "
        "consecutiveGatewayErrors (502, 503, 504 and connection failures)",
        **dict.fromkeys(
            ("splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures"), NOT_YET
        ),
    }
)
_LOAD_BALANCER_NOTES: Final = MappingProxyType(
    dict.fromkeys(("warmupDurationSecs", "warmup"), NOT_YET)
)
_SIMPLE_NOTES: Final = MappingProxyType(
    {"PASSTHROUGH": "not supported by inmesh: there is no original destination to pass to"}
)
_COOKIE_NOTES: Final = MappingProxyType(dict.fromkeys(("path", "ttl", "attributes"), _NO_COOKIES))
_MESH_CONFIG_NOTES: Final = MappingProxyType(
    dict.fromkeys(
        (
            "accessLogFile",
            "accessLogFormat",
            "accessLogEncoding",
            "enableTracing",
            "defaultConfig",
            "defaultProviders",
            "extensionProviders",
            "trustDomain",
            "trustDomainAliases",
            "caCertificates",
            "localityLbSetting",
            "connectTimeout",
            "tcpKeepalive",
            "h2UpgradePolicy",
            "dnsRefreshRate",
            "rootNamespace",
            "meshMTLS",
            "tlsDefaults",
            "enableAutoMtls",
            "inboundTrafficPolicy",
            "defaultServiceExportTo",
            "defaultVirtualServiceExportTo",
            "defaultDestinationRuleExportTo",
            "serviceSettings",
            "discoverySelectors",
            "pathNormalization",
            "outboundClusterStatName",
            "inboundClusterStatName",
            "enablePrometheusMerge",
            "verifyCertificateAtClient",
            "protocolDetectionTimeout",
        ),
        NOT_YET,
    )
)
_OUTBOUND_NOTES: Final = MappingProxyType({"egressProxy": NOT_YET})

_PROTOCOLS: Final = (
    "HTTP",
    "HTTP2",
    "GRPC",
    "GRPC-WEB",
    "HTTPS",
    "TCP",
    "TLS",
    "MONGO",
    "REDIS",
    "MYSQL",
)
_HTTP_PROTOCOLS: Final = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTPS", "TLS"})
_LATER_PROTOCOLS: Final = frozenset({"UDP", "HTTP_PROXY"})

_SIMPLE: Final[Mapping[str, SimpleLB | None]] = MappingProxyType(
    {
        "UNSPECIFIED": None,
        "ROUND_ROBIN": SimpleLB.ROUND_ROBIN,
        "LEAST_REQUEST": SimpleLB.LEAST_REQUEST,
        "LEAST_CONN": SimpleLB.LEAST_REQUEST,  # Istio's deprecated name for the same thing
        "RANDOM": SimpleLB.RANDOM,
    }
)

_MAX_WEIGHT: Final = 2**31 - 1  # route weights are int32 in Istio's API
_MAX_INT32: Final = 2**31 - 1
_MAX_UINT32: Final = 2**32 - 1
_MAX_ENDPOINT_WEIGHT: Final = 2**32 - 1  # endpoint weights are uint32
_MAX_RING: Final = 8_388_608  # Envoy's bound on minimum_ring_size (8M)
_MAX_MAGLEV: Final = 5_000_011  # Envoy's bound on Maglev table_size
_MAX_REGEX: Final = 1024  # Istio's approximation of Envoy's RE2 program-size limit
_TOPOLOGY_LABELS: Final = frozenset(
    {"topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone"}
)


# =========================================================================== entry point


def parse_documents(docs: Sequence[Document]) -> list[Resource]:
    """Each document as its model value, in input order.

    Every document is validated to the end; if any has a problem, one ``ConfigError``
    carries every problem of every document (each document's in line order) and no
    resource is returned.
    """
    resources: list[Resource] = []
    problems: list[Problem] = []
    for doc in docs:
        found = Problems(doc)
        resource = _document(doc, found)
        if len(found):
            problems.extend(found.in_line_order())
        elif resource is not None:
            resources.append(resource)
    if problems:
        raise ConfigError(problems)
    return resources


@dataclass(frozen=True, slots=True)
class _Meta:
    name: str
    namespace: str
    origin: Origin


@dataclass(frozen=True, slots=True)
class _Kind:
    versions: tuple[str, ...]
    parse: Callable[[Reader, _Meta], Resource]
    notes: Mapping[str, str]
    mesh_wide: bool = False  # no namespace; metadata and spec may be left out


def _document(doc: Document, problems: Problems) -> Resource | None:
    if not isinstance(doc.body, Mapping):
        problems.add((), "a resource must be a mapping with apiVersion, kind, metadata and spec")
        return None
    top = Reader(problems, (), doc.body)
    api_version = top.string("apiVersion", required=True)
    kind_name = top.string("kind", required=True)
    top.raw("status")  # written by a cluster, never by the user: ignored
    if kind_name is None:
        return None
    kind = _KINDS.get(kind_name)
    if kind is None:
        if kind_name in _LATER_KINDS:
            top.problem("kind", f"{kind_name} is not supported by inmesh yet")
        else:
            known = ", ".join(_KINDS)
            hint = suggestion(kind_name, _KINDS)
            top.problem("kind", f"unknown kind {kind_name!r} (inmesh reads {known}){hint}")
        return None  # the rest of an unknown kind cannot be checked against anything
    if api_version is not None and api_version not in kind.versions:
        top.problem(
            "apiVersion",
            f"{api_version!r} is not an apiVersion of {kind_name} "
            f"(one of {', '.join(kind.versions)})",
        )
    meta = _metadata(top, doc, kind)
    spec = top.child("spec", kind.notes, required=not kind.mesh_wide)
    if spec is None and kind.mesh_wide and not top.present("spec"):
        spec = Reader(problems, ("spec",), {}, kind.notes)
    top.done()
    return None if spec is None else kind.parse(spec, meta)


def _metadata(top: Reader, doc: Document, kind: _Kind) -> _Meta:
    name: str | None = None
    namespace = "default"
    metadata = top.child("metadata", _METADATA_NOTES, required=not kind.mesh_wide)
    if metadata is not None:
        name = metadata.string("name", required=not kind.mesh_wide)
        if name is not None and not _is_dns_subdomain(name):
            metadata.problem(
                "name",
                f"{name!r} is not a valid name: lower-case letters, digits, '-' and '.', "
                "starting and ending with a letter or digit (a DNS-1123 subdomain)",
            )
        given = metadata.string("namespace")
        if given is not None:
            if kind.mesh_wide:
                metadata.problem("namespace", "a MeshConfig is mesh-wide: it has no namespace")
            elif not _is_dns_label(given):
                metadata.problem("namespace", f"{given!r} is not a valid namespace ({_LABEL_RULE})")
            else:
                namespace = given
        metadata.raw("labels")  # allowed, and meaningless to inmesh
        metadata.raw("annotations")
        for key in _SERVER_METADATA:
            metadata.raw(key)
        metadata.done()
    return _Meta(name or "default", namespace, Origin(doc.source, doc.line))


# =========================================================================== names and labels

_DNS_LABEL: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_LABEL_RULE: Final = (
    "a DNS-1123 label: at most 63 lower-case letters, digits and '-', "
    "starting and ending with a letter or digit"
)
_QUALIFIED_NAME: Final = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field-name


def _is_dns_label(text: str) -> bool:
    return len(text) <= 63 and _DNS_LABEL.fullmatch(text) is not None


def _is_dns_subdomain(text: str) -> bool:
    return len(text) <= 253 and all(_is_dns_label(label) for label in text.split("."))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _domain_problem(host: str, *, wildcard: bool) -> str | None:
    """Istio's ValidateWildcardDomain (``wildcard``) or ValidateFQDN, for a lower-cased name."""
    if len(host) > 255:
        return "a domain name has at most 255 characters"
    labels = host.split(".")
    for position, label in enumerate(labels):
        if label == "*" and position == 0 and wildcard:
            continue
        if "*" in label:
            return (
                f"{host!r}: a wildcard must be the whole first label ('*.example.com')"
                if wildcard
                else f"{host!r}: a wildcard is not allowed here"
            )
        if not _is_dns_label(label):
            return f"{host!r} is not a valid domain name (label {label!r} is not {_LABEL_RULE})"
    if len(labels) > 1 and labels[-1].isdigit():
        return f"{host!r} is not a valid domain name (its top-level label is all digits)"
    return None


def _host(problems: Problems, path: FieldPath, text: str, *, ip: bool = False) -> str | None:
    """A service host name (lower-cased; ``*.suffix`` allowed; bare ``*`` refused)."""
    host = text.lower()
    if host.endswith(".") and len(host) > 1:
        host = host[:-1]  # "istio.io." is the absolute form of "istio.io"
    if host == "*":
        problems.add(path, "'*' (every host) is not allowed here: name the hosts")
        return None
    if not host:
        problems.add(path, "must not be empty")
        return None
    if ip and _is_ip(host):
        return host
    problem = _domain_problem(host, wildcard=True)
    if problem is not None:
        problems.add(path, problem)
        return None
    return host


def _hosts(r: Reader, key: str, *, ip: bool = False) -> tuple[str, ...]:
    found: list[str] = []
    for path, text in r.strings(key, required=True):
        host = _host(r.problems, path, text, ip=ip)
        if host is not None:
            found.append(host)
    return tuple(found)


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and _is_dns_subdomain(prefix)):
        return f"invalid label key {key!r}: the prefix before '/' must be a DNS subdomain"
    if not (len(name) <= 63 and _QUALIFIED_NAME.fullmatch(name)):
        return (
            f"invalid label key {key!r}: at most 63 letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def _labels(r: Reader, key: str) -> Mapping[str, str]:
    found: dict[str, str] = {}
    for name, (path, value) in r.string_map(key).items():
        problem = _label_key_problem(name)
        if (
            problem is None
            and value
            and not (len(value) <= 63 and _QUALIFIED_NAME.fullmatch(value))
        ):
            problem = (
                f"invalid label value {value!r}: at most 63 letters, digits, '-', '_' and '.', "
                "starting and ending with a letter or digit"
            )
        if problem is not None:
            r.problems.add(path, problem)
        found[name] = value
    return MappingProxyType(found)


def _locality_problem(text: str, *, wildcard: bool) -> str | None:
    parts = text.split("/")
    if len(parts) > 3:
        return f"{text!r}: a locality has at most three parts, region/zone/subzone"
    if "" in parts:
        return f"{text!r}: a locality must not have an empty part"
    for position, part in enumerate(parts):
        if "*" not in part:
            continue
        if not wildcard:
            return f"{text!r}: a wildcard is not allowed here"
        if part != "*" or position != len(parts) - 1:
            return f"{text!r}: '*' may only be the whole last part (e.g. 'us-east/*')"
    return None


def _locality_parts(text: str) -> tuple[str, ...]:
    """``us-east/*`` and ``us-east`` both mean all of us-east: ``("us-east",)``."""
    parts = tuple(text.split("/"))
    return parts[:-1] if parts[-1] == "*" else parts


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


# =========================================================================== regexes and headers

_MATCH_KINDS: Final[tuple[Literal["exact", "prefix", "regex"], ...]] = ("exact", "prefix", "regex")
_HASH_KEYS: Final = ("httpHeaderName", "httpCookie", "httpQueryParameterName", "useSourceIp")
_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False  # RE2 would otherwise print each bad pattern on stderr


def _regex_problem(pattern: str) -> str | None:
    if not pattern:
        return "a regex must not be empty"
    if len(pattern) > _MAX_REGEX:
        return f"a regex has at most {_MAX_REGEX} characters"
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        return f"not a valid RE2 regex: {reason}"
    return None


def _string_match(r: Reader, *, empty_prefix: bool, required: bool) -> StringMatch | None:
    """Istio's StringMatch oneof. None when nothing is set (a header's "present" match)."""
    found: list[tuple[Literal["exact", "prefix", "regex"], str]] = []
    for kind in _MATCH_KINDS:
        value = r.string(kind)
        if value is not None:
            found.append((kind, value))
    r.done()
    if len(found) > 1:
        r.problem(None, "set only one of exact, prefix, regex")
        return None
    if not found:
        if required:
            r.problem(None, "set one of exact, prefix, regex")
        return None
    kind, value = found[0]
    if kind == "prefix" and not value and not empty_prefix:
        r.problem("prefix", "empty prefix match is not allowed")
    elif kind == "regex":
        problem = _regex_problem(value)
        if problem is not None:
            r.problem("regex", problem)
    return StringMatch(kind, value)


def _match_field(r: Reader, key: str, *, empty_prefix: bool = False) -> StringMatch | None:
    match = r.child(key)
    return None if match is None else _string_match(match, empty_prefix=empty_prefix, required=True)


def _match_header_name(problems: Problems, path: FieldPath, name: str) -> str | None:
    if not name:
        problems.add(path, "a header name must not be empty")
    elif name.startswith("@request.auth.claims"):
        problems.add(path, "JWT claim based routing is only supported for gateways")
    elif name.startswith(":"):
        problems.add(path, f"{name}: use uri, scheme, method or authority to match pseudo-headers")
    elif not _TOKEN.fullmatch(name):
        problems.add(path, f"{name!r} is not a valid header name")
    else:
        return name.lower()
    return None


def _match_map(r: Reader, key: str, *, headers: bool) -> Mapping[str, StringMatch | None]:
    """``headers``/``withoutHeaders``/``queryParams``: name → match, ``{}`` (None) = present."""
    found: dict[str, StringMatch | None] = {}
    for name, path, value in r.entries(key):
        normalized: str | None = name
        if headers:
            normalized = _match_header_name(r.problems, path, name)
        elif not name:
            r.problems.add(path, "a parameter name must not be empty")
            normalized = None
        if not isinstance(value, Mapping):
            r.problems.add(path, "must be {} (present) or a mapping with exact, prefix or regex")
            continue
        match = _string_match(Reader(r.problems, path, value), empty_prefix=False, required=False)
        if normalized is None:
            continue
        if normalized in found:
            r.problems.add(path, f"{normalized!r} is matched twice (header names ignore case)")
        found[normalized] = match
    return MappingProxyType(found)


def _header_value(problems: Problems, path: FieldPath, value: object) -> str | None:
    if not isinstance(value, str):
        problems.add(path, "must be a string")
        return None
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
        problems.add(path, "a header value must not contain control characters")
        return None
    # Envoy reads "%%" as "%" and any other "%" as the start of a %VARIABLE%, which inmesh
    # does not expand; sending it verbatim would quietly differ from Istio.
    pieces = value.split("%%")
    if any("%" in piece for piece in pieces):
        problems.add(
            path,
            "Envoy's %VARIABLE% substitution is " + NOT_YET + " (write %% for a literal %)",
        )
        return None
    return "%".join(pieces)


def _edited_header_name(
    problems: Problems, path: FieldPath, name: str, *, request: bool, adds: bool
) -> str | None:
    lower = name.lower()
    if not name:
        problems.add(path, "a header name must not be empty")
    elif lower in {"host", ":authority"} and request and adds:
        problems.add(path, f"setting {name!r} is " + NOT_YET + ": use rewrite.authority")
    elif lower == "host":
        problems.add(path, "the Host header cannot be modified")
    elif name.startswith(":"):
        problems.add(path, f"{name}: pseudo-headers cannot be modified")
    elif not _TOKEN.fullmatch(name):
        problems.add(path, f"{name!r} is not a valid header name")
    else:
        return lower
    return None


def _header_values(ops: Reader, key: str, *, request: bool) -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for name, path, value in ops.entries(key):
        header = _edited_header_name(ops.problems, path, name, request=request, adds=True)
        text = _header_value(ops.problems, path, value)
        if header is None or text is None:
            continue
        if header in found:
            ops.problems.add(path, f"{header!r} appears twice (header names ignore case)")
        found[header] = text
    return tuple(found.items())


def _header_operations(headers: Reader, key: str) -> HeaderOperations | None:
    ops = headers.child(key)
    if ops is None:
        return None
    request = key == "request"
    set_ = _header_values(ops, "set", request=request)
    add = _header_values(ops, "add", request=request)
    remove: list[str] = []
    for path, name in ops.strings("remove"):
        header = _edited_header_name(ops.problems, path, name, request=request, adds=False)
        if header is not None:
            remove.append(header)
    ops.done()
    return HeaderOperations(set=set_, add=add, remove=tuple(remove))


def _headers(r: Reader, key: str = "headers") -> Headers | None:
    headers = r.child(key)
    if headers is None:
        return None
    request = _header_operations(headers, "request")
    response = _header_operations(headers, "response")
    headers.done()
    return Headers(request=request, response=response)


# =========================================================================== shared fields


def _mesh_gateway_only(r: Reader, key: str = "gateways") -> None:
    for path, gateway in r.strings(key):
        if gateway != "mesh":
            r.problems.add(
                path,
                f"gateway {gateway!r}: not supported by inmesh "
                "(only the mesh gateway, 'mesh', applies inside a process)",
            )


def _exported_everywhere(r: Reader) -> None:
    for path, target in r.strings("exportTo"):
        if target != "*":
            r.problems.add(
                path, f"{target!r}: " + NOT_YET + " (every resource is visible everywhere, '*')"
            )


# =========================================================================== ServiceEntry & co


def _port_number(r: Reader, key: str, *, required: bool = False) -> int | None:
    return r.integer(key, required=required, low=1, high=65535)


def _protocol(r: Reader) -> str:
    text = r.string("protocol")
    if text is None:
        return "HTTP"
    protocol = text.upper()
    if protocol in _LATER_PROTOCOLS:
        r.problem("protocol", f"{text}: " + NOT_YET)
    elif protocol not in _PROTOCOLS:
        hint = suggestion(protocol, _PROTOCOLS)
        r.problem("protocol", f"unknown protocol {text!r} (one of {', '.join(_PROTOCOLS)}){hint}")
    return protocol


def _ports(spec: Reader) -> tuple[Port, ...]:
    ports: list[Port] = []
    names: set[str] = set()
    numbers: set[int] = set()
    for item in spec.children("ports", required=True):
        number = _port_number(item, "number", required=True)
        name = item.string("name", required=True)
        protocol = _protocol(item)
        target = _port_number(item, "targetPort")
        item.done()
        if name is not None:
            if not _is_dns_label(name):
                item.problem("name", f"{name!r} is not a valid port name ({_LABEL_RULE})")
            elif name in names:
                item.problem("name", f"port name {name!r} is already defined")
            names.add(name)
        if number is not None:
            if number in numbers:
                item.problem("number", f"port {number} is already defined")
            numbers.add(number)
        ports.append(
            Port(number=number or 0, name=name or "", protocol=protocol, target_port=target)
        )
    return tuple(ports)


def _address(r: Reader, *, resolution: str | None) -> str:
    address = r.string("address", required=True)
    if address is None:
        return ""
    if address.startswith("unix://"):
        r.problem("address", "unix domain socket addresses are " + NOT_YET)
    elif _is_ip(address):
        return address
    elif resolution == "STATIC":
        r.problem("address", f"{address!r} is not an IP address (resolution STATIC)")
    elif _domain_problem(address.lower(), wildcard=False) is not None:
        r.problem("address", f"{address!r} is not an IP address or a host name")
    return address.lower()


def _workload(
    r: Reader, *, resolution: str | None = None, port_names: Collection[str] | None = None
) -> WorkloadSpec:
    """A WorkloadEntry's spec, or one of a ServiceEntry's ``endpoints`` (with its ports)."""
    address = _address(r, resolution=resolution)
    ports: dict[str, int] = {}
    for name, path, number in r.entries("ports"):
        if not _is_dns_label(name):
            r.problems.add(path, f"{name!r} is not a valid port name ({_LABEL_RULE})")
        elif port_names is not None and name not in port_names:
            r.problems.add(
                path,
                f"port {name!r} is not one of the ServiceEntry's ports "
                f"({', '.join(sorted(port_names)) or 'none'})",
            )
        if isinstance(number, bool) or not isinstance(number, int):
            r.problems.add(path, "must be an integer")
        elif (problem := range_problem(number, 1, 65535)) is not None:
            r.problems.add(path, problem)
        else:
            ports[name] = number
    labels = _labels(r, "labels")
    locality = r.string("locality") or ""
    if locality:
        problem = _locality_problem(locality, wildcard=False)
        if problem is not None:
            r.problem("locality", problem)
    # Istio (and Envoy) treat an unset or zero endpoint weight as 1.
    weight = r.integer("weight", low=0, high=_MAX_ENDPOINT_WEIGHT) or 1
    service_account = r.string("serviceAccount")
    r.done()
    return WorkloadSpec(
        address=address,
        ports=MappingProxyType(ports),
        labels=labels,
        locality=locality,
        weight=weight,
        service_account=service_account,
    )


def _service_entry(spec: Reader, meta: _Meta) -> ServiceEntry:
    hosts = _hosts(spec, "hosts")
    ports = _ports(spec)
    resolution = spec.choice("resolution", ("STATIC", "DNS"), notes=_RESOLUTION_NOTES) or "STATIC"
    location = spec.choice("location", ("MESH_EXTERNAL", "MESH_INTERNAL")) or "MESH_EXTERNAL"
    # Endpoint ports are checked against the entry's only when every port has a name, so a
    # missing port or name is reported once rather than again by every endpoint.
    named = ports and all(port.name for port in ports)
    names = {port.name for port in ports} if named else None
    endpoints = tuple(
        _workload(item, resolution=resolution, port_names=names)
        for item in spec.children("endpoints", _WORKLOAD_NOTES)
    )
    selector: Mapping[str, str] | None = None
    workload_selector = spec.child("workloadSelector")
    if workload_selector is not None:
        selector = _labels(workload_selector, "labels")
        workload_selector.done()
        if spec.present("endpoints"):
            spec.problem("workloadSelector", "workloadSelector and endpoints are exclusive")
        if resolution != "STATIC":
            spec.problem("workloadSelector", "workloadSelector needs resolution STATIC")
    if resolution == "DNS" and not spec.present("endpoints"):
        for position, host in enumerate(hosts):
            if host.startswith("*"):
                spec.problem(
                    "hosts",
                    f"{host!r} (hosts[{position}]): with resolution DNS and no endpoints, "
                    "every host must be a name to resolve",
                )
    if len(hosts) > 1 and any(port.protocol not in _HTTP_PROTOCOLS for port in ports):
        spec.problem("hosts", "several hosts need HTTP or TLS ports to tell them apart")
    _exported_everywhere(spec)
    spec.done()
    return ServiceEntry(
        name=meta.name,
        namespace=meta.namespace,
        origin=meta.origin,
        hosts=hosts,
        ports=ports,
        resolution="DNS" if resolution == "DNS" else "STATIC",
        location="MESH_INTERNAL" if location == "MESH_INTERNAL" else "MESH_EXTERNAL",
        endpoints=endpoints,
        workload_selector=selector,
    )


def _workload_entry(spec: Reader, meta: _Meta) -> WorkloadEntry:
    return WorkloadEntry(
        name=meta.name, namespace=meta.namespace, origin=meta.origin, spec=_workload(spec)
    )


# =========================================================================== VirtualService


def _virtual_service(spec: Reader, meta: _Meta) -> VirtualService:
    hosts = _hosts(spec, "hosts", ip=True)
    for later, host in enumerate(hosts):
        for earlier in hosts[:later]:
            if _covers(earlier, host) or _covers(host, earlier):
                spec.problem("hosts", f"duplicate hosts: {earlier!r} and {host!r} overlap")
    _mesh_gateway_only(spec)
    _exported_everywhere(spec)
    routes = tuple(_http_route(item) for item in spec.children("http", _HTTP_ROUTE_NOTES))
    if not routes and not spec.present("tcp") and not spec.present("tls"):
        spec.problem("http", "a VirtualService needs at least one http route")
    spec.done()
    return VirtualService(
        name=meta.name, namespace=meta.namespace, origin=meta.origin, hosts=hosts, http=routes
    )


def _covers(pattern: str, host: str) -> bool:
    return pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:]))


def _http_route(r: Reader) -> HTTPRoute:
    name = r.string("name") or ""
    matches = tuple(_http_match(item) for item in r.children("match", _MATCH_NOTES))
    route = _route_destinations(r)
    redirect = _redirect(r)
    rewrite = _rewrite(r)
    headers = _headers(r)
    timeout = _duration(r, "timeout")
    retries = _retries(r, "retries")
    fault = _fault(r)
    mirror, mirror_percentage = _mirror(r)
    has_route, has_redirect = r.present("route"), r.present("redirect")
    if has_route and has_redirect:
        r.problem(None, "route and redirect are exclusive: set one")
    elif not (has_route or has_redirect or r.present("delegate") or r.present("directResponse")):
        # (A delegate or directResponse is reported by name as unsupported instead.)
        r.problem(None, "set route or redirect")
    # Istio refuses these two beside a redirect; it accepts timeout, retries and mirror
    # there (they have nothing to act on), and so does inmesh.
    if has_redirect and r.present("rewrite"):
        r.problem("rewrite", "rewrite cannot be used with redirect")
    if has_redirect and r.present("fault"):
        r.problem("fault", "fault cannot be used with redirect")
    r.done()
    return HTTPRoute(
        name=name,
        match=matches,
        route=route,
        redirect=redirect,
        rewrite=rewrite,
        headers=headers,
        timeout=timeout,
        retries=retries,
        fault=fault,
        mirror=mirror,
        mirror_percentage=mirror_percentage,
        path=render_path(r.path),
    )


def _http_match(m: Reader) -> HTTPMatch:
    name = m.string("name") or ""
    uri = _match_field(m, "uri", empty_prefix=True)  # Envoy allows prefix "" for paths only
    scheme = _match_field(m, "scheme")
    method = _match_field(m, "method")
    authority = _match_field(m, "authority")
    headers = _match_map(m, "headers", headers=True)
    without_headers = _match_map(m, "withoutHeaders", headers=True)
    query_params = _match_map(m, "queryParams", headers=False)
    ignore_uri_case = m.boolean("ignoreUriCase") or False
    port = _port_number(m, "port")
    source_labels = _labels(m, "sourceLabels")
    _mesh_gateway_only(m)
    m.done()
    return HTTPMatch(
        name=name,
        uri=uri,
        scheme=scheme,
        method=method,
        authority=authority,
        headers=headers,
        without_headers=without_headers,
        query_params=query_params,
        ignore_uri_case=ignore_uri_case,
        port=port,
        source_labels=source_labels,
    )


def _route_destinations(r: Reader) -> tuple[RouteDestination, ...]:
    items = r.children("route")
    if r.body.get("route") == []:
        r.problem("route", "needs at least one destination")
    read: list[tuple[Destination, int | None, Headers | None]] = []
    for item in items:
        target = item.child("destination", required=True)
        destination = _destination(target) if target is not None else Destination(host="")
        weight = item.integer("weight", low=0, high=_MAX_WEIGHT)
        headers = _headers(item)
        item.done()
        read.append((destination, weight, headers))
    if len(read) == 1:
        # One destination takes all the traffic whatever its weight says (Istio: 100).
        destination, _, headers = read[0]
        return (RouteDestination(destination=destination, weight=100, headers=headers),)
    if read and sum(weight or 0 for _, weight, _ in read) == 0:
        r.problem("route", "the destinations' weights must not all be 0")
    return tuple(
        RouteDestination(destination=destination, weight=weight or 0, headers=headers)
        for destination, weight, headers in read
    )


def _destination(d: Reader) -> Destination:
    text = d.string("host", required=True)
    host = _host(d.problems, d.at("host"), text) if text is not None else None
    subset = d.string("subset") or None  # "" is Istio's "no subset"
    if subset is not None and not _is_dns_label(subset):
        d.problem("subset", f"{subset!r} is not a valid subset name ({_LABEL_RULE})")
    port: int | None = None
    selector = d.child("port")
    if selector is not None:
        port = _port_number(selector, "number", required=True)
        selector.done()
    d.done()
    return Destination(host=host or "", subset=subset, port=port)


def _redirect(route: Reader) -> HTTPRedirect | None:
    r = route.child("redirect", _REDIRECT_NOTES)
    if r is None:
        return None
    uri = r.string("uri")
    authority = r.string("authority")
    port = _port_number(r, "port")
    scheme = r.string("scheme")
    if scheme is not None and scheme not in {"http", "https"}:
        r.problem("scheme", f"{scheme!r} is not 'http' or 'https'")
    code = r.integer("redirectCode", low=300, high=399)
    if not (uri or authority or scheme or r.present("port") or r.present("derivePort")):
        r.problem(None, "a redirect needs at least one of uri, authority, scheme, port")
    r.done()
    return HTTPRedirect(
        uri=uri, authority=authority, port=port, scheme=scheme, redirect_code=code or 301
    )


def _rewrite(route: Reader) -> HTTPRewrite | None:
    r = route.child("rewrite")
    if r is None:
        return None
    uri = r.string("uri")
    authority = r.string("authority")
    uri_regex: tuple[str, str] | None = None
    regex = r.child("uriRegexRewrite")
    if regex is not None:
        pattern = regex.string("match", required=True)
        replacement = regex.string("rewrite", required=True)
        if pattern:
            problem = _regex_problem(pattern)
            if problem is not None:
                regex.problem("match", problem)
        regex.done()
        uri_regex = (pattern or "", replacement or "")
        if uri:
            r.problem(None, "uri and uriRegexRewrite are exclusive: set one")
    elif not uri and not authority:
        r.problem(None, "a rewrite needs at least one of uri, uriRegexRewrite, authority")
    r.done()
    return HTTPRewrite(uri=uri or None, authority=authority or None, uri_regex=uri_regex)


# =========================================================================== failure management

# Envoy's retry conditions (x-envoy-retry-on and x-envoy-retry-grpc-on) that inmesh
# implements, and those Istio accepts that it does not (yet).
_RETRY_ON: Final = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
_LATER_RETRY_ON: Final = frozenset(
    {"envoy-ratelimited", "retriable-headers", "reset-before-request", "http3-post-connect-failure"}
)
_ABORT_KINDS: Final = ("httpStatus", "grpcStatus", "http2Error")
_MIRROR_PERCENT_KEYS: Final = ("mirrorPercentage", "mirrorPercent", "mirror_percent")
# Envoy keeps a fault's percentage in millionths (FractionalPercent), so Istio refuses a
# non-zero value below one millionth rather than let it round to zero.
_LEAST_FAULT_PERCENT: Final = 0.0001


def _retries(owner: Reader, key: str) -> HTTPRetry | None:
    """A VirtualService ``retries`` (or the mesh's ``defaultHttpRetryPolicy``).

    Istio's ``attempts`` is a plain int32, so an absent one is 0: retries off. Istio
    refuses 0 beside ``retryOn`` or ``perTryTimeout``, which would have nothing to
    apply to; ``retries: {}`` alone is a valid way of saying "no retries".
    """
    r = owner.child(key, _RETRY_NOTES)
    if r is None:
        return None
    attempts = r.integer("attempts", low=0, high=_MAX_INT32)
    per_try_timeout = _duration(r, "perTryTimeout")
    text = r.string("retryOn") or ""  # "" is protobuf's unset: the default conditions
    retry_on, codes = _retry_on(r, text) if text else (DEFAULT_RETRY_ON, ())
    settings = " and ".join(name for name in ("perTryTimeout", "retryOn") if r.body.get(name))
    if settings and not r.present("attempts"):
        r.problem(
            None,
            f"{settings} set without attempts, which Istio reads as 0 (no retries): "
            "set attempts to 1 or more",
        )
    elif settings and attempts == 0:
        r.problem(
            "attempts",
            f"0 turns retries off, which leaves {settings} nothing to do: "
            f"set attempts to 1 or more, or remove {settings}",
        )
    r.done()
    return HTTPRetry(
        attempts=attempts or 0,
        per_try_timeout=per_try_timeout,
        retry_on=retry_on,
        retry_status_codes=codes,
    )


def _retry_on(r: Reader, text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``retryOn``'s comma-separated conditions and plain status codes, each kept once."""
    conditions: dict[str, None] = {}  # dicts as ordered sets: the order written is kept
    codes: dict[int, None] = {}
    for token in text.split(","):
        if token.isascii() and token.isdigit():
            code = int(token)
            if 100 <= code <= 599:
                codes[code] = None
            else:
                r.problem("retryOn", f"{token}: a status code is between 100 and 599")
        elif token in _RETRY_ON:
            conditions[token] = None
        elif token in _LATER_RETRY_ON:
            r.problem("retryOn", f"{token}: {NOT_YET}")
        elif not token.strip():
            r.problem("retryOn", f"{text!r} has an empty condition: remove the stray comma")
        elif token != token.strip():
            r.problem("retryOn", f"{token!r}: write the conditions without spaces ('5xx,reset')")
        else:
            r.problem(
                "retryOn",
                f"{token!r} is not a retry condition nor an HTTP status code"
                f"{suggestion(token, _RETRY_ON)}",
            )
    # Istio adds the condition that makes Envoy look at the codes when only codes are given.
    if codes:
        conditions["retriable-status-codes"] = None
    return tuple(conditions), tuple(codes)


def _percentage(owner: Reader, key: str, *, fault: bool) -> float | None:
    """Istio's ``Percent`` message, ``{value: 0-100}``."""
    r = owner.child(key)
    if r is None:
        return None
    value = r.number("value", required=True, low=0, high=100)
    if fault and value is not None and 0 < value < _LEAST_FAULT_PERCENT:
        r.problem("value", f"{value} is too small: 0 or at least {_LEAST_FAULT_PERCENT}")
    r.done()
    return value


def _percent_field(r: Reader, key: str, legacy: Sequence[str], *, fault: bool) -> float | None:
    """``key`` (a ``Percent``) or one of its deprecated integer spellings, not both."""
    value = _percentage(r, key, fault=fault)
    seen = key if r.present(key) else None
    for old in legacy:
        number = r.integer(old, low=0, high=100)
        if not r.present(old):
            continue
        if seen is not None:
            r.problem(old, f"{old} is the deprecated form of {key}: set only {seen}")
            continue
        seen = old
        if number is not None:
            value = float(number)
    return value


def _fault(route: Reader) -> HTTPFault | None:
    r = route.child("fault")
    if r is None:
        return None
    delay = _fault_delay(r)
    abort = _fault_abort(r)
    if not (r.present("delay") or r.present("abort")):
        r.problem(None, "a fault needs a delay, an abort or both")
    r.done()
    return HTTPFault(delay=delay, abort=abort)


def _fault_delay(fault: Reader) -> FaultDelay | None:
    r = fault.child("delay", _DELAY_NOTES)
    if r is None:
        return None
    # (An exponentialDelay in its place is reported by name as unsupported instead.)
    fixed_delay = _duration(r, "fixedDelay", required=not r.present("exponentialDelay"))
    percentage = _percent_field(r, "percentage", ("percent",), fault=True)
    r.done()
    return FaultDelay(fixed_delay=fixed_delay or 0.0, percentage=percentage)


def _fault_abort(fault: Reader) -> FaultAbort | None:
    r = fault.child("abort", _ABORT_NOTES)
    if r is None:
        return None
    http_status = r.integer("httpStatus", low=200, high=599)
    grpc_status: str | None = None
    name = r.string("grpcStatus", non_empty=True)
    if name is not None:
        if name.upper() in GRPC_STATUS_NAMES:
            grpc_status = name.upper()
        else:
            r.problem(
                "grpcStatus",
                f"{name!r} is not a gRPC status name (e.g. UNAVAILABLE)"
                f"{suggestion(name, GRPC_STATUS_NAMES)}",
            )
    percentage = _percentage(r, "percentage", fault=True)
    given = [kind for kind in _ABORT_KINDS if r.present(kind)]
    if len(given) > 1:
        r.problem(None, f"set only one of httpStatus, grpcStatus (found {', '.join(given)})")
    elif not given:
        r.problem(None, "set one of httpStatus, grpcStatus")
    r.done()
    return FaultAbort(http_status=http_status, grpc_status=grpc_status, percentage=percentage)


def _mirror(route: Reader) -> tuple[Destination | None, float | None]:
    target = route.child("mirror")
    mirror = _destination(target) if target is not None else None
    primary, *legacy = _MIRROR_PERCENT_KEYS
    percentage = _percent_field(route, primary, legacy, fault=False)
    if not route.present("mirror"):
        for key in _MIRROR_PERCENT_KEYS:
            if route.present(key):
                route.problem(key, f"{key} without a mirror: set mirror too")
                break
    return mirror, percentage


# =========================================================================== DestinationRule


def _destination_rule(spec: Reader, meta: _Meta) -> DestinationRule:
    text = spec.string("host", required=True)
    host = _host(spec.problems, spec.at("host"), text) if text is not None else None
    policy = _traffic_policy(spec)
    subsets: list[Subset] = []
    names: set[str] = set()
    for item in spec.children("subsets"):
        name = item.string("name", required=True)
        if name is not None:
            if not _is_dns_label(name):
                item.problem("name", f"{name!r} is not a valid subset name ({_LABEL_RULE})")
            elif name in names:
                item.problem("name", f"duplicate subset name {name!r}")
            names.add(name)
        labels = _labels(item, "labels")
        subset_policy = _traffic_policy(item)
        item.done()
        subsets.append(Subset(name=name or "", labels=labels, traffic_policy=subset_policy))
    _exported_everywhere(spec)
    spec.done()
    return DestinationRule(
        name=meta.name,
        namespace=meta.namespace,
        origin=meta.origin,
        host=host or "",
        traffic_policy=policy,
        subsets=tuple(subsets),
    )


def _traffic_policy(owner: Reader) -> TrafficPolicy | None:
    r = owner.child("trafficPolicy", _TRAFFIC_POLICY_NOTES)
    if r is None:
        return None
    if not r:
        r.problem(None, "a traffic policy must set at least one field")
    load_balancer = _load_balancer(r)
    connection_pool = _connection_pool(r)
    outlier_detection = _outlier_detection(r)
    retry_budget = _retry_budget(r)
    r.done()
    return TrafficPolicy(
        load_balancer=load_balancer,
        connection_pool=connection_pool,
        outlier_detection=outlier_detection,
        retry_budget=retry_budget,
    )


def _limit(r: Reader, key: str) -> int | None:
    """A connection-pool limit: an int32 ≥ 0 where 0, protobuf's unset, means unlimited."""
    return r.integer(key, low=0, high=_MAX_INT32) or None


def _connection_pool(policy: Reader) -> ConnectionPoolSettings | None:
    r = policy.child("connectionPool")
    if r is None:
        return None
    if not (r.present("tcp") or r.present("http")):
        r.problem(None, "a connection pool needs tcp, http or both")
    tcp = TCPSettings()
    tcp_reader = r.child("tcp", _TCP_POOL_NOTES)
    if tcp_reader is not None:
        tcp = TCPSettings(
            max_connections=_limit(tcp_reader, "maxConnections"),
            connect_timeout=_duration(tcp_reader, "connectTimeout") or tcp.connect_timeout,
        )
        tcp_reader.done()
    http = HTTPSettings()
    http_reader = r.child("http", _HTTP_POOL_NOTES)
    if http_reader is not None:
        per_connection = _limit(http_reader, "maxRequestsPerConnection")
        if per_connection is not None and per_connection > 1:
            # httpcore cannot retire a connection after N requests; 1 means no keep-alive.
            http_reader.problem(
                "maxRequestsPerConnection",
                "only 1 (a new connection per request) is supported by inmesh yet",
            )
        http = HTTPSettings(
            http1_max_pending_requests=_limit(http_reader, "http1MaxPendingRequests"),
            http2_max_requests=_limit(http_reader, "http2MaxRequests"),
            max_requests_per_connection=per_connection,
            max_retries=_limit(http_reader, "maxRetries"),
            idle_timeout=_duration(http_reader, "idleTimeout"),
        )
        http_reader.done()
    r.done()
    return ConnectionPoolSettings(tcp=tcp, http=http)


def _outlier_detection(policy: Reader) -> OutlierDetection | None:
    r = policy.child("outlierDetection", _OUTLIER_NOTES)
    if r is None:
        return None
    default = OutlierDetection()
    # Wrapped integers in Istio's API: absent takes Envoy's default, 0 turns the check off.
    five_xx = r.integer("consecutive5xxErrors", low=0, high=_MAX_UINT32)
    if five_xx is None:
        five_xx = default.consecutive_5xx_errors
    gateway = r.integer("consecutiveGatewayErrors", low=0, high=_MAX_UINT32)
    interval = _duration(r, "interval")
    base_ejection_time = _duration(r, "baseEjectionTime")
    # Plain integers: Istio passes 0 on as unset, so maxEjectionPercent 0 is Envoy's 10.
    max_ejection = r.integer("maxEjectionPercent", low=0, high=100)
    min_health = r.integer("minHealthPercent", low=0, high=100)
    r.done()
    return OutlierDetection(
        consecutive_5xx_errors=five_xx or None,
        consecutive_gateway_errors=gateway or None,
        interval=interval or default.interval,
        base_ejection_time=base_ejection_time or default.base_ejection_time,
        max_ejection_percent=float(max_ejection) if max_ejection else default.max_ejection_percent,
        min_health_percent=float(min_health or 0),
    )


def _retry_budget(policy: Reader) -> RetryBudget | None:
    r = policy.child("retryBudget")
    if r is None:
        return None
    default = RetryBudget()
    percent = r.number("percent", low=0, high=100)
    min_retry_concurrency = r.integer("minRetryConcurrency", low=0, high=_MAX_UINT32)
    budget_interval = _duration(r, "budgetInterval", zero=True)  # 0: active requests only
    r.done()
    return RetryBudget(
        percent=default.percent if percent is None else percent,
        min_retry_concurrency=(
            default.min_retry_concurrency
            if min_retry_concurrency is None
            else min_retry_concurrency
        ),
        budget_interval=budget_interval,
    )


def _load_balancer(policy: Reader) -> LoadBalancerSettings | None:
    r = policy.child("loadBalancer", _LOAD_BALANCER_NOTES)
    if r is None:
        return None
    simple_name = r.choice("simple", _SIMPLE, notes=_SIMPLE_NOTES)
    consistent_hash = _consistent_hash(r)
    if r.present("simple") and r.present("consistentHash"):
        r.problem(None, "simple and consistentHash are exclusive: set one")
    locality = _locality_lb(r)
    r.done()
    return LoadBalancerSettings(
        simple=None if simple_name is None else _SIMPLE[simple_name],
        consistent_hash=consistent_hash,
        locality=locality,
    )


def _consistent_hash(lb: Reader) -> ConsistentHash | None:
    r = lb.child("consistentHash")
    if r is None:
        return None
    keys: list[HashKey] = []
    header = r.string("httpHeaderName", non_empty=True)
    if header is not None:
        if _TOKEN.fullmatch(header):
            keys.append(HeaderHashKey(header.lower()))
        else:
            r.problem("httpHeaderName", f"{header!r} is not a valid header name")
    cookie = r.child("httpCookie", _COOKIE_NOTES)
    if cookie is not None:
        cookie_name = cookie.string("name", required=True)
        cookie.done()
        keys.append(CookieHashKey(cookie_name or ""))
    query = r.string("httpQueryParameterName", non_empty=True)
    if query is not None:
        keys.append(QueryHashKey(query))
    source_ip = r.boolean("useSourceIp")
    if source_ip:
        keys.append(SourceIpHashKey())
    # Counted from what is written, so that a bad value is not also reported as missing.
    given = [key for key in _HASH_KEYS if r.present(key) and r.body[key] is not False]
    if len(given) > 1:
        r.problem(None, f"set only one of {', '.join(_HASH_KEYS)} (found {', '.join(given)})")
    elif not given:
        r.problem(None, f"set one of {', '.join(_HASH_KEYS)}")
    table = _hash_table(r)
    r.done()
    return ConsistentHash(key=keys[0] if keys else SourceIpHashKey(), table=table)


def _hash_table(r: Reader) -> RingHash | Maglev:
    """``ringHash``, ``maglev`` or the deprecated ``minimumRingSize``: at most one."""
    # Zero is protobuf's "unset" for these sizes, so it means the default, as in Istio.
    legacy = r.integer("minimumRingSize", low=0, high=_MAX_RING)
    ring = r.child("ringHash")
    maglev = r.child("maglev")
    if ring is not None and maglev is not None:
        r.problem(None, "ringHash and maglev are exclusive: set one")
    if legacy and (ring is not None or maglev is not None):
        r.problem("minimumRingSize", "only one of minimumRingSize or maglev/ringHash can be set")
    if maglev is not None:
        table_size = maglev.integer("tableSize", low=0, high=_MAX_MAGLEV) or Maglev().table_size
        if not _is_prime(table_size):
            maglev.problem("tableSize", f"{table_size} is not a prime number (Maglev needs one)")
        maglev.done()
        return Maglev(table_size)
    ring_size = legacy
    if ring is not None:
        ring_size = ring.integer("minimumRingSize", low=0, high=_MAX_RING)
        ring.done()
    return RingHash(ring_size or RingHash().minimum_ring_size)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % factor for factor in range(3, int(n**0.5) + 1, 2))


def _locality_lb(lb: Reader) -> LocalityLbSetting | None:
    r = lb.child("localityLbSetting")
    if r is None:
        return None
    enabled = r.boolean("enabled")
    distribute = _distribute(r)
    failover = _failover(r)
    priority: list[str] = []
    for path, label in r.strings("failoverPriority"):
        if not label:
            r.problems.add(path, "must not be empty")
        elif failover and label.partition("=")[0] in _TOPOLOGY_LABELS:
            r.problems.add(
                path, f"{label!r} cannot be used with failover (it orders by region itself)"
            )
        priority.append(label)
    if distribute and failover:
        r.problem(None, "distribute and failover are exclusive: set one")
    r.done()
    return LocalityLbSetting(
        enabled=enabled is not False,
        distribute=distribute,
        failover=failover,
        failover_priority=tuple(priority),
    )


def _distribute(lb: Reader) -> tuple[Distribute, ...]:
    rules: list[Distribute] = []
    sources: list[tuple[str, ...]] = []
    for item in lb.children("distribute"):
        source = item.string("from", required=True) or ""
        if source:
            problem = _locality_problem(source, wildcard=True)
            if problem is not None:
                item.problem("from", problem)
            elif any(_overlap(_locality_parts(source), seen) for seen in sources):
                item.problem("from", f"{source!r} overlaps an earlier 'from'")
            sources.append(_locality_parts(source))
        targets: list[tuple[str, int]] = []
        seen_targets: list[tuple[str, ...]] = []
        for name, path, weight in item.entries("to", required=True):
            problem = _locality_problem(name, wildcard=True)
            if problem is None and any(_overlap(_locality_parts(name), s) for s in seen_targets):
                problem = f"{name!r} overlaps another locality of this 'to'"
            if problem is not None:
                item.problems.add(path, problem)
            seen_targets.append(_locality_parts(name))
            if isinstance(weight, bool) or not isinstance(weight, int):
                item.problems.add(path, "must be an integer")
            elif (out := range_problem(weight, 1, 100)) is not None:
                item.problems.add(path, out)
            else:
                targets.append((name, weight))
        total = sum(weight for _, weight in targets)
        if targets and len(targets) == len(seen_targets) and total != 100:
            item.problem("to", f"the weights must add up to 100 (they add up to {total})")
        item.done()
        rules.append(Distribute(from_=source, to=tuple(targets)))
    return tuple(rules)


def _failover(lb: Reader) -> tuple[Failover, ...]:
    rules: list[Failover] = []
    for item in lb.children("failover"):
        regions = [item.string(key, required=True) or "" for key in ("from", "to")]
        for key, region in zip(("from", "to"), regions, strict=True):
            if "/" in region:
                item.problem(key, f"{region!r}: failover names regions only (no '/')")
            elif "*" in region:
                item.problem(key, f"{region!r}: a failover region cannot be a wildcard")
        if regions[0] and regions[0] == regions[1]:
            item.problem("to", "failover must lead to a different region")
        item.done()
        rules.append(Failover(from_=regions[0], to=regions[1]))
    return tuple(rules)


# =========================================================================== MeshConfig


def _mesh_config(spec: Reader, meta: _Meta) -> MeshConfig:
    outbound = _outbound_traffic_policy(spec)
    default_retry = _retries(spec, "defaultHttpRetryPolicy") or DEFAULT_RETRY
    retry_budget = _ratio_retry_budget(spec)
    allow_header_faults = spec.boolean("allowHeaderFaults") or False
    mirror_max_in_flight = _mirroring(spec)
    spec.done()
    return MeshConfig(
        name=meta.name,
        origin=meta.origin,
        outbound_traffic_policy=outbound,
        default_http_retry_policy=default_retry,
        retry_budget=retry_budget,
        allow_header_faults=allow_header_faults,
        mirror_max_in_flight=mirror_max_in_flight,
    )


def _ratio_retry_budget(spec: Reader) -> RatioRetryBudget | None:
    """inmesh's mesh-wide budget (Linkerd's ``retryBudget`` shape); on unless disabled."""
    default = RatioRetryBudget()
    r = spec.child("retryBudget")
    if r is None:
        return default
    ratio = r.number("retryRatio", low=0, high=1)
    floor = r.number("minRetriesPerSecond", low=0)
    ttl = _duration(r, "ttl")
    enabled = r.boolean("enabled")
    r.done()
    if enabled is False:
        return None
    return RatioRetryBudget(
        retry_ratio=default.retry_ratio if ratio is None else ratio,
        min_retries_per_second=default.min_retries_per_second if floor is None else floor,
        ttl=ttl or default.ttl,
    )


def _mirroring(spec: Reader) -> int:
    default = MeshConfig().mirror_max_in_flight
    r = spec.child("mirroring")
    if r is None:
        return default
    max_in_flight = r.integer("maxInFlight", low=1, high=_MAX_INT32)
    r.done()
    return default if max_in_flight is None else max_in_flight


def _outbound_traffic_policy(spec: Reader) -> OutboundMode:
    r = spec.child("outboundTrafficPolicy", _OUTBOUND_NOTES)
    if r is None:
        return OutboundMode.ALLOW_ANY
    mode = r.choice("mode", [m.value for m in OutboundMode])
    r.done()
    return OutboundMode.ALLOW_ANY if mode is None else OutboundMode(mode)


# =========================================================================== dispatch

_KINDS: Final[Mapping[str, _Kind]] = MappingProxyType(
    {
        "ServiceEntry": _Kind(_NETWORKING_VERSIONS, _service_entry, _SERVICE_ENTRY_NOTES),
        "WorkloadEntry": _Kind(_NETWORKING_VERSIONS, _workload_entry, _WORKLOAD_NOTES),
        "VirtualService": _Kind(_NETWORKING_VERSIONS, _virtual_service, _VIRTUAL_SERVICE_NOTES),
        "DestinationRule": _Kind(_NETWORKING_VERSIONS, _destination_rule, _DESTINATION_RULE_NOTES),
        "MeshConfig": _Kind(_INMESH_VERSIONS, _mesh_config, _MESH_CONFIG_NOTES, mesh_wide=True),
    }
)
