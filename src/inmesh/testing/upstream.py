"""A real HTTP upstream on loopback, for tests, the demo and benchmarks.

``Upstream("reviews-v1")`` starts a threaded HTTP/1.1 server on 127.0.0.1 (an ephemeral
port) that answers every request with JSON naming itself and echoing what it received:
method, path, query, headers. It records each request, so a test can assert what
reached which endpoint. ``?status=503`` answers with that status, ``?bytes=N`` with a
body of N bytes; nothing else is special.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qsl

__all__ = ["Received", "Upstream"]


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str  # with the query string, as sent
    headers: dict[str, str]  # lower-case names; repeated headers joined by ", "


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real upstream would
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
    # and the client's delayed ACK stall every kept-alive response by ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.server.upstream._record(Received(self.command, self.path, headers))
        _, _, query = self.path.partition("?")
        params = dict(parse_qsl(query))
        status = int(params.get("status", 200))
        if "bytes" in params:
            payload = b"x" * int(params["bytes"])
            content_type = "application/octet-stream"
        else:
            payload = json.dumps(
                {
                    "name": self.server.upstream.name,
                    "method": self.command,
                    "path": self.path,
                    "headers": headers,
                    "body": body.decode("utf-8", "replace"),
                }
            ).encode()
            content_type = "application/json"
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-upstream", self.server.upstream.name)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: ARG002 - stdlib's signature
        return  # quiet: tests and the demo print what they need


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    upstream: Upstream


class Upstream:
    """A loopback HTTP server that says who it is. Use as a context manager."""

    def __init__(self, name: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self._server = _Server((host, port), _Handler)
        self._server.upstream = self
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def _record(self, request: Received) -> None:
        with self._lock:
            self._received.append(request)

    def start(self) -> Upstream:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"upstream-{self.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main() -> None:
    """``python -m inmesh.testing.upstream NAME [PORT]``: serve until killed; prints the port."""
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "upstream"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    upstream = Upstream(name, port=port)
    print(upstream.port, flush=True)
    try:
        upstream._server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        upstream._server.server_close()


if __name__ == "__main__":
    main()
