"""Parsing Istio's resources into inmesh's model: values, defaults, and every refusal."""

from __future__ import annotations

import copy
import pickle
import re
import textwrap
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from inmesh.config import (
    ConsistentHash,
    CookieHashKey,
    Destination,
    DestinationRule,
    Distribute,
    Document,
    Failover,
    HeaderHashKey,
    HeaderOperations,
    Headers,
    HTTPMatch,
    HTTPRedirect,
    HTTPRewrite,
    HTTPRoute,
    LoadBalancerSettings,
    LocalityLbSetting,
    Maglev,
    MeshConfig,
    Origin,
    OutboundMode,
    Port,
    QueryHashKey,
    Resource,
    RingHash,
    RouteDestination,
    ServiceEntry,
    SimpleLB,
    SourceIpHashKey,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
    WorkloadEntry,
    WorkloadSpec,
    parse_documents,
    parse_duration,
)
from inmesh.config.model import (
    DEFAULT_RETRY,
    DEFAULT_RETRY_ON,
    ConnectionPoolSettings,
    FaultAbort,
    FaultDelay,
    HTTPFault,
    HTTPRetry,
    HTTPSettings,
    OutlierDetection,
    RatioRetryBudget,
    RetryBudget,
    TCPSettings,
)
from inmesh.config.yaml import documents_from_text
from inmesh.exceptions import ConfigError, Problem

SOURCE = "mesh.d/test.yaml"


def parse(text: str, source: str = SOURCE) -> list[Resource]:
    return parse_documents(documents_from_text(textwrap.dedent(text), source))


def problems_of(text: str) -> tuple[Problem, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.problems


def one(text: str) -> Resource:
    (resource,) = parse(text)
    return resource


# --------------------------------------------------------------------------- bases
# One valid resource of each kind; a rule case changes one field of one of them.

BASES: dict[str, dict[str, Any]] = {
    "se": {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "ratings"},
        "spec": {
            "hosts": ["ratings.example.com"],
            "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
            "resolution": "STATIC",
            "endpoints": [{"address": "10.0.0.1", "ports": {"http": 9080}}],
        },
    },
    "we": {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": "ratings-1"},
        "spec": {"address": "10.0.0.2", "labels": {"app": "ratings"}},
    },
    "vs": {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "match": [{"uri": {"prefix": "/"}}],
                    "route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                }
            ],
        },
    },
    "dr": {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews"},
        "spec": {
            "host": "reviews",
            "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        },
    },
    "mc": {
        "apiVersion": "inmesh.io/v1",
        "kind": "MeshConfig",
        "metadata": {"name": "default"},
        "spec": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}},
    },
}

DELETE = object()
_STEP = re.compile(r"([A-Za-z_][\w-]*)|\[(\d+)\]")


