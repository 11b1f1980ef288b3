"""A real HTTP upstream on loopback, for tests, the demo and benchmarks.

``Upstream("reviews-v1")`` starts a threaded HTTP/1.1 server on 127.0.0.1 (an ephemeral
port) that answers every request with JSON naming itself and echoing what it received:
method, path, query, headers. It records each request, so a test can assert what
reached which endpoint.

It can misbehave on request, per request through the query string or for every request
through ``behave()``: ``status=503`` answers with that status; ``delay=0.5`` waits before
answering; ``reset=1`` drops the connection with a TCP reset instead of answering;
``trickle=N`` sends a body of N bytes one byte every ``interval`` seconds (default 0.05);
``trickle_head=N`` sends the response head a header line every ``interval`` seconds;
``bytes=N`` sends a body of N bytes at once. ``fail_next(n, status)`` makes the next n
requests fail.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
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
        upstream = self.server.upstream
        upstream._record(Received(self.command, self.path, headers))
        _, _, query = self.path.partition("?")
        params = {**upstream._behaviour, **dict(parse_qsl(query))}
        failing = upstream._take_failure()
        if failing is not None:
            params["status"] = str(failing)
        if "delay" in params:
            time.sleep(float(params["delay"]))
        if params.get("reset"):
            # SO_LINGER 0: close() sends RST, as a crashed or overloaded upstream does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        status = int(params.get("status", 200))
        if "trickle_head" in params:
            lines, interval = int(params["trickle_head"]), float(params.get("interval", 0.05))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.send_header("x-upstream", upstream.name)
            try:
                self.flush_headers()
                for n in range(lines):
                    self.wfile.write(b"x-pad-%d: x\r\n" % n)
                    self.wfile.flush()
                    time.sleep(interval)
                self.wfile.write(b"\r\n")
            except OSError:
                self.close_connection = True
            return
        if "trickle" in params:
            size, interval = int(params["trickle"]), float(params.get("interval", 0.05))
            self.send_response(status)
            self.send_header("content-length", str(size))
            self.send_header("x-upstream", upstream.name)
            self.end_headers()
            try:
                for _ in range(size):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(interval)
            except OSError:
                self.close_connection = True  # the client gave up: that is the point
            return
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

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (a cut deadline, a closed pool) is business as usual here.
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class Upstream:
    """A loopback HTTP server that says who it is. Use as a context manager."""

    def __init__(self, name: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self._server = _Server((host, port), _Handler)
        self._server.upstream = self
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._thread: threading.Thread | None = None
        self._behaviour: dict[str, str] = {}
        self._failures: list[int] = []

    def behave(self, **params: object) -> None:
        """Misbehave on every request from now on (``behave()`` with nothing: behave)."""
        with self._lock:
            self._behaviour = {k: str(v) for k, v in params.items()}

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` requests with ``status``."""
        with self._lock:
            self._failures.extend([status] * count)

    def _take_failure(self) -> int | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

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
