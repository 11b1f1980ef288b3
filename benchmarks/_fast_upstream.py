"""A minimal keep-alive HTTP/1.1 responder for benchmarks: it parses only what it must.

The point is to make the upstream cheap, so that what the client adds — the mesh's work
— is a visible share of each request. ``python _fast_upstream.py NAME`` prints its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


class Responder(asyncio.Protocol):
    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            # Benchmarks send bodiless GETs: the head is the whole request.
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(self.reply)  # type: ignore[attr-defined]


async def serve(name: str) -> None:
    body = b'{"name": "' + name.encode() + b'"}'
    reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-upstream: "
        + name.encode()
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Responder(reply), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "fast"))