def changed(base: str, path: str, value: object) -> str:
    """The YAML of ``BASES[base]`` with the field at ``path`` set to ``value`` (or deleted)."""
    body = copy.deepcopy(BASES[base])
    steps: list[str | int] = [
        name if name else int(index) for name, index in _STEP.findall(path.replace(".", " "))
    ]
    parent: Any = body
    for step in steps[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[steps[-1]]
    else:
        parent[steps[-1]] = value
    return yaml.safe_dump(body, sort_keys=False)


def test_every_base_is_valid() -> None:
    """The resources the rule cases start from parse cleanly, one model value each."""
    for base in BASES.values():
        assert len(parse(yaml.safe_dump(base, sort_keys=False))) == 1


# --------------------------------------------------------------------------- rules

Case = tuple[str, str, object, str, str]


def rule(base: str, field: str, value: object, message: str, at: str | None = None) -> Case:
    """Set ``field`` of ``BASES[base]`` to ``value``: one problem, at ``at`` (or ``field``)."""
    return (base, field, value, field if at is None else at, message)


M = "spec.http[0].match[0]"
R = "spec.http[0].route[0]"
H = "spec.http[0].headers"
LB = "spec.trafficPolicy.loadBalancer"
CH = f"{LB}.consistentHash"
LOC = f"{LB}.localityLbSetting"
SE_SPEC: dict[str, Any] = BASES["se"]["spec"]
KINDS = "ServiceEntry, WorkloadEntry, VirtualService, DestinationRule, MeshConfig"
YET = "not supported by inmesh yet"

CASES: list[Case] = [
    # ---- apiVersion, kind, metadata
    rule("vs", "kind", "Gateway", f"unknown kind 'Gateway' (inmesh reads {KINDS})"),
    rule("vs", "kind", "PeerAuthentication", f"PeerAuthentication is {YET}"),
    rule("vs", "kind", "AuthorizationPolicy", f"AuthorizationPolicy is {YET}"),
    rule("vs", "kind", "VirtualServce", "did you mean 'VirtualService'?"),
    rule("vs", "kind", DELETE, "required"),
    rule("vs", "kind", 3, "must be a string"),
    rule("vs", "apiVersion", DELETE, "required"),
    rule("vs", "apiVersion", "networking.istio.io/v2", "is not an apiVersion of VirtualService"),
    rule("mc", "apiVersion", "networking.istio.io/v1", "(one of inmesh.io/v1)"),
    rule("dr", "apiVersion", "inmesh.io/v1", "not an apiVersion of DestinationRule"),
    rule("vs", "metadata", DELETE, "required"),
    rule("vs", "metadata.name", DELETE, "required"),
    rule("vs", "metadata.name", "Reviews_1", "DNS-1123 subdomain"),
    rule("vs", "metadata.namespace", "Bad.NS", "not a valid namespace"),
    rule("vs", "metadata.generateName", "reviews-", "give the resource a name"),
    rule("vs", "metadata.owner", "me", "unknown field 'owner'"),
    rule("vs", "spec", DELETE, "required"),
    rule("vs", "spec", ["hosts"], "must be a mapping"),
    rule("vs", "spce", {}, "unknown field 'spce' (did you mean 'spec'?)"),
    rule("mc", "metadata.namespace", "istio-system", "a MeshConfig is mesh-wide"),
    # ---- wrong types
    rule("vs", f"{R}.weight", "50", "must be an integer"),
    rule("vs", f"{R}.weight", True, "must be an integer"),
    rule("vs", f"{R}.weight", 50.0, "must be an integer"),
    rule("vs", "spec.hosts", "reviews", "must be a list"),
    rule("vs", "spec.hosts", [5], "must be a string", at="spec.hosts[0]"),
    rule("vs", f"{M}.ignoreUriCase", "yes", "must be a boolean"),
    rule("dr", "spec.trafficPolicy", [], "must be a mapping"),
    rule(
        "se",
        "spec.endpoints[0].labels",
        {"v": 1},
        "must be a string",
        at="spec.endpoints[0].labels.v",
    ),
    # ---- ServiceEntry
    rule("se", "spec.hosts", DELETE, "required"),
    rule("se", "spec.hosts", [], "must not be empty"),
    rule("se", "spec.hosts", ["*"], "'*' (every host) is not allowed", at="spec.hosts[0]"),
    rule("se", "spec.hosts", ["bad_host.com"], "not a valid domain name", at="spec.hosts[0]"),
    rule("se", "spec.hosts", ["foo*.example.com"], "the whole first label", at="spec.hosts[0]"),
    rule("se", "spec.ports", DELETE, "required"),
    rule("se", "spec.ports[0].number", 0, "must be ≥ 1"),
    rule("se", "spec.ports[0].number", 70000, "must be ≤ 65535"),
    rule("se", "spec.ports[0].name", DELETE, "required"),
    rule(
        "se",
        "spec",
        {**SE_SPEC, "ports": [{"number": 80, "name": "HTTP_1"}], "endpoints": None},
        "not a valid port name",
        at="spec.ports[0].name",
    ),
    rule(
        "se",
        "spec.ports",
        [{"number": 80, "name": "http"}, {"number": 81, "name": "http"}],
        "port name 'http' is already defined",
        at="spec.ports[1].name",
    ),
    rule(
        "se",
        "spec.ports",
        [{"number": 80, "name": "http"}, {"number": 80, "name": "web"}],
        "port 80 is already defined",
        at="spec.ports[1].number",
    ),
    rule("se", "spec.ports[0].protocol", "FTP", "unknown protocol 'FTP'"),
    rule("se", "spec.ports[0].protocol", "udp", f"udp: {YET}"),
    rule("se", "spec.ports[0].targetPort", 0, "must be ≥ 1"),
    rule("se", "spec.resolution", "NONE", "NONE: not supported by inmesh"),
    rule("se", "spec.resolution", "DNS_ROUND_ROBIN", YET),
    rule("se", "spec.resolution", "dns", "not one of STATIC, DNS (did you mean 'DNS'?)"),
    rule("se", "spec.location", "EXTERNAL", "not one of MESH_EXTERNAL, MESH_INTERNAL"),
    rule("se", "spec.addresses", ["240.0.0.1"], YET),
    rule("se", "spec.subjectAltNames", ["spiffe://x"], YET),
    rule("se", "spec.exportTo", ["."], YET, at="spec.exportTo[0]"),
    rule("se", "spec.endpoints[0].address", DELETE, "required"),
    rule(
        "se", "spec.endpoints[0].address", "ratings.local", "not an IP address (resolution STATIC)"
    ),
    rule(
        "se",
        "spec.endpoints[0].address",
        "unix:///r.sock",
        f"unix domain socket addresses are {YET}",
    ),
    rule(
        "se",
        "spec.endpoints[0].ports",
        {"grpc": 9090},
        "port 'grpc' is not one of the ServiceEntry's ports (http)",
        at="spec.endpoints[0].ports.grpc",
    ),
    rule(
        "se",
        "spec.endpoints[0].ports",
        {"http": 0},
        "must be ≥ 1",
        at="spec.endpoints[0].ports.http",
    ),
    rule(
        "se",
        "spec.endpoints[0].ports",
        {"http": "80"},
        "must be an integer",
        at="spec.endpoints[0].ports.http",
    ),
    rule("se", "spec.endpoints[0].weight", -1, "must be ≥ 0"),
    rule("se", "spec.endpoints[0].locality", "a/b/c/d", "at most three parts"),
    rule("se", "spec.endpoints[0].locality", "us-east/*", "a wildcard is not allowed here"),
    rule("se", "spec.endpoints[0].network", "net1", YET),
    rule(
        "se",
        "spec.endpoints[0].labels",
        {"bad key!": "x"},
        "invalid label key",
        at="spec.endpoints[0].labels['bad key!']",
    ),
    rule(
        "se",
        "spec.endpoints[0].labels",
        {"app": "-x"},
        "invalid label value",
        at="spec.endpoints[0].labels.app",
    ),
    rule(
        "se",
        "spec.workloadSelector",
        {"labels": {"app": "r"}},
        "workloadSelector and endpoints are exclusive",
    ),
    rule(
        "se",
        "spec",
        {**SE_SPEC, "resolution": "DNS", "hosts": ["*.example.com"], "endpoints": None},
        "every host must be a name to resolve",
        at="spec.hosts",
    ),
    rule(
        "se",
        "spec",
        {**SE_SPEC, "resolution": "DNS", "endpoints": [{"address": "bad_name"}]},
        "not an IP address or a host name",
        at="spec.endpoints[0].address",
    ),
    rule(
        "se",
        "spec",
        {**SE_SPEC, "resolution": "DNS", "endpoints": None, "workloadSelector": {"labels": {}}},
        "workloadSelector needs resolution STATIC",
        at="spec.workloadSelector",
    ),
    rule(
        "se",
        "spec",
        {
            **SE_SPEC,
            "hosts": ["a.example.com", "b.example.com"],
            "ports": [{"number": 3306, "name": "mysql", "protocol": "TCP"}],
            "endpoints": None,
        },
        "several hosts need HTTP or TLS ports",
        at="spec.hosts",
    ),
    # ---- WorkloadEntry
    rule("we", "spec.address", DELETE, "required"),
    rule("we", "spec.address", "not valid!", "not an IP address or a host name"),
    rule("we", "spec.network", "net1", YET),
    rule("we", "spec.ports", {"Bad": 80}, "not a valid port name", at="spec.ports.Bad"),
    rule("we", "spec.locality", "us-east//z", "empty part"),
    rule("we", "spec.weight", 2**32, "must be ≤ 4294967295"),
    rule("we", "spec.adress", "10.0.0.3", "did you mean 'address'?"),
    # ---- VirtualService
    rule("vs", "spec.hosts", DELETE, "required"),
    rule("vs", "spec.hosts", ["*"], "'*' (every host) is not allowed", at="spec.hosts[0]"),
    rule(
        "vs",
        "spec.hosts",
        ["*.example.com", "a.example.com"],
        "duplicate hosts: '*.example.com' and 'a.example.com' overlap",
    ),
    rule("vs", "spec.http", DELETE, "a VirtualService needs at least one http route"),
    rule("vs", "spec.http", [], "a VirtualService needs at least one http route"),
    rule("vs", "spec.tcp", [{"route": []}], f"{YET} (only http routes)"),
    rule("vs", "spec.tls", [{"route": []}], f"{YET} (only http routes)"),
    rule("vs", "spec.gateways", ["gw"], "gateway 'gw': not supported", at="spec.gateways[0]"),
    rule("vs", "spec.exportTo", ["."], YET, at="spec.exportTo[0]"),
    rule("vs", "spec.http[0].route", DELETE, "set route or redirect", at="spec.http[0]"),
    rule(
        "vs",
        "spec.http[0].redirect",
        {"uri": "/"},
        "route and redirect are exclusive",
        at="spec.http[0]",
    ),
    rule("vs", "spec.http[0].route", [], "needs at least one destination"),
    rule("vs", "spec.http[0].mirrors", [{"destination": {"host": "shadow"}}], f"{YET} (a single"),
    rule("vs", "spec.http[0].corsPolicy", {"allowOrigins": [{"exact": "https://a"}]}, YET),
    rule("vs", "spec.http[0]", {"delegate": {"name": "v2"}}, YET, at="spec.http[0].delegate"),
    rule(
        "vs",
        "spec.http[0]",
        {"directResponse": {"status": 503}},
        YET,
        at="spec.http[0].directResponse",
    ),
    # ---- HTTPMatchRequest
    rule("vs", f"{M}.uri", {}, "set one of exact, prefix, regex"),
    rule("vs", f"{M}.uri", {"exact": "/a", "prefix": "/b"}, "set only one of exact, prefix, regex"),
    rule("vs", f"{M}.uri", "/reviews", "must be a mapping"),
    rule("vs", f"{M}.uri", {"regex": ""}, "a regex must not be empty", at=f"{M}.uri.regex"),
    rule(
        "vs", f"{M}.uri", {"regex": "(a"}, "not a valid RE2 regex: missing )", at=f"{M}.uri.regex"
    ),
    # A lookahead is fine for Python's re, not for RE2 (nor Envoy).
    rule("vs", f"{M}.uri", {"regex": "(?=a)b"}, "not a valid RE2 regex", at=f"{M}.uri.regex"),
    rule("vs", f"{M}.uri", {"regex": "a" * 1025}, "at most 1024 characters", at=f"{M}.uri.regex"),
    rule(
        "vs",
        f"{M}.authority",
        {"prefix": ""},
        "empty prefix match is not allowed",
        at=f"{M}.authority.prefix",
    ),
    rule("vs", f"{M}.method", {"regex": "[A-Z"}, "not a valid RE2 regex", at=f"{M}.method.regex"),
    rule(
        "vs",
        f"{M}.headers",
        {"end-user": {"prefix": ""}},
        "empty prefix match is not allowed",
        at=f"{M}.headers.end-user.prefix",
    ),
    rule(
        "vs",
        f"{M}.headers",
        {"u": {"regex": "*"}},
        "not a valid RE2 regex",
        at=f"{M}.headers.u.regex",
    ),
    rule(
        "vs",
        f"{M}.headers",
        {":path": {"exact": "/"}},
        ":path: use uri, scheme, method or authority",
        at=f"{M}.headers[':path']",
    ),
    rule("vs", f"{M}.headers", {"a b": {}}, "not a valid header name", at=f"{M}.headers['a b']"),
    rule("vs", f"{M}.headers", {"": {}}, "a header name must not be empty", at=f"{M}.headers['']"),
    rule(
        "vs",
        f"{M}.headers",
        {"@request.auth.claims.group": {"exact": "admin"}},
        "JWT claim based routing is only supported for gateways",
        at=f"{M}.headers['@request.auth.claims.group']",
    ),
    rule(
        "vs",
        f"{M}.headers",
        {"u": "jason"},
        "must be {} (present) or a mapping",
        at=f"{M}.headers.u",
    ),
    rule(
        "vs",
        f"{M}.headers",
        {"End-User": {}, "end-user": {"exact": "x"}},
        "'end-user' is matched twice",
        at=f"{M}.headers.end-user",
    ),
    rule(
        "vs",
        f"{M}.headers",
        {"u": {"exect": "x"}},
        "did you mean 'exact'?",
        at=f"{M}.headers.u.exect",
    ),
    rule(
        "vs",
        f"{M}.withoutHeaders",
        {"x-debug": {"prefix": ""}},
        "empty prefix match",
        at=f"{M}.withoutHeaders.x-debug.prefix",
    ),
    rule(
        "vs",
        f"{M}.queryParams",
        {"": {}},
        "a parameter name must not be empty",
        at=f"{M}.queryParams['']",
    ),
    rule(
        "vs",
        f"{M}.queryParams",
        {"v": {"regex": "("}},
        "not a valid RE2",
        at=f"{M}.queryParams.v.regex",
    ),
    rule("vs", f"{M}.port", 0, "must be ≥ 1"),
    rule(
        "vs", f"{M}.sourceLabels", {"app": "a b"}, "invalid label value", at=f"{M}.sourceLabels.app"
    ),
    rule("vs", f"{M}.gateways", ["ns/gw"], "only the mesh gateway", at=f"{M}.gateways[0]"),
    rule("vs", f"{M}.sourceNamespace", "prod", YET),
    rule("vs", f"{M}.url", {"prefix": "/"}, "unknown field 'url' (did you mean 'uri'?)"),
    # ---- HTTPRouteDestination
    rule("vs", f"{R}.destination", DELETE, "required"),
    rule("vs", f"{R}.destination.host", DELETE, "required"),
    rule("vs", f"{R}.destination.host", "*", "'*' (every host) is not allowed"),
    rule("vs", f"{R}.destination.subset", "V1", "not a valid subset name"),
    rule(
        "vs",
        f"{R}.destination.port",
        {"number": 0},
        "must be ≥ 1",
        at=f"{R}.destination.port.number",
    ),
    rule("vs", f"{R}.destination.port", {}, "required", at=f"{R}.destination.port.number"),
    rule("vs", f"{R}.weight", -1, "must be ≥ 0"),
    rule("vs", f"{R}.weight", 2**31, "must be ≤ 2147483647"),
    rule("vs", f"{R}.weigth", 5, "unknown field 'weigth' (did you mean 'weight'?)"),
    rule(
        "vs",
        "spec.http[0].route",
        [{"destination": {"host": "a"}, "weight": 0}, {"destination": {"host": "b"}}],
        "the destinations' weights must not all be 0",
    ),
    # ---- redirect and rewrite
    rule(
        "vs",
        "spec.http[0]",
        {"redirect": {}},
        "a redirect needs at least one of uri, authority, scheme, port",
        at="spec.http[0].redirect",
    ),
    rule(
        "vs",
        "spec.http[0]",
        {"redirect": {"uri": "/x", "redirectCode": 200}},
        "must be ≥ 300",
        at="spec.http[0].redirect.redirectCode",
    ),
    rule(
        "vs",
        "spec.http[0]",
        {"redirect": {"uri": "/x", "scheme": "ftp"}},
        "'ftp' is not 'http' or 'https'",
        at="spec.http[0].redirect.scheme",
    ),
    rule(
        "vs",
        "spec.http[0]",
        {"redirect": {"derivePort": "FROM_REQUEST_PORT"}},
        YET,
        at="spec.http[0].redirect.derivePort",
    ),
    rule(
        "vs",
        "spec.http[0]",
        {"redirect": {"uri": "/x"}, "rewrite": {"uri": "/y"}},
        "rewrite cannot be used with redirect",
        at="spec.http[0].rewrite",
    ),
    rule("vs", "spec.http[0].rewrite", {}, "a rewrite needs at least one of uri, uriRegexRewrite"),
    rule(
        "vs",
        "spec.http[0].rewrite",
        {"uri": "/", "uriRegexRewrite": {"match": "a", "rewrite": "b"}},
        "uri and uriRegexRewrite are exclusive",
    ),
    rule(
        "vs",
        "spec.http[0].rewrite",
        {"uriRegexRewrite": {"match": "^/v1"}},
        "required",
        at="spec.http[0].rewrite.uriRegexRewrite.rewrite",
    ),
    rule(
        "vs",
        "spec.http[0].rewrite",
        {"uriRegexRewrite": {"match": "(", "rewrite": "/"}},
        "not a valid RE2 regex",
        at="spec.http[0].rewrite.uriRegexRewrite.match",
    ),
    # ---- header operations
    rule(
        "vs",
        H,
        {"request": {"set": {":authority": "x"}}},
        f"setting ':authority' is {YET}: use rewrite.authority",
        at=f"{H}.request.set[':authority']",
    ),
    rule(
        "vs",
        H,
        {"request": {"add": {"Host": "x"}}},
        "use rewrite.authority",
        at=f"{H}.request.add.Host",
    ),
    rule(
        "vs",
        H,
        {"response": {"set": {"host": "x"}}},
        "the Host header cannot be modified",
        at=f"{H}.response.set.host",
    ),
    rule(
        "vs",
        H,
        {"request": {"remove": [":path"]}},
        "pseudo-headers cannot be modified",
        at=f"{H}.request.remove[0]",
    ),
    rule(
        "vs",
        H,
        {"request": {"set": {"x-a": "%HOSTNAME%"}}},
        f"substitution is {YET} (write %% for a literal %)",
        at=f"{H}.request.set.x-a",
    ),
    rule(
        "vs",
        H,
        {"request": {"set": {"x-a": "a\nb"}}},
        "control characters",
        at=f"{H}.request.set.x-a",
    ),
    rule("vs", H, {"request": {"set": {"x-a": 5}}}, "must be a string", at=f"{H}.request.set.x-a"),
    rule(
        "vs",
        H,
        {"request": {"set": {"a b": "v"}}},
        "not a valid header name",
        at=f"{H}.request.set['a b']",
    ),
    rule(
        "vs",
        H,
        {"request": {"set": {"X-A": "1", "x-a": "2"}}},
        "'x-a' appears twice",
        at=f"{H}.request.set.x-a",
    ),
    rule("vs", H, {"request": {"append": {}}}, "unknown field 'append'", at=f"{H}.request.append"),
    rule(
        "vs",
        f"{R}.headers",
        {"response": {"remove": ["Host"]}},
        "the Host header cannot be modified",
        at=f"{R}.headers.response.remove[0]",
    ),
    # ---- DestinationRule
    rule("dr", "spec.host", DELETE, "required"),
    rule("dr", "spec.host", "*", "'*' (every host) is not allowed"),
    rule("dr", "spec.trafficPolicy", {}, "a traffic policy must set at least one field"),
    rule("dr", "spec.workloadSelector", {"matchLabels": {"app": "x"}}, YET),
    rule("dr", "spec.exportTo", ["other"], YET, at="spec.exportTo[0]"),
    rule("dr", "spec.subsets[0].name", DELETE, "required"),
    rule("dr", "spec.subsets[0].name", "V1", "not a valid subset name"),
    rule(
        "dr",
        "spec.subsets",
        [{"name": "v1"}, {"name": "v1"}],
        "duplicate subset name 'v1'",
        at="spec.subsets[1].name",
    ),
    rule(
        "dr",
        "spec.subsets[0].trafficPolicy",
        {"loadBalancer": {"simple": "FASTEST"}},
        "'FASTEST' is not one of UNSPECIFIED, ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM",
        at="spec.subsets[0].trafficPolicy.loadBalancer.simple",
    ),
    *(
        rule("dr", "spec.trafficPolicy", {field: {}}, YET, at=f"spec.trafficPolicy.{field}")
        for field in ("tls", "portLevelSettings", "tunnel", "proxyProtocol")
    ),
    # ---- load balancer
    rule("dr", f"{LB}.simple", "PASSTHROUGH", "PASSTHROUGH: not supported by inmesh"),
    rule("dr", f"{LB}.simple", "ROUND_ROBBIN", "did you mean 'ROUND_ROBIN'?"),
    rule("dr", CH, {"useSourceIp": True}, "simple and consistentHash are exclusive", at=LB),
    rule("dr", f"{LB}.warmupDurationSecs", "10s", YET),
    rule("dr", f"{LB}.warmup", {}, YET),
]

HASH_KEYS = "httpHeaderName, httpCookie, httpQueryParameterName, useSourceIp"
CASES += [
    rule("dr", LB, {"consistentHash": value}, message, at=at)
    for value, at, message in [
        ({}, CH, f"set one of {HASH_KEYS}"),
        ({"useSourceIp": False}, CH, f"set one of {HASH_KEYS}"),
        (
            {"httpHeaderName": "x-user", "useSourceIp": True},
            CH,
            f"set only one of {HASH_KEYS} (found httpHeaderName, useSourceIp)",
        ),
        ({"httpHeaderName": ""}, f"{CH}.httpHeaderName", "must not be empty"),
        ({"httpHeaderName": "x user"}, f"{CH}.httpHeaderName", "not a valid header name"),
        ({"httpCookie": {}}, f"{CH}.httpCookie.name", "required"),
        (
            {"httpCookie": {"name": "s", "ttl": "0s"}},
            f"{CH}.httpCookie.ttl",
            "not supported: inmesh cannot set cookies",
        ),
        ({"httpCookie": {"name": "s", "path": "/"}}, f"{CH}.httpCookie.path", "cannot set cookies"),
        (
            {"useSourceIp": True, "ringHash": {}, "maglev": {}},
            CH,
            "ringHash and maglev are exclusive",
        ),
        (
            {"useSourceIp": True, "minimumRingSize": 64, "ringHash": {}},
            f"{CH}.minimumRingSize",
            "only one of minimumRingSize or maglev/ringHash",
        ),
        (
            {"useSourceIp": True, "ringHash": {"minimumRingSize": 9_000_000}},
            f"{CH}.ringHash.minimumRingSize",
            "must be ≤ 8388608",
        ),
        (
            {"useSourceIp": True, "maglev": {"tableSize": 1000}},
            f"{CH}.maglev.tableSize",
            "1000 is not a prime number",
        ),
        (
            {"useSourceIp": True, "maglev": {"tableSize": 5_000_012}},
            f"{CH}.maglev.tableSize",
            "must be ≤ 5000011",
        ),
    ]
]
CASES += [
    rule("dr", LB, {"localityLbSetting": value}, message, at=at)
    for value, at, message in [
        (
            {"distribute": [{"from": "us-east/*", "to": {"us-east/*": 80, "us-west/*": 10}}]},
            f"{LOC}.distribute[0].to",
            "must add up to 100 (they add up to 90)",
        ),
        (
            {"distribute": [{"from": "us-east/*", "to": {"us-east/*": 0, "us-west/*": 100}}]},
            f"{LOC}.distribute[0].to['us-east/*']",
            "must be ≥ 1",
        ),
        (
            {"distribute": [{"from": "a/b/c/d", "to": {"a/*": 100}}]},
            f"{LOC}.distribute[0].from",
            "at most three parts",
        ),
        (
            {"distribute": [{"from": "us-*", "to": {"a/*": 100}}]},
            f"{LOC}.distribute[0].from",
            "'*' may only be the whole last part",
        ),
        (
            {"distribute": [{"from": "*/zone1", "to": {"a/*": 100}}]},
            f"{LOC}.distribute[0].from",
            "'*' may only be the whole last part",
        ),
        (
            {"distribute": [{"from": "us", "to": {"a": 100}}, {"from": "us/z1", "to": {"a": 100}}]},
            f"{LOC}.distribute[1].from",
            "overlaps an earlier 'from'",
        ),
        (
            {"distribute": [{"from": "us-east/*", "to": {"us-east/*": 50, "us-east/z1": 50}}]},
            f"{LOC}.distribute[0].to.us-east/z1",
            "overlaps another locality",
        ),
        (
            {
                "distribute": [{"from": "us-east/*", "to": {"us-east/*": 100}}],
                "failover": [{"from": "us-east", "to": "us-west"}],
            },
            LOC,
            "distribute and failover are exclusive",
        ),
        (
            {"failover": [{"from": "us-east", "to": "us-east"}]},
            f"{LOC}.failover[0].to",
            "failover must lead to a different region",
        ),
        (
            {"failover": [{"from": "us-east/zone1", "to": "us-west"}]},
            f"{LOC}.failover[0].from",
            "failover names regions only",
        ),
        (
            {"failover": [{"from": "us-east", "to": "*"}]},
            f"{LOC}.failover[0].to",
            "cannot be a wildcard",
        ),
        (
            {
                "failover": [{"from": "us-east", "to": "us-west"}],
                "failoverPriority": ["topology.kubernetes.io/region"],
            },
            f"{LOC}.failoverPriority[0]",
            "cannot be used with failover",
        ),
        ({"enabled": "yes"}, f"{LOC}.enabled", "must be a boolean"),
    ]
]
CASES += [
    # ---- MeshConfig
    rule(
        "mc",
        "spec.outboundTrafficPolicy.mode",
        "DENY",
        "'DENY' is not one of ALLOW_ANY, REGISTRY_ONLY",
    ),
    rule("mc", "spec.outboundTrafficPolicy.egressProxy", {"host": "proxy"}, YET),
    rule("mc", "spec.defaultConfig", {}, YET),
    rule("mc", "spec.outboundTrafficPolicies", {}, "did you mean 'outboundTrafficPolicy'?"),
]

# --------------------------------------------------------------------------- failure management
# VirtualService timeout, retries, fault and mirror; DestinationRule connectionPool,
# outlierDetection and retryBudget; the MeshConfig's mesh-wide settings.

HTTP0 = "spec.http[0]"
RT = f"{HTTP0}.retries"
F = f"{HTTP0}.fault"
ROUTE0: dict[str, Any] = BASES["vs"]["spec"]["http"][0]
SHADOW = {"host": "shadow"}
CP = "spec.trafficPolicy.connectionPool"
OD = "spec.trafficPolicy.outlierDetection"
RB = "spec.trafficPolicy.retryBudget"
LATER_RETRY_ON = (
    "envoy-ratelimited",
    "retriable-headers",
    "reset-before-request",
    "http3-post-connect-failure",
)


def route_with(**fields: object) -> dict[str, Any]:
    """The base VirtualService's first route with ``fields`` added (camelCase as written)."""
    return {**ROUTE0, **fields}


CASES += [
    # ---- timeout
    rule("vs", f"{HTTP0}.timeout", "0s", "at least 1ms"),
    rule("vs", f"{HTTP0}.timeout", "10", "not a duration"),
    rule("vs", f"{HTTP0}.timeout", 10, "must be a duration string"),
    rule("vs", f"{HTTP0}.timeout", "1.0005s", "whole milliseconds"),
    # ---- retries
    rule("vs", RT, "3", "must be a mapping"),
    rule("vs", RT, {"attempts": -1}, "must be ≥ 0", at=f"{RT}.attempts"),
    rule("vs", RT, {"attempts": "3"}, "must be an integer", at=f"{RT}.attempts"),
    rule("vs", RT, {"attempts": 2**31}, "must be ≤ 2147483647", at=f"{RT}.attempts"),
    rule(
        "vs",
        RT,
        {"attempts": 3, "perTryTimeout": "500us"},
        "at least 1ms",
        at=f"{RT}.perTryTimeout",
    ),
    rule("vs", RT, {"attempts": 3, "retryOn": 503}, "must be a string", at=f"{RT}.retryOn"),
    rule(
        "vs",
        RT,
        {"attempts": 3, "retryOn": "5xx,bogus"},
        "'bogus' is not a retry condition nor an HTTP status code",
        at=f"{RT}.retryOn",
    ),
    rule(
        "vs",
        RT,
        {"attempts": 3, "retryOn": "5XX"},
        "(did you mean '5xx'?)",
        at=f"{RT}.retryOn",
    ),
    rule(
        "vs",
        RT,
        {"attempts": 3, "retryOn": "5xx, reset"},
        "' reset': write the conditions without spaces",
        at=f"{RT}.retryOn",
    ),
    rule(
        "vs",
        RT,
        {"attempts": 3, "retryOn": "5xx,"},
        "has an empty condition: remove the stray comma",
        at=f"{RT}.retryOn",
    ),
    rule(
        "vs",
        RT,
        {"attempts": 3, "retryOn": "600"},
        "600: a status code is between 100 and 599",
        at=f"{RT}.retryOn",
    ),
    rule(
        "vs",
        RT,
        {"attempts": 3, "retryOn": "99"},
        "between 100 and 599",
        at=f"{RT}.retryOn",
    ),
    *(
        rule(
            "vs",
            RT,
            {"attempts": 3, "retryOn": f"5xx,{name}"},
            f"{name}: {YET}",
            at=f"{RT}.retryOn",
        )
        for name in LATER_RETRY_ON
    ),
    *(
        rule("vs", RT, {"attempts": 3, field: value}, YET, at=f"{RT}.{field}")
        for field, value in (
            ("retryRemoteLocalities", True),
            ("retryIgnorePreviousHosts", False),
            ("backoff", "25ms"),
        )
    ),
    rule(
        "vs",
        RT,
        {"attempts": 0, "retryOn": "5xx"},
        "0 turns retries off, which leaves retryOn nothing to do",
        at=f"{RT}.attempts",
    ),
    rule(
        "vs",
        RT,
        {"retryOn": "5xx", "perTryTimeout": "1s"},
        "perTryTimeout and retryOn set without attempts, which Istio reads as 0",
    ),
    rule("vs", RT, {"perTryTimeout": "1s"}, "perTryTimeout set without attempts"),
    rule(
        "vs",
        RT,
        {"atempts": 3},
        "unknown field 'atempts' (did you mean 'attempts'?)",
        at=f"{RT}.atempts",
    ),
    # ---- fault
    rule("vs", F, {}, "a fault needs a delay, an abort or both"),
    rule("vs", F, "abort", "must be a mapping"),
    rule("vs", F, {"delay": {}}, "required", at=f"{F}.delay.fixedDelay"),
    rule("vs", F, {"delay": {"fixedDelay": "0s"}}, "at least 1ms", at=f"{F}.delay.fixedDelay"),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": {"value": 100.5}}},
        "must be ≤ 100",
        at=f"{F}.delay.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": {"value": -1}}},
        "must be ≥ 0",
        at=f"{F}.delay.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": {"value": 0.00001}}},
        "is too small: 0 or at least 0.0001",
        at=f"{F}.delay.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": {}}},
        "required",
        at=f"{F}.delay.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": {"value": "50"}}},
        "must be a number",
        at=f"{F}.delay.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": {"value": True}}},
        "must be a number",
        at=f"{F}.delay.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": {"value": float("nan")}}},
        "must be a finite number",
        at=f"{F}.delay.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percentage": 50}},
        "must be a mapping",
        at=f"{F}.delay.percentage",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percent": 101}},
        "must be ≤ 100",
        at=f"{F}.delay.percent",
    ),
    rule(
        "vs",
        F,
        {"delay": {"fixedDelay": "1s", "percent": 10, "percentage": {"value": 10}}},
        "percent is the deprecated form of percentage: set only percentage",
        at=f"{F}.delay.percent",
    ),
    rule(
        "vs",
        F,
        {"delay": {"exponentialDelay": "1s"}},
        YET,
        at=f"{F}.delay.exponentialDelay",
    ),
    rule("vs", F, {"abort": {}}, "set one of httpStatus, grpcStatus", at=f"{F}.abort"),
    rule(
        "vs",
        F,
        {"abort": {"percentage": {"value": 10}}},
        "set one of httpStatus, grpcStatus",
        at=f"{F}.abort",
    ),
    rule("vs", F, {"abort": {"httpStatus": 600}}, "must be ≤ 599", at=f"{F}.abort.httpStatus"),
    rule("vs", F, {"abort": {"httpStatus": 199}}, "must be ≥ 200", at=f"{F}.abort.httpStatus"),
    rule(
        "vs",
        F,
        {"abort": {"httpStatus": 503, "grpcStatus": "UNAVAILABLE"}},
        "set only one of httpStatus, grpcStatus (found httpStatus, grpcStatus)",
        at=f"{F}.abort",
    ),
    rule(
        "vs",
        F,
        {"abort": {"grpcStatus": "UNAVALABLE"}},
        "'UNAVALABLE' is not a gRPC status name (e.g. UNAVAILABLE) (did you mean 'UNAVAILABLE'?)",
        at=f"{F}.abort.grpcStatus",
    ),
    rule("vs", F, {"abort": {"grpcStatus": ""}}, "must not be empty", at=f"{F}.abort.grpcStatus"),
    rule(
        "vs",
        F,
        {"abort": {"grpcStatus": 14}},
        "must be a string",
        at=f"{F}.abort.grpcStatus",
    ),
    rule("vs", F, {"abort": {"http2Error": "CANCEL"}}, YET, at=f"{F}.abort.http2Error"),
    rule(
        "vs",
        F,
        {"abort": {"httpStatus": 503, "percentage": {"value": 200}}},
        "must be ≤ 100",
        at=f"{F}.abort.percentage.value",
    ),
    rule(
        "vs",
        F,
        {"abort": {"httpStatus": 503, "percent": 50}},
        "unknown field 'percent' (did you mean 'percentage'?)",
        at=f"{F}.abort.percent",
    ),
    rule(
        "vs",
        HTTP0,
        {"redirect": {"uri": "/x"}, "fault": {"abort": {"httpStatus": 503}}},
        "fault cannot be used with redirect",
        at=F,
    ),
    # ---- mirror
    rule("vs", f"{HTTP0}.mirror", {}, "required", at=f"{HTTP0}.mirror.host"),
    rule("vs", f"{HTTP0}.mirror", "shadow", "must be a mapping"),
    rule("vs", f"{HTTP0}.mirror", {"host": "*"}, "'*' (every host)", at=f"{HTTP0}.mirror.host"),
    rule(
        "vs",
        f"{HTTP0}.mirror",
        {"host": "shadow", "subset": "V2"},
        "not a valid subset name",
        at=f"{HTTP0}.mirror.subset",
    ),
    rule(
        "vs",
        f"{HTTP0}.mirror",
        {"host": "shadow", "port": {"number": 0}},
        "must be ≥ 1",
        at=f"{HTTP0}.mirror.port.number",
    ),
    rule(
        "vs",
        f"{HTTP0}.mirrorPercentage",
        {"value": 50},
        "mirrorPercentage without a mirror: set mirror too",
    ),
    rule("vs", f"{HTTP0}.mirror_percent", 50, "mirror_percent without a mirror"),
    rule("vs", f"{HTTP0}.mirrorPercent", 50, "mirrorPercent without a mirror"),
    rule(
        "vs",
        HTTP0,
        route_with(mirror=SHADOW, mirrorPercentage={"value": 100.1}),
        "must be ≤ 100",
        at=f"{HTTP0}.mirrorPercentage.value",
    ),
    rule(
        "vs",
        HTTP0,
        route_with(mirror=SHADOW, mirrorPercent=150),
        "must be ≤ 100",
        at=f"{HTTP0}.mirrorPercent",
    ),
    rule(
        "vs",
        HTTP0,
        route_with(mirror=SHADOW, mirrorPercentage={"value": 5}, mirror_percent=5),
        "mirror_percent is the deprecated form of mirrorPercentage: set only mirrorPercentage",
        at=f"{HTTP0}.mirror_percent",
    ),
    # ---- DestinationRule connectionPool
    rule("dr", CP, {}, "a connection pool needs tcp, http or both"),
    rule("dr", CP, {"tcp": {"maxConnections": -1}}, "must be ≥ 0", at=f"{CP}.tcp.maxConnections"),
    rule(
        "dr",
        CP,
        {"tcp": {"maxConnections": 2**31}},
        "must be ≤ 2147483647",
        at=f"{CP}.tcp.maxConnections",
    ),
    rule(
        "dr",
        CP,
        {"tcp": {"connectTimeout": "10"}},
        "not a duration",
        at=f"{CP}.tcp.connectTimeout",
    ),
    *(
        rule("dr", CP, {"tcp": {field: value}}, YET, at=f"{CP}.tcp.{field}")
        for field, value in (
            ("tcpKeepalive", {"time": "7200s"}),
            ("maxConnectionDuration", "1h"),
            ("idleTimeout", "1h"),
        )
    ),
    *(
        rule("dr", CP, {"http": {field: value}}, message, at=f"{CP}.http.{field}")
        for field, value, message in (
            ("http1MaxPendingRequests", -1, "must be ≥ 0"),
            ("http2MaxRequests", "100", "must be an integer"),
            ("maxRequestsPerConnection", -1, "must be ≥ 0"),
            (
                "maxRequestsPerConnection",
                10,
                "only 1 (a new connection per request) is supported by inmesh yet",
            ),
            ("maxRetries", 2**31, "must be ≤ 2147483647"),
            ("idleTimeout", "0s", "at least 1ms"),
            ("h2UpgradePolicy", "UPGRADE", YET),
            ("useClientProtocol", True, YET),
            ("maxConcurrentStreams", 100, YET),
            ("maxRequestsPerConection", 1, "did you mean 'maxRequestsPerConnection'?"),
        )
    ),
    rule("dr", CP, {"tcp": {}, "udp": {}}, "unknown field 'udp'", at=f"{CP}.udp"),
    # ---- DestinationRule outlierDetection
    rule("dr", OD, [], "must be a mapping"),
    *(
        rule("dr", OD, {field: value}, message, at=f"{OD}.{field}")
        for field, value, message in (
            ("consecutive5xxErrors", -1, "must be ≥ 0"),
            ("consecutive5xxErrors", 2**32, "must be ≤ 4294967295"),
            ("consecutiveGatewayErrors", "5", "must be an integer"),
            ("interval", "0s", "at least 1ms"),
            ("baseEjectionTime", "1.5ms", "whole milliseconds"),
            ("maxEjectionPercent", 101, "must be ≤ 100"),
            ("minHealthPercent", -1, "must be ≥ 0"),
            ("minHealthPercent", 50.5, "must be an integer"),
            ("consecutiveErrors", 5, "use consecutive5xxErrors (any 5xx) or consecutiveGateway"),
            ("splitExternalLocalOriginErrors", True, YET),
            ("consecutiveLocalOriginFailures", 5, YET),
            ("consecutive5xxError", 5, "did you mean 'consecutive5xxErrors'?"),
        )
    ),
    rule(
        "dr",
        "spec.subsets[0].trafficPolicy",
        {"outlierDetection": {"interval": "-1s"}},
        "negative",
        at="spec.subsets[0].trafficPolicy.outlierDetection.interval",
    ),
    # ---- DestinationRule retryBudget
    *(
        rule("dr", RB, {field: value}, message, at=f"{RB}.{field}")
        for field, value, message in (
            ("percent", 100.5, "must be ≤ 100"),
            ("percent", -1, "must be ≥ 0"),
            ("percent", "20", "must be a number"),
            ("percent", float("inf"), "must be a finite number"),
            ("minRetryConcurrency", -1, "must be ≥ 0"),
            ("minRetryConcurrency", 1.5, "must be an integer"),
            ("budgetInterval", "-1s", "negative"),
            ("budgetInterval", "10", "not a duration"),
            ("budgetPercent", 20, "unknown field 'budgetPercent'"),
        )
    ),
    # ---- MeshConfig
    rule(
        "mc",
        "spec.defaultHttpRetryPolicy",
        {"attempts": -1},
        "must be ≥ 0",
        at="spec.defaultHttpRetryPolicy.attempts",
    ),
    rule(
        "mc",
        "spec.defaultHttpRetryPolicy",
        {"attempts": 2, "retryOn": "5xx,gateway_error"},
        "(did you mean 'gateway-error'?)",
        at="spec.defaultHttpRetryPolicy.retryOn",
    ),
    rule(
        "mc",
        "spec.defaultHttpRetryPolicy",
        {"retryOn": "5xx"},
        "retryOn set without attempts",
    ),
    *(
        rule("mc", "spec.retryBudget", {field: value}, message, at=f"spec.retryBudget.{field}")
        for field, value, message in (
            ("retryRatio", 1.5, "must be ≤ 1"),
            ("retryRatio", -0.1, "must be ≥ 0"),
            ("minRetriesPerSecond", -1, "must be ≥ 0"),
            ("minRetriesPerSecond", "10", "must be a number"),
            ("ttl", "0s", "at least 1ms"),
            ("enabled", "no", "must be a boolean"),
            ("retry_ratio", 0.2, "did you mean 'retryRatio'?"),
        )
    ),
    rule("mc", "spec.retryBudget", 0.2, "must be a mapping"),
    rule("mc", "spec.allowHeaderFaults", "true", "must be a boolean"),
    rule(
        "mc", "spec.mirroring", {"maxInFlight": 0}, "must be ≥ 1", at="spec.mirroring.maxInFlight"
    ),
    rule(
        "mc",
        "spec.mirroring",
        {"maxInflight": 8},
        "did you mean 'maxInFlight'?",
        at="spec.mirroring.maxInflight",
    ),
]

