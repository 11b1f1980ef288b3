"""Real gRPC servers on 127.0.0.1 for the gRPC adapter's tests, on raw bytes (no codegen).

``GrpcUpstream("ratings-v1")`` serves every method path; the method's last segment picks
the shape: ``Stream*`` unary-stream, ``Upload*`` stream-unary, ``Chat*`` stream-stream,
anything else unary-unary. Answers name the server (``b"ratings-v1|/pkg.Svc/Get|1"``:
name, method, attempt count), so a test sees where each call went. It records each call's
method, metadata and authority, and misbehaves on request: ``fail_next(n, code)`` fails
the next n calls with a status, ``delay`` holds each answer, ``messages`` and
``fail_after`` shape response streams.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Call:
    method: str
    metadata: dict[str, str]
    authority: str


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

    def __init__(self, name: str) -> None:
        self.name = name
        self.address = "127.0.0.1"
        self.calls: list[Call] = []
        self.delay = 0.0
        self.messages = 3
        self.fail_after: int | None = None  # a stream fails after this many messages
        self._failures: list[tuple[grpc.StatusCode, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=16),
            handlers=[_Handler(self)],
            options=[("grpc.so_reuseport", 0)],
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

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
        call_details = context._rpc_event.call_details  # grpcio keeps :authority only here
        method = call_details.method.decode()
        with self._lock:
            self.calls.append(Call(method, metadata, call_details.host.decode()))
            failure = self._failures.pop(0) if self._failures else None
        if self.delay:
            self._stopping.wait(self.delay)
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


def service_yaml(
    host: str,
    upstreams: list[GrpcUpstream],
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
