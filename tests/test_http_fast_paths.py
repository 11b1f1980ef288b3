"""The HTTP transport's shortcuts past httpx's and httpcore's constructors and properties.

Each shortcut builds from parts httpx has already validated, and is used only while it
gives exactly what the public API gives (checked at import). These tests pin both: that
the installed httpx and httpcore take the shortcuts (else the per-request cost silently
grows back), and that the shortcuts agree with the public API on awkward input. The
transports' behaviour end to end is covered by the routing tests over real servers.
"""

from __future__ import annotations

import httpcore
import httpx
import pytest

from inmesh.transports import http as transport

URLS = [
    "http://reviews:9080/reviews/0",
    "http://reviews:9080/reviews/0?a=1&b=%20x&c",
    "http://reviews/",
    "http://reviews",
    "http://reviews/x?",
    "http://reviews/x?#frag",
    "https://Example.COM:443/Path/%7Euser",
    "http://[::1]:8080/x?y=z",
    "http://[fe80::1%25eth0]/x",
    "http://xn--fiqs8s.icom.museum/p",
    "http://中国.icom.museum/p",
    "http://h/a%2Fb;c=d/e",
    "http://user:pw@h:1/p",
    "http://h/ünïcode?q=ü",
]


def test_the_installed_httpx_and_httpcore_take_every_shortcut() -> None:
    assert transport._url_parts is transport._parsed_url_parts
    assert transport._core_request is transport._assembled_request
    assert transport._headers is transport._assembled_headers
    assert transport._HEADER_ENTRIES


@pytest.mark.parametrize("url", URLS)
def test_url_parts_agree_with_httpx_properties(url: str) -> None:
    parsed = httpx.URL(url)
    assert transport._parsed_url_parts(parsed) == transport._public_url_parts(parsed)


@pytest.mark.parametrize("url", URLS)
def test_view_of_a_request(url: str) -> None:
    request = httpx.Request("GET", url)
    view = transport._View(request)
    assert view.host == request.url.host
    assert view.scheme == request.url.scheme
    assert view.port == request.url.port or view.port == {"http": 80, "https": 443}[view.scheme]
    assert view.raw_path == request.url.raw_path
    assert f"{view.path}?{view.query}".rstrip("?") == request.url.raw_path.decode().rstrip("?")


def test_assembled_request_equals_the_constructed_one() -> None:
    headers = [(b"Host", b"reviews:9080"), (b"x-a", b"1"), (b"X-A", b"2")]
    stream = httpx.ByteStream(b"body")
    extensions = {"timeout": {"connect": 1.0, "read": 2.0}}
    args = (b"POST", (b"https", b"10.0.0.1", 8443, b"/a?b=c"), headers, stream, extensions)
    built = transport._checked_request(*args)
    made = transport._assembled_request(*args)
    assert vars(made) == vars(built)
    assert vars(made.url) == vars(built.url)
    assert made.url == built.url
    assert isinstance(made, httpcore.Request)
    assert isinstance(made.url, httpcore.URL)


def test_a_target_extension_takes_httpcore_constructor() -> None:
    # httpcore lets extensions["target"] replace the request target; the shortcut defers.
    args = (b"GET", (b"http", b"h", 80, b"/a"), [], httpx.ByteStream(b""), {"target": b"*"})
    made = transport._assembled_request(*args)
    assert made.url.target == b"*"
    assert vars(made.url) == vars(transport._checked_request(*args).url)


@pytest.mark.parametrize(
    "raw",
    [
        [],
        [(b"Content-Type", b"text/plain")],
        [(b"set-cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-\xc3\xa9", b"\xff")],
    ],
)
def test_assembled_headers_equal_httpx_headers(raw: list[tuple[bytes, bytes]]) -> None:
    made = transport._assembled_headers(raw)
    built = httpx.Headers(raw)
    assert vars(made) == vars(built)
    assert made == built
    assert made.multi_items() == built.multi_items()
    response = httpx.Response(200, headers=made)
    assert response.headers.raw == built.raw


@pytest.mark.parametrize(
    ("headers", "name", "expected"),
    [
        ({"end-user": "jason"}, "end-user", "jason"),
        ({"End-User": "jason"}, "end-user", "jason"),
        ({"x-other": "1"}, "end-user", None),
        ([("x-v", "1"), ("X-V", "2")], "x-v", "1, 2"),
        ({"x-e": ""}, "x-e", ""),
        ({}, "x-e", None),
        ({"x-tier": "gold"}, "X-Tier", "gold"),  # httpx's own lookups ignore case too
        ([(b"x-\xe9", b"1")], "x-é", "1"),  # not a token: httpx's own lookup
    ],
)
@pytest.mark.parametrize("entries", [True, False], ids=["shortcut", "httpx-in"])
def test_view_header_lookup(
    headers: object,
    name: str,
    expected: str | None,
    entries: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "_HEADER_ENTRIES", entries)
    view = transport._View(httpx.Request("GET", "http://h/", headers=headers))  # type: ignore[arg-type]
    assert view.header(name) == expected