ALLOWED: list[tuple[str, str, object]] = [
    ("se", "spec.hosts", ["a.example.com", "b.example.com"]),  # HTTP ports tell them apart
    ("vs", "spec.gateways", ["mesh"]),
    ("vs", "spec.exportTo", ["*"]),
    ("vs", f"{M}.uri", {"prefix": ""}),  # Envoy allows an empty prefix for paths only
    ("vs", f"{M}.uri", {"exact": ""}),
    ("vs", f"{M}.gateways", ["mesh"]),
    ("vs", "metadata.labels", {"app": "reviews"}),
    ("vs", "metadata.annotations", {"note": "anything"}),
    ("vs", "metadata.resourceVersion", "12345"),  # as `kubectl get -o yaml` prints it
    ("vs", "status", {"conditions": []}),
    ("dr", "spec.subsets[0].labels", DELETE),  # a subset of every endpoint
    ("se", "spec.endpoints[0].weight", 0),
    ("mc", "spec", DELETE),
    ("mc", "metadata", DELETE),
    # Istio accepts timeout, retries and mirror beside a redirect (only fault is refused).
    ("vs", HTTP0, {"redirect": {"uri": "/x"}, "timeout": "1s", "retries": {"attempts": 1}}),
    ("vs", HTTP0, {"redirect": {"uri": "/x"}, "mirror": SHADOW}),
    ("vs", RT, {}),  # attempts absent: 0, no retries
    ("vs", RT, {"attempts": 0}),
    ("vs", RT, {"attempts": 0, "retryOn": ""}),  # "" is protobuf's unset
    ("vs", RT, {"attempts": 1, "retryOn": "100,599"}),
    ("vs", F, {"delay": {"fixedDelay": "1s", "percentage": {"value": 0}}}),
    ("vs", F, {"delay": {"fixedDelay": "1s", "percentage": {"value": 0.0001}}}),
    ("vs", F, {"abort": {"grpcStatus": "ok"}}),
    ("vs", HTTP0, route_with(mirror=SHADOW, mirrorPercentage={"value": 0})),
    ("dr", CP, {"tcp": {}}),
    ("dr", OD, {}),
    ("dr", RB, {}),
    ("dr", RB, {"budgetInterval": "0s"}),  # 0: active requests only, Istio's default
    ("dr", "spec.trafficPolicy", {"retryBudget": {"percent": 0}}),
    ("mc", "spec.retryBudget", {"enabled": False, "retryRatio": 0.5}),
    ("mc", "spec.defaultHttpRetryPolicy", {"attempts": 0}),
]


