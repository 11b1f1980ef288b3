"""Real gRPC servers on 127.0.0.1 for the gRPC adapter's tests, on raw bytes (no codegen).

``GrpcUpstream("ratings-v1")`` serves every method path; the method's last segment picks
the shape: ``Stream*`` unary-stream, ``Upload*`` stream-unary, ``Chat*`` stream-stream,
anything else unary-unary. Answers name the server (``b"ratings-v1|/pkg.Svc/Get|1"``:
name, method, attempt count), so a test sees where each call went. It records each call's
method, metadata and authority, and misbehaves on request: ``fail_next(n, code)`` fails
the next n calls with a status, ``delay`` holds each answer, ``messages`` and
``fail_after`` shape response streams; ``initial_metadata`` and ``trailing_metadata`` are
sent with every call. Given server credentials it serves TLS.

``TcpRelay`` is a loopback TCP listener that counts the connections it accepts and those
the client closes: it relays them to a server, or (without one) holds them silent,
never answering the HTTP/2 handshake — a connection attempt that cannot complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc


@dataclass(frozen=True)
class Call:
    method: str
    metadata: dict[str, str]
    authority: str
    binary: dict[str, bytes] = field(default_factory=dict)  # the -bin metadata


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, upstream: GrpcUpstream) -> None:
        self.upstream = upstream

    def service(self, details: Any) -> Any:
        name = details.method.rsplit("/", 1)[-1]
        up = self.upstream
        if name.startswith("Stream"):
            return grpc.unary_stream_rpc_method_handler(up.stream)
        if name.startswith("Upload"):
            return grpc.stream_unary_rpc_method_handler(up.upload)
        if name.startswith("Chat"):
            return grpc.stream_stream_rpc_method_handler(up.chat)
        return grpc.unary_unary_rpc_method_handler(up.unary)


class GrpcUpstream:
    """A threaded gRPC server on an ephemeral loopback port."""

    def __init__(self, name: str, credentials: grpc.ServerCredentials | None = None) -> None:
        self.name = name
        self.address = "127.0.0.1"
        self.calls: list[Call] = []
        self.delay = 0.0
        self.undelayed = 0  # the first this many calls are answered without the delay
        self.messages = 3
        self.fail_after: int | None = None  # a stream fails after this many messages
        self.initial_metadata: tuple[tuple[str, str | bytes], ...] = ()
        self.trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()
        self._failures: list[tuple[grpc.StatusCode, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=16),
            handlers=[_Handler(self)],
            options=[("grpc.so_reuseport", 0)],
        )
        if credentials is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", credentials)

    def start(self) -> GrpcUpstream:
        self._server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop(grace=None).wait(5)

    def fail_next(self, count: int, code: grpc.StatusCode, details: str = "injected") -> None:
        with self._lock:
            self._failures.extend([(code, details)] * count)

    # -- handlers

    def _begin(self, context: grpc.ServicerContext) -> tuple[str, str]:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        binary = {k: v for k, v in context.invocation_metadata() if isinstance(v, bytes)}
        call_details = context._rpc_event.call_details  # grpcio keeps :authority only here
        method = call_details.method.decode()
        with self._lock:
            self.calls.append(Call(method, metadata, call_details.host.decode(), binary))
            delayed = len(self.calls) > self.undelayed
            failure = self._failures.pop(0) if self._failures else None
        if self.delay and delayed:
            self._stopping.wait(self.delay)
        if self.initial_metadata:
            context.send_initial_metadata(self.initial_metadata)
        if self.trailing_metadata:
            context.set_trailing_metadata(self.trailing_metadata)
        if failure is not None:
            context.abort(*failure)
        return method, metadata.get("x-envoy-attempt-count", "")

    def _answer(self, method: str, attempt: str, extra: bytes = b"") -> bytes:
        return f"{self.name}|{method}|{attempt}".encode() + extra

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        method, attempt = self._begin(context)
        return self._answer(method, attempt, b"|" + request if request else b"")

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        method, attempt = self._begin(context)
        for i in range(self.messages):
            if self.fail_after is not None and i == self.fail_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "stream broke")
            yield self._answer(method, attempt, f"|{i}".encode())

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        method, attempt = self._begin(context)
        return self._answer(method, attempt, b"|" + b"+".join(requests))

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        method, attempt = self._begin(context)
        for request in requests:
            yield self._answer(method, attempt, b"|" + request)


class TcpRelay:
    """A loopback TCP listener that relays each connection to ``127.0.0.1:target``, or
    without a target accepts and holds it silent. ``accepted`` and ``closed`` (by the
    client) count connections; ``stop()`` closes everything."""

    def __init__(self, target: int | None = None, name: str = "relay") -> None:
        self.name = name
        self.address = "127.0.0.1"
        self.target = target
        self.accepted = 0
        self.closed = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stopped = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # stopped
                return
            ends = [client]
            if self.target is not None:
                try:
                    ends.append(socket.create_connection(("127.0.0.1", self.target), timeout=5))
                except OSError:
                    client.close()
                    continue
                ends[1].settimeout(None)
            with self._lock:
                if self._stopped:
                    for end in ends:
                        end.close()
                    return
                self.accepted += 1
                self._sockets.extend(ends)
            if len(ends) == 2:
                threading.Thread(target=self._pump, args=ends, daemon=True).start()
                threading.Thread(target=self._pump, args=ends[::-1], daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            if source in self._sockets:  # the first side to end closes both
                self._sockets.remove(source)
                self._sockets.remove(sink)
                if source.getsockname()[1] == self.port:  # the client's side ended
                    self.closed += 1
            else:
                return
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            sockets, self._sockets = self._sockets, []
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for end in sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def self_signed(host: str) -> tuple[bytes, bytes]:
    """A fresh key and a self-signed certificate for ``host`` (its SAN), both PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def name_of(answer: bytes) -> str:
    """The server that produced an answer."""
    return answer.split(b"|", 1)[0].decode()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


async def async_wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """``wait_for`` that lets the event loop run while it polls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def service_yaml(
    host: str,
    upstreams: Sequence[GrpcUpstream | TcpRelay],
    *,
    port: int = 9090,
    labels: list[dict[str, str]] | None = None,
) -> str:
    """A ServiceEntry for ``host:port`` (protocol GRPC) whose endpoints are the servers."""
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: ServiceEntry",
        f"metadata: {{name: {host.replace('.', '-')}}}",
        "spec:",
        f"  hosts: [{host}]",
        f"  ports: [{{number: {port}, name: grpc, protocol: GRPC}}]",
        "  resolution: STATIC",
        "  endpoints:",
    ]
    for i, upstream in enumerate(upstreams):
        label = labels[i] if labels else {"name": upstream.name}
        rendered = ", ".join(f"{k}: {v}" for k, v in label.items())
        lines.append(
            f"  - {{address: {upstream.address}, ports: {{grpc: {upstream.port}}}, "
            f"labels: {{{rendered}}}}}"
        )
    return "\n".join(lines) + "\n"