@pytest.mark.parametrize(
    ("base", "field", "value", "where", "message"),
    CASES,
    ids=[f"{base}:{where}:{message[:30]}" for base, _, _, where, message in CASES],
)
def test_rule(base: str, field: str, value: object, where: str, message: str) -> None:
    """Each of Istio's rules (and inmesh's refusals) gives exactly one problem, in place."""
    (problem,) = problems_of(changed(base, field, value))
    assert problem.source == SOURCE
    assert problem.path == where
    assert message in problem.message


@pytest.mark.parametrize(
    ("base", "field", "value"), ALLOWED, ids=[f"{b}:{f}" for b, f, _ in ALLOWED]
)
def test_allowed_variation(base: str, field: str, value: object) -> None:
    """What Istio accepts (and inmesh ignores harmlessly) parses without a problem."""
    assert len(parse(changed(base, field, value))) == 1


# --------------------------------------------------------------------------- reporting

REVIEWS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: -5
"""


def test_message_names_file_line_and_path() -> None:
    """A problem renders as ``file:line path: message``, at the line of the field."""
    (problem,) = problems_of(REVIEWS)
    assert str(problem) == "mesh.d/test.yaml:17 spec.http[0].route[1].weight: must be ≥ 0"
    with pytest.raises(ConfigError, match=re.escape("test.yaml:17 spec.http[0].route[1]")):
        parse(REVIEWS)


def test_every_problem_of_every_document_at_once() -> None:
    """Validation goes on after the first problem: one error lists all, file order kept."""
    text = REVIEWS + textwrap.dedent("""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: "*"
          subsets:
          - name: v1
          - name: v1
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata:
          name: ingress
        ---
        apiVersion: inmesh.io/v1
        kind: MeshConfig
        """)
    caught = problems_of(text)
    assert [str(p) for p in caught] == [
        "mesh.d/test.yaml:17 spec.http[0].route[1].weight: must be ≥ 0",
        "mesh.d/test.yaml:24 spec.host: '*' (every host) is not allowed here: name the hosts",
        "mesh.d/test.yaml:27 spec.subsets[1].name: duplicate subset name 'v1'",
        "mesh.d/test.yaml:30 kind: unknown kind 'Gateway' (inmesh reads ServiceEntry, "
        "WorkloadEntry, VirtualService, DestinationRule, MeshConfig)",
    ]


def test_problems_of_one_document_read_top_to_bottom() -> None:
    """Within a document, problems come in line order, unknown fields included."""
    text = """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hots: [reviews]
          http:
          - corsPolicy: {}
            route:
            - destination: {host: reviews}
              fooBar: 1
        """
    assert [f"{p.line} {p.path}: {p.message}" for p in problems_of(text)] == [
        "5 spec.hosts: required",
        "6 spec.hots: unknown field 'hots' (did you mean 'hosts'?)",
        "8 spec.http[0].corsPolicy: not supported by inmesh yet",
        "11 spec.http[0].route[0].fooBar: unknown field 'fooBar'",
    ]


def test_documents_without_lines_still_locate_problems() -> None:
    """A Document built by hand (no line map) reports its path, and its start line if known."""
    body = copy.deepcopy(BASES["vs"])
    body["spec"]["http"][0]["route"][0]["weight"] = -1
    doc = Document(source="etcd://mesh/reviews", body=body, line=3)
    with pytest.raises(ConfigError) as caught:
        parse_documents([doc])
    assert str(caught.value) == "etcd://mesh/reviews:3 spec.http[0].route[0].weight: must be ≥ 0"


@pytest.mark.parametrize("body", [["a", "list"], "text", 42])
def test_a_document_must_be_a_mapping(body: object) -> None:
    """A document that is not a mapping is one clear problem, not a crash."""
    with pytest.raises(ConfigError, match="a resource must be a mapping with apiVersion, kind"):
        parse_documents([Document(source="x.yaml", body=body, line=1)])


def test_nothing_is_returned_when_anything_is_wrong() -> None:
    """A good document next to a bad one is not returned: the whole set is refused."""
    good = yaml.safe_dump(BASES["dr"], sort_keys=False)
    with pytest.raises(ConfigError) as caught:
        parse(good + "---\n" + REVIEWS)
    assert len(caught.value.problems) == 1
    assert isinstance(caught.value, ValueError)


def test_an_empty_input_is_no_resources() -> None:
    """No documents, no resources, no error."""
    assert parse_documents([]) == []


# --------------------------------------------------------------------------- values and defaults


@pytest.mark.parametrize(
    "api_version",
    ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"],
)
@pytest.mark.parametrize("base", ["se", "we", "vs", "dr"])
def test_every_networking_version_is_read(api_version: str, base: str) -> None:
    """v1, v1beta1 and v1alpha3 of the networking kinds all mean the same resource."""
    body = {**BASES[base], "apiVersion": api_version}
    (resource,) = parse(yaml.safe_dump(body, sort_keys=False))
    assert resource == parse(yaml.safe_dump(BASES[base], sort_keys=False))[0]


def test_resource_defaults() -> None:
    """Namespace, resolution, location, protocol and endpoint weight take Istio's defaults."""
    entry = one("""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ratings}
        spec:
          hosts: [Ratings.Example.COM.]
          ports: [{number: 9080, name: http}, {number: 9090, name: grpc, protocol: grpc}]
          endpoints: [{address: "10.0.0.1", weight: 0}, {address: "fd00::1"}]
        """)
    assert entry == ServiceEntry(
        name="ratings",
        namespace="default",
        origin=Origin(SOURCE, 1),
        hosts=("ratings.example.com",),
        ports=(
            Port(number=9080, name="http", protocol="HTTP"),
            Port(number=9090, name="grpc", protocol="GRPC"),
        ),
        resolution="STATIC",
        location="MESH_EXTERNAL",
        endpoints=(WorkloadSpec(address="10.0.0.1", weight=1), WorkloadSpec(address="fd00::1")),
    )


def test_service_entry_with_dns_and_selector() -> None:
    """DNS endpoints take host names; a STATIC entry may select WorkloadEntries instead."""
    dns, selecting = parse("""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: httpbin, namespace: egress}
        spec:
          hosts: [httpbin.org]
          location: MESH_INTERNAL
          resolution: DNS
          ports: [{number: 443, name: https, protocol: HTTPS, targetPort: 8443}]
          endpoints:
          - address: EU.httpbin.org
            ports: {https: 443}
            labels: {region: eu}
            locality: eu-west/zone-a
            weight: 3
            serviceAccount: httpbin
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ratings}
        spec:
          hosts: [ratings.internal]
          ports: [{number: 9080, name: http}]
          workloadSelector: {labels: {app: ratings}}
        """)
    assert isinstance(dns, ServiceEntry)
    assert isinstance(selecting, ServiceEntry)
    assert dns.namespace == "egress"
    assert dns.location == "MESH_INTERNAL"
    assert dns.resolution == "DNS"
    assert dns.ports == (Port(number=443, name="https", protocol="HTTPS", target_port=8443),)
    assert dns.endpoints == (
        WorkloadSpec(
            address="eu.httpbin.org",
            ports={"https": 443},
            labels={"region": "eu"},
            locality="eu-west/zone-a",
            weight=3,
            service_account="httpbin",
        ),
    )
    assert selecting.workload_selector == {"app": "ratings"}
    assert selecting.endpoints == ()


def test_workload_entry() -> None:
    """A WorkloadEntry's spec is the same WorkloadSpec as a ServiceEntry endpoint."""
    entry = one("""\
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata: {name: ratings-vm, namespace: vms}
        spec:
          address: ratings-vm.example.com
          ports: {http: 19080}
          labels: {app: ratings, version: v2}
        """)
    assert entry == WorkloadEntry(
        name="ratings-vm",
        namespace="vms",
        origin=Origin(SOURCE, 1),
        spec=WorkloadSpec(
            address="ratings-vm.example.com",
            ports={"http": 19080},
            labels={"app": "ratings", "version": "v2"},
        ),
    )


def test_route_weights_default_as_istio() -> None:
    """A lone destination gets 100 whatever it says; among several, an unset weight is 0."""
    service = one("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v2}
              weight: 30
          - route:
            - destination: {host: reviews, subset: v1}
              weight: 75
            - destination: {host: reviews, subset: v3}
        """)
    assert isinstance(service, VirtualService)
    assert [[d.weight for d in route.route] for route in service.http] == [[100], [75, 0]]


def test_matches_are_read_into_the_model() -> None:
    """Every match condition, with header names lower-cased and ``{}`` as "present"."""
    service = one("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: api}
        spec:
          hosts: [api.example.com, 10.0.0.9]
          http:
          - name: everything
            match:
            - name: first
              uri: {regex: "/v[0-9]+/.*"}
              scheme: {exact: https}
              method: {exact: GET}
              authority: {prefix: api.}
              headers:
                End-User: {exact: jason}
                x-canary: {}
              withoutHeaders:
                x-debug: {}
              queryParams:
                v: {prefix: "2"}
                beta: {}
                id: {regex: "[0-9]+"}
              ignoreUriCase: true
              port: 8080
              sourceLabels: {app: productpage}
              gateways: [mesh]
            - uri: {prefix: ""}
            route:
            - destination: {host: api.example.com, port: {number: 8080}}
        """)
    assert isinstance(service, VirtualService)
    assert service.hosts == ("api.example.com", "10.0.0.9")
    (route,) = service.http
    assert route.name == "everything"
    assert route.path == "spec.http[0]"
    assert route.match == (
        HTTPMatch(
            name="first",
            uri=StringMatch("regex", "/v[0-9]+/.*"),
            scheme=StringMatch("exact", "https"),
            method=StringMatch("exact", "GET"),
            authority=StringMatch("prefix", "api."),
            headers={"end-user": StringMatch("exact", "jason"), "x-canary": None},
            without_headers={"x-debug": None},
            query_params={
                "v": StringMatch("prefix", "2"),
                "beta": None,
                "id": StringMatch("regex", "[0-9]+"),
            },
            ignore_uri_case=True,
            port=8080,
            source_labels={"app": "productpage"},
        ),
        HTTPMatch(uri=StringMatch("prefix", "")),
    )
    assert route.route == (
        RouteDestination(destination=Destination(host="api.example.com", port=8080), weight=100),
    )


def test_redirect_rewrite_and_headers() -> None:
    """Redirect (code 301 by default), rewrite, and header edits, names lower-cased."""
    service = one("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web}
        spec:
          hosts: [web]
          http:
          - match: [{uri: {exact: /old}}]
            redirect: {uri: /new, authority: web.example.com, port: 8443, scheme: https}
          - match: [{uri: {exact: /gone}}]
            redirect: {uri: /elsewhere, redirectCode: 308}
          - match: [{uri: {prefix: /v1}}]
            rewrite: {uriRegexRewrite: {match: "^/v1/(.*)", rewrite: "/v2/\\\\1"}}
            route: [{destination: {host: web}}]
          - rewrite: {uri: /, authority: backend}
            headers:
              request:
                set: {X-Mesh: inmesh, x-load: 100%%}
                add: {x-trace: "1"}
                remove: [X-Internal]
              response:
                remove: [server]
            route:
            - destination: {host: web}
              headers: {response: {set: {x-served-by: web}}}
        """)
    assert isinstance(service, VirtualService)
    moved, gone, regex, plain = service.http
    assert moved.redirect == HTTPRedirect(
        uri="/new", authority="web.example.com", port=8443, scheme="https", redirect_code=301
    )
    assert moved.route == ()
    assert gone.redirect == HTTPRedirect(uri="/elsewhere", redirect_code=308)
    assert regex.rewrite == HTTPRewrite(uri_regex=("^/v1/(.*)", "/v2/\\1"))
    assert plain.rewrite == HTTPRewrite(uri="/", authority="backend")
    assert plain.headers == Headers(
        request=HeaderOperations(
            set=(("x-mesh", "inmesh"), ("x-load", "100%")),
            add=(("x-trace", "1"),),
            remove=("x-internal",),
        ),
        response=HeaderOperations(remove=("server",)),
    )
    assert plain.route[0].headers == Headers(
        response=HeaderOperations(set=(("x-served-by", "web"),))
    )


@pytest.mark.parametrize(
    ("load_balancer", "expected"),
    [
        ({}, LoadBalancerSettings()),
        ({"simple": "UNSPECIFIED"}, LoadBalancerSettings()),
        ({"simple": "LEAST_REQUEST"}, LoadBalancerSettings(simple=SimpleLB.LEAST_REQUEST)),
        ({"simple": "LEAST_CONN"}, LoadBalancerSettings(simple=SimpleLB.LEAST_REQUEST)),
        ({"simple": "RANDOM"}, LoadBalancerSettings(simple=SimpleLB.RANDOM)),
        ({"simple": "ROUND_ROBIN"}, LoadBalancerSettings(simple=SimpleLB.ROUND_ROBIN)),
        (
            {"consistentHash": {"httpHeaderName": "X-User"}},
            LoadBalancerSettings(
                consistent_hash=ConsistentHash(key=HeaderHashKey("x-user"), table=RingHash(1024))
            ),
        ),
        (
            {"consistentHash": {"httpCookie": {"name": "session"}, "ringHash": {}}},
            LoadBalancerSettings(
                consistent_hash=ConsistentHash(key=CookieHashKey("session"), table=RingHash(1024))
            ),
        ),
        (
            {"consistentHash": {"httpQueryParameterName": "user", "maglev": {}}},
            LoadBalancerSettings(
                consistent_hash=ConsistentHash(key=QueryHashKey("user"), table=Maglev(65537))
            ),
        ),
        (
            {"consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 251}}},
            LoadBalancerSettings(
                consistent_hash=ConsistentHash(key=SourceIpHashKey(), table=Maglev(251))
            ),
        ),
        (
            {"consistentHash": {"useSourceIp": True, "ringHash": {"minimumRingSize": 64}}},
            LoadBalancerSettings(
                consistent_hash=ConsistentHash(key=SourceIpHashKey(), table=RingHash(64))
            ),
        ),
        (  # the deprecated spelling of the same thing
            {"consistentHash": {"useSourceIp": True, "minimumRingSize": 64}},
            LoadBalancerSettings(
                consistent_hash=ConsistentHash(key=SourceIpHashKey(), table=RingHash(64))
            ),
        ),
        (
            {
                "localityLbSetting": {
                    "distribute": [
                        {"from": "us-east/*", "to": {"us-east/*": 80, "us-west/*": 20}},
                        {"from": "us-west/zone1/*", "to": {"us-west": 100}},
                    ]
                }
            },
            LoadBalancerSettings(
                locality=LocalityLbSetting(
                    distribute=(
                        Distribute(from_="us-east/*", to=(("us-east/*", 80), ("us-west/*", 20))),
                        Distribute(from_="us-west/zone1/*", to=(("us-west", 100),)),
                    )
                )
            ),
        ),
        (
            {
                "localityLbSetting": {
                    "enabled": False,
                    "failover": [{"from": "us-east", "to": "us-west"}],
                    "failoverPriority": ["topology.istio.io/network"],
                }
            },
            LoadBalancerSettings(
                locality=LocalityLbSetting(
                    enabled=False,
                    failover=(Failover(from_="us-east", to="us-west"),),
                    failover_priority=("topology.istio.io/network",),
                )
            ),
        ),
    ],
    ids=repr,
)
def test_load_balancer_settings(
    load_balancer: dict[str, Any], expected: LoadBalancerSettings
) -> None:
    """Each load-balancer form maps onto the model, with Istio's defaults filled in."""
    body = copy.deepcopy(BASES["dr"])
    body["spec"]["trafficPolicy"] = {"loadBalancer": load_balancer}
    rule = one(yaml.safe_dump(body, sort_keys=False))
    assert isinstance(rule, DestinationRule)
    assert rule.traffic_policy == TrafficPolicy(load_balancer=expected)


def test_mesh_config() -> None:
    """MeshConfig needs neither metadata nor spec; its outbound mode defaults to ALLOW_ANY."""
    bare, strict = parse("""\
        apiVersion: inmesh.io/v1
        kind: MeshConfig
        ---
        apiVersion: inmesh.io/v1
        kind: MeshConfig
        metadata: {name: strict}
        spec:
          outboundTrafficPolicy: {mode: REGISTRY_ONLY}
        """)
    assert bare == MeshConfig(name="default", origin=Origin(SOURCE, 1))
    assert strict == MeshConfig(
        name="strict", origin=Origin(SOURCE, 4), outbound_traffic_policy=OutboundMode.REGISTRY_ONLY
    )


# --------------------------------------------------------------------------- failure values


def route_of(route: dict[str, Any]) -> HTTPRoute:
    """The one route of the base VirtualService with its first route replaced."""
    body = copy.deepcopy(BASES["vs"])
    body["spec"]["http"][0] = route
    service = one(yaml.safe_dump(body, sort_keys=False))
    assert isinstance(service, VirtualService)
    return service.http[0]


def policy_of(policy: dict[str, Any]) -> TrafficPolicy | None:
    """The base DestinationRule's traffic policy, replaced by ``policy``."""
    body = copy.deepcopy(BASES["dr"])
    body["spec"]["trafficPolicy"] = policy
    rule = one(yaml.safe_dump(body, sort_keys=False))
    assert isinstance(rule, DestinationRule)
    return rule.traffic_policy


def test_failure_management_is_absent_by_default() -> None:
    """A route without timeout, retries, fault or mirror leaves them all unset (None)."""
    route = route_of(ROUTE0)
    assert (route.timeout, route.retries, route.fault) == (None, None, None)
    assert (route.mirror, route.mirror_percentage) == (None, None)


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10.0), ("1.5s", 1.5), ("250ms", 0.25), ("1m30s", 90.0)]
)
def test_timeout(text: str, seconds: float) -> None:
    """``timeout`` is a duration, in seconds."""
    assert route_of(route_with(timeout=text)).timeout == seconds


@pytest.mark.parametrize(
    ("retries", "expected"),
    [
        # Istio's attempts is a plain int32: absent is 0, which turns retries off.
        ({}, HTTPRetry(attempts=0)),
        ({"attempts": 0}, HTTPRetry(attempts=0)),
        ({"attempts": 3}, HTTPRetry(attempts=3, retry_on=DEFAULT_RETRY_ON)),
        ({"attempts": 3, "retryOn": ""}, HTTPRetry(attempts=3, retry_on=DEFAULT_RETRY_ON)),
        (
            {
                "attempts": 3,
                "perTryTimeout": "2s",
                "retryOn": "gateway-error,connect-failure,refused-stream",
            },
            HTTPRetry(
                attempts=3,
                per_try_timeout=2.0,
                retry_on=("gateway-error", "connect-failure", "refused-stream"),
            ),
        ),
        (  # codes in order, each once; the condition that reads them is added, as Istio does
            {"attempts": 1, "retryOn": "503,5xx,429,503,5xx"},
            HTTPRetry(
                attempts=1,
                retry_on=("5xx", "retriable-status-codes"),
                retry_status_codes=(503, 429),
            ),
        ),
        (
            {"attempts": 1, "retryOn": "retriable-status-codes,409"},
            HTTPRetry(attempts=1, retry_on=("retriable-status-codes",), retry_status_codes=(409,)),
        ),
        (
            {"attempts": 2, "retryOn": "5xx,gateway-error,reset,retriable-4xx"},
            HTTPRetry(attempts=2, retry_on=("5xx", "gateway-error", "reset", "retriable-4xx")),
        ),
        (
            {
                "attempts": 4,
                "retryOn": "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable",
            },
            HTTPRetry(
                attempts=4,
                retry_on=(
                    "cancelled",
                    "deadline-exceeded",
                    "internal",
                    "resource-exhausted",
                    "unavailable",
                ),
            ),
        ),
    ],
    ids=repr,
)
def test_retries(retries: dict[str, Any], expected: HTTPRetry) -> None:
    """``retries`` maps onto HTTPRetry; without retryOn, Istio's default conditions apply."""
    assert route_of(route_with(retries=retries)).retries == expected


RETRY_CONDITIONS = (
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
RETRY_TOKENS = st.sampled_from(RETRY_CONDITIONS) | st.integers(100, 599).map(str)


@given(st.lists(RETRY_TOKENS, min_size=1, max_size=12))
def test_retry_on_keeps_order_and_drops_duplicates(tokens: list[str]) -> None:
    """Any comma-joined mix of conditions and status codes reads back in the order written,
    each once, with retriable-status-codes added when codes are given."""
    retries = route_of(route_with(retries={"attempts": 1, "retryOn": ",".join(tokens)})).retries
    conditions = list(dict.fromkeys(token for token in tokens if not token.isdigit()))
    codes = tuple(dict.fromkeys(int(token) for token in tokens if token.isdigit()))
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    assert retries == HTTPRetry(attempts=1, retry_on=tuple(conditions), retry_status_codes=codes)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"delay": {"fixedDelay": "5s"}}, HTTPFault(delay=FaultDelay(fixed_delay=5.0))),
        (
            {"delay": {"fixedDelay": "7s", "percentage": {"value": 0.1}}},
            HTTPFault(delay=FaultDelay(fixed_delay=7.0, percentage=0.1)),
        ),
        (  # the deprecated integer form
            {"delay": {"fixedDelay": "100ms", "percent": 10}},
            HTTPFault(delay=FaultDelay(fixed_delay=0.1, percentage=10.0)),
        ),
        ({"abort": {"httpStatus": 503}}, HTTPFault(abort=FaultAbort(http_status=503))),
        (
            {"abort": {"grpcStatus": "unavailable", "percentage": {"value": 50}}},
            HTTPFault(abort=FaultAbort(grpc_status="UNAVAILABLE", percentage=50.0)),
        ),
        (
            {
                "delay": {"fixedDelay": "1s", "percentage": {"value": 100}},
                "abort": {"httpStatus": 400, "percentage": {"value": 0.0001}},
            },
            HTTPFault(
                delay=FaultDelay(fixed_delay=1.0, percentage=100.0),
                abort=FaultAbort(http_status=400, percentage=0.0001),
            ),
        ),
    ],
    ids=repr,
)
def test_fault(fault: dict[str, Any], expected: HTTPFault) -> None:
    """``fault`` maps onto HTTPFault; an unset percentage stays None (Istio: never fires)."""
    assert route_of(route_with(fault=fault)).fault == expected


@pytest.mark.parametrize(
    ("fields", "mirror", "percentage"),
    [
        ({"mirror": SHADOW}, Destination(host="shadow"), None),
        (
            {"mirror": {"host": "Shadow.Example.com", "subset": "v2", "port": {"number": 8080}}},
            Destination(host="shadow.example.com", subset="v2", port=8080),
            None,
        ),
        ({"mirror": SHADOW, "mirrorPercentage": {"value": 12.5}}, Destination(host="shadow"), 12.5),
        ({"mirror": SHADOW, "mirrorPercentage": {"value": 0}}, Destination(host="shadow"), 0.0),
        ({"mirror": SHADOW, "mirrorPercent": 30}, Destination(host="shadow"), 30.0),
        ({"mirror": SHADOW, "mirror_percent": 100}, Destination(host="shadow"), 100.0),
    ],
    ids=repr,
)
def test_mirror(fields: dict[str, Any], mirror: Destination, percentage: float | None) -> None:
    """``mirror`` is a Destination; its percentage (or a deprecated integer form) a float."""
    route = route_of(route_with(**fields))
    assert (route.mirror, route.mirror_percentage) == (mirror, percentage)


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"tcp": {}}, ConnectionPoolSettings()),
        (
            {"tcp": {"maxConnections": 100, "connectTimeout": "30ms"}},
            ConnectionPoolSettings(tcp=TCPSettings(max_connections=100, connect_timeout=0.03)),
        ),
        (  # 0 is protobuf's unset: no limit
            {
                "tcp": {"maxConnections": 0},
                "http": {
                    "http1MaxPendingRequests": 0,
                    "http2MaxRequests": 0,
                    "maxRequestsPerConnection": 0,
                    "maxRetries": 0,
                },
            },
            ConnectionPoolSettings(),
        ),
        (
            {
                "http": {
                    "http1MaxPendingRequests": 10,
                    "http2MaxRequests": 1000,
                    "maxRequestsPerConnection": 1,
                    "maxRetries": 3,
                    "idleTimeout": "90s",
                }
            },
            ConnectionPoolSettings(
                http=HTTPSettings(
                    http1_max_pending_requests=10,
                    http2_max_requests=1000,
                    max_requests_per_connection=1,
                    max_retries=3,
                    idle_timeout=90.0,
                )
            ),
        ),
    ],
    ids=repr,
)
def test_connection_pool(pool: dict[str, Any], expected: ConnectionPoolSettings) -> None:
    """``connectionPool`` limits: 0 or absent is unlimited (None); connectTimeout is 10s."""
    assert policy_of({"connectionPool": pool}) == TrafficPolicy(connection_pool=expected)


@pytest.mark.parametrize(
    ("outlier", "expected"),
    [
        ({}, OutlierDetection()),
        (
            {},
            OutlierDetection(
                consecutive_5xx_errors=5,
                consecutive_gateway_errors=None,
                interval=10.0,
                base_ejection_time=30.0,
                max_ejection_percent=10.0,
                min_health_percent=0.0,
            ),
        ),
        (  # 0 turns a check off; maxEjectionPercent 0 is unset in Istio, so Envoy's 10
            {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 0, "maxEjectionPercent": 0},
            OutlierDetection(consecutive_5xx_errors=None, consecutive_gateway_errors=None),
        ),
        (
            {
                "consecutive5xxErrors": 7,
                "consecutiveGatewayErrors": 3,
                "interval": "1s",
                "baseEjectionTime": "3m",
                "maxEjectionPercent": 100,
                "minHealthPercent": 50,
            },
            OutlierDetection(
                consecutive_5xx_errors=7,
                consecutive_gateway_errors=3,
                interval=1.0,
                base_ejection_time=180.0,
                max_ejection_percent=100.0,
                min_health_percent=50.0,
            ),
        ),
    ],
    ids=["empty", "empty-spelled-out", "zeros", "everything"],
)
def test_outlier_detection(outlier: dict[str, Any], expected: OutlierDetection) -> None:
    """``outlierDetection`` takes Istio's (Envoy's) defaults for what it leaves out."""
    assert policy_of({"outlierDetection": outlier}) == TrafficPolicy(outlier_detection=expected)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({}, RetryBudget(percent=20.0, min_retry_concurrency=3, budget_interval=None)),
        (
            {"percent": 0, "minRetryConcurrency": 0},
            RetryBudget(percent=0.0, min_retry_concurrency=0),
        ),
        (
            {"percent": 12.5, "budgetInterval": "10s"},
            RetryBudget(percent=12.5, budget_interval=10.0),
        ),
        ({"budgetInterval": "0s"}, RetryBudget(budget_interval=None)),
        ({"budgetInterval": "0ms"}, RetryBudget(budget_interval=None)),
    ],
    ids=repr,
)
def test_destination_retry_budget(budget: dict[str, Any], expected: RetryBudget) -> None:
    """``retryBudget``: 20% and 3 by default; a zero (or no) budgetInterval is None."""
    assert policy_of({"retryBudget": budget}) == TrafficPolicy(retry_budget=expected)


def test_subset_policy_overrides_field_by_field() -> None:
    """A subset's own failure settings win over the rule's, the rest are inherited."""
    rule = one("""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          trafficPolicy:
            connectionPool: {tcp: {maxConnections: 100}}
            outlierDetection: {consecutive5xxErrors: 3}
          subsets:
          - name: v2
            labels: {version: v2}
            trafficPolicy:
              outlierDetection: {consecutiveGatewayErrors: 2, consecutive5xxErrors: 0}
              retryBudget: {percent: 5}
        """)
    assert isinstance(rule, DestinationRule)
    assert rule.traffic_policy is not None
    (subset,) = rule.subsets
    effective = rule.traffic_policy.overridden_by(subset.traffic_policy)
    assert effective == TrafficPolicy(
        connection_pool=ConnectionPoolSettings(tcp=TCPSettings(max_connections=100)),
        outlier_detection=OutlierDetection(
            consecutive_5xx_errors=None, consecutive_gateway_errors=2
        ),
        retry_budget=RetryBudget(percent=5.0),
    )


def test_mesh_config_failure_defaults() -> None:
    """Without settings, the mesh retries as Istio does, with a ratio budget, no header faults."""
    config = one("apiVersion: inmesh.io/v1\nkind: MeshConfig\n")
    assert isinstance(config, MeshConfig)
    assert config.default_http_retry_policy == DEFAULT_RETRY
    assert config.default_http_retry_policy == HTTPRetry(attempts=2, retry_on=DEFAULT_RETRY_ON)
    assert config.retry_budget == RatioRetryBudget(
        retry_ratio=0.2, min_retries_per_second=10.0, ttl=10.0
    )
    assert config.allow_header_faults is False
    assert config.mirror_max_in_flight == 64


def test_mesh_config_failure_settings() -> None:
    """Each mesh-wide failure setting is read; ``enabled: false`` turns the budget off."""
    tuned, quiet = parse("""\
        apiVersion: inmesh.io/v1
        kind: MeshConfig
        metadata: {name: tuned}
        spec:
          defaultHttpRetryPolicy:
            attempts: 1
            perTryTimeout: 500ms
            retryOn: connect-failure,503
          retryBudget: {retryRatio: 0.1, minRetriesPerSecond: 2.5, ttl: 30s}
          allowHeaderFaults: true
          mirroring: {maxInFlight: 8}
        ---
        apiVersion: inmesh.io/v1
        kind: MeshConfig
        metadata: {name: quiet}
        spec:
          defaultHttpRetryPolicy: {attempts: 0}
          retryBudget: {enabled: false}
        """)
    assert tuned == MeshConfig(
        name="tuned",
        origin=Origin(SOURCE, 1),
        default_http_retry_policy=HTTPRetry(
            attempts=1,
            per_try_timeout=0.5,
            retry_on=("connect-failure", "retriable-status-codes"),
            retry_status_codes=(503,),
        ),
        retry_budget=RatioRetryBudget(retry_ratio=0.1, min_retries_per_second=2.5, ttl=30.0),
        allow_header_faults=True,
        mirror_max_in_flight=8,
    )
    assert isinstance(quiet, MeshConfig)
    assert quiet.default_http_retry_policy == HTTPRetry(attempts=0)
    assert quiet.retry_budget is None


def test_failure_problem_names_file_line_and_nested_path() -> None:
    """A problem deep in a retry policy keeps the ``file:line path: message`` form."""
    text = """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: ratings}
        spec:
          hosts: [ratings]
          http:
          - route:
            - destination: {host: ratings}
            retries:
              attempts: 3
              perTryTimeout: 0.5ms
              retryOn: 5xx,sometimes
            fault:
              abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}
        """
    assert [str(p) for p in problems_of(text)] == [
        "mesh.d/test.yaml:11 spec.http[0].retries.perTryTimeout: '0.5ms' is too short: "
        "a duration must be at least 1ms",
        "mesh.d/test.yaml:12 spec.http[0].retries.retryOn: 'sometimes' is not a retry "
        "condition nor an HTTP status code",
        "mesh.d/test.yaml:14 spec.http[0].fault.abort: set only one of httpStatus, grpcStatus "
        "(found httpStatus, grpcStatus)",
    ]


RESILIENT = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
  namespace: shop
spec:
  hosts: [ratings.shop.svc.cluster.local]
  http:
  - name: canary-faults
    match:
    - headers:
        x-chaos: {exact: "on"}
    fault:
      delay:
        fixedDelay: 2s
        percentage: {value: 10}
      abort:
        httpStatus: 503
        percentage: {value: 5}
    route:
    - destination: {host: ratings.shop.svc.cluster.local, subset: v2}
  - name: default
    timeout: 3s
    retries:
      attempts: 3
      perTryTimeout: 1s
      retryOn: gateway-error,connect-failure,refused-stream,503
    mirror:
      host: ratings.shop.svc.cluster.local
      subset: v3
    mirrorPercentage: {value: 25.0}
    route:
    - destination: {host: ratings.shop.svc.cluster.local, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
  namespace: shop
spec:
  host: ratings.shop.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 250ms
      http:
        http1MaxPendingRequests: 50
        http2MaxRequests: 200
        maxRequestsPerConnection: 1
        maxRetries: 5
        idleTimeout: 60s
    outlierDetection:
      consecutive5xxErrors: 3
      consecutiveGatewayErrors: 2
      interval: 5s
      baseEjectionTime: 1m
      maxEjectionPercent: 50
      minHealthPercent: 25
    retryBudget:
      percent: 25.5
      minRetryConcurrency: 5
      budgetInterval: 10s
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


def test_resilient_ratings() -> None:
    """A realistic pair: faults for a canary header, timeout, retries and a 25% mirror
    otherwise, and a DestinationRule bounding connections, ejecting outliers and budgeting
    retries; every value parsed as written, the rest at Istio's defaults."""
    service, rule = parse(RESILIENT)
    assert isinstance(service, VirtualService)
    assert isinstance(rule, DestinationRule)
    host = "ratings.shop.svc.cluster.local"
    chaos, default = service.http
    assert chaos == HTTPRoute(
        name="canary-faults",
        match=(HTTPMatch(headers={"x-chaos": StringMatch("exact", "on")}),),
        route=(RouteDestination(destination=Destination(host=host, subset="v2"), weight=100),),
        fault=HTTPFault(
            delay=FaultDelay(fixed_delay=2.0, percentage=10.0),
            abort=FaultAbort(http_status=503, percentage=5.0),
        ),
        path="spec.http[0]",
    )
    assert default == HTTPRoute(
        name="default",
        route=(RouteDestination(destination=Destination(host=host, subset="v1"), weight=100),),
        timeout=3.0,
        retries=HTTPRetry(
            attempts=3,
            per_try_timeout=1.0,
            retry_on=(
                "gateway-error",
                "connect-failure",
                "refused-stream",
                "retriable-status-codes",
            ),
            retry_status_codes=(503,),
        ),
        mirror=Destination(host=host, subset="v3"),
        mirror_percentage=25.0,
        path="spec.http[1]",
    )
    assert rule.traffic_policy == TrafficPolicy(
        connection_pool=ConnectionPoolSettings(
            tcp=TCPSettings(max_connections=100, connect_timeout=0.25),
            http=HTTPSettings(
                http1_max_pending_requests=50,
                http2_max_requests=200,
                max_requests_per_connection=1,
                max_retries=5,
                idle_timeout=60.0,
            ),
        ),
        outlier_detection=OutlierDetection(
            consecutive_5xx_errors=3,
            consecutive_gateway_errors=2,
            interval=5.0,
            base_ejection_time=60.0,
            max_ejection_time=300.0,
            max_ejection_percent=50.0,
            min_health_percent=25.0,
        ),
        retry_budget=RetryBudget(percent=25.5, min_retry_concurrency=5, budget_interval=10.0),
    )


def test_values_are_frozen() -> None:
    """Parsed mappings are read-only views and sequences are tuples."""
    rule = one(yaml.safe_dump(BASES["dr"], sort_keys=False))
    assert isinstance(rule, DestinationRule)
    assert isinstance(rule.subsets, tuple)
    labels = rule.subsets[0].labels
    assert isinstance(labels, MappingProxyType)
    with pytest.raises(TypeError):
        labels["version"] = "v2"  # type: ignore[index]


# --------------------------------------------------------------------------- Bookinfo

BOOKINFO = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: reviews
  namespace: bookinfo
spec:
  hosts: [reviews]
  location: MESH_INTERNAL
  ports:
  - {number: 9080, name: http, protocol: HTTP}
  endpoints:
  - {address: 10.1.0.1, labels: {app: reviews, version: v1}}
  - {address: 10.1.0.2, labels: {app: reviews, version: v2}}
  - {address: 10.1.0.3, labels: {app: reviews, version: v3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
  - name: v3
    labels: {version: v3}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: bookinfo
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
"""


def test_bookinfo() -> None:
    """Istio's Bookinfo reviews example: jason sees v2, everyone else v1 and v3 half each."""
    entry, rule, service = parse(BOOKINFO, source="mesh.d/reviews.yaml")
    origin = "mesh.d/reviews.yaml"

    def endpoint(address: str, version: str) -> WorkloadSpec:
        return WorkloadSpec(address=address, labels={"app": "reviews", "version": version})

    assert entry == ServiceEntry(
        name="reviews",
        namespace="bookinfo",
        origin=Origin(origin, 1),
        hosts=("reviews",),
        ports=(Port(number=9080, name="http", protocol="HTTP"),),
        location="MESH_INTERNAL",
        endpoints=(
            endpoint("10.1.0.1", "v1"),
            endpoint("10.1.0.2", "v2"),
            endpoint("10.1.0.3", "v3"),
        ),
    )
    assert rule == DestinationRule(
        name="reviews",
        namespace="bookinfo",
        origin=Origin(origin, 16),
        host="reviews",
        subsets=tuple(Subset(name=v, labels={"version": v}) for v in ("v1", "v2", "v3")),
    )

    def to(subset: str, weight: int) -> RouteDestination:
        return RouteDestination(
            destination=Destination(host="reviews", subset=subset), weight=weight
        )

    assert service == VirtualService(
        name="reviews",
        namespace="bookinfo",
        origin=Origin(origin, 31),
        hosts=("reviews",),
        http=(
            HTTPRoute(
                match=(HTTPMatch(headers={"end-user": StringMatch("exact", "jason")}),),
                route=(to("v2", 100),),
                path="spec.http[0]",
            ),
            HTTPRoute(route=(to("v1", 50), to("v3", 50)), path="spec.http[1]"),
        ),
    )


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1m0.5s", 60.5),
        ("0.001s", 0.001),
        ("1000us", 0.001),
        ("1000µs", 0.001),
        ("2000000ns", 0.002),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("+3s", 3.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Protobuf's "1.5s" and Go's unit forms are both read, in seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "not a duration"),
        ("5", "not a duration"),
        ("1.5 s", "not a duration"),
        ("1d", "not a duration"),
        ("s", "not a duration"),
        ("0", "at least 1ms"),
        ("0s", "at least 1ms"),
        ("-1s", "negative"),
        ("500us", "at least 1ms"),
        ("1.0005s", "whole milliseconds"),
        ("1500us", "whole milliseconds"),
        ("400000000000s", "too long"),
        (5, "must be a duration string"),
        (1.5, "must be a duration string"),
        (True, "must be a duration string"),
        (None, "must be a duration string"),
    ],
)
def test_parse_duration_refuses(value: object, message: str) -> None:
    """Durations Istio refuses (below 1ms, finer than 1ms, not text) raise ValueError."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)


MILLIS = st.integers(min_value=1, max_value=10**11)


@given(MILLIS)
def test_duration_round_trips_in_milliseconds(millis: int) -> None:
    """Any whole number of milliseconds written in ms reads back as millis / 1000."""
    assert parse_duration(f"{millis}ms") == millis / 1000


@given(MILLIS)
def test_duration_round_trips_in_seconds(millis: int) -> None:
    """The protobuf JSON form ("12.345s") reads back exactly the same value."""
    assert parse_duration(f"{millis // 1000}.{millis % 1000:03d}s") == millis / 1000


@given(MILLIS)
def test_duration_round_trips_in_go_form(millis: int) -> None:
    """Go's composite form ("3h25m7s120ms") reads back exactly the same value."""
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, ms = divmod(rest, 1000)
    text = "".join(
        f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s"), (ms, "ms")) if n
    )
    assert parse_duration(text) == millis / 1000


@given(st.integers(min_value=1, max_value=10**15).filter(lambda ns: ns % 1_000_000))
def test_duration_finer_than_a_millisecond_is_refused(nanos: int) -> None:
    """Istio keeps whole milliseconds: anything finer is refused, never rounded."""
    with pytest.raises(ValueError, match=r"1ms|whole milliseconds"):
        parse_duration(f"{nanos}ns")


def test_pool_settings_pickle_with_a_fresh_hash() -> None:
    """ConnectionPoolSettings caches its hash (it keys the per-endpoint pools); a pickled
    copy computes its own, so it still finds what an equal object keyed."""
    settings = ConnectionPoolSettings(http=HTTPSettings(idle_timeout=5.0))
    restored = pickle.loads(pickle.dumps(settings))
    assert restored == settings
    assert {settings: "pool"}[restored] == "pool"
    assert restored._hash == hash((restored.tcp, restored.http))
