"""Response heads the proxy must not relay: one larger than limits.max_header_size, and
a 101 the request did not ask for (no upgrade, or an upgrade to something other than
WebSocket).  Each is a 502 http_protocol_error naming the fault, and the origin
connection is never pooled."""

from __future__ import annotations

import asyncio

import pytest

from eyewall.errors import ErrorKind
from tests.proxy.harness import Client, FakeContext, Origin, read_request, status, until

WS_REQUEST = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize(
    ("fields", "reply", "detail"),
    [
        ("", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", b"response head too large"),
        (
            "",
            SWITCH + b"Upgrade: websocket\r\n\r\n",
            b"unrequested 101 response",
        ),
        (
            WS_REQUEST,
            SWITCH + b"Upgrade: h2c\r\n\r\n",
            b"unrequested 101 response",
        ),
    ],
    ids=["too-large", "101-without-upgrade", "101-to-another-protocol"],
)
def test_a_response_head_the_proxy_cannot_relay_is_a_502(fields, reply, detail) -> None:
    async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        await reader.read()  # until the proxy hangs up

    async def main() -> None:
        ctx = FakeContext(**{"limits.max_header_size": 4096})
        origin = await Origin.start(origin_handler)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode())
        data = await client.until_received(b"request id")
        assert status(data) == 502
        assert b"error=http_protocol_error" in data and detail in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.HTTP_PROTOCOL_ERROR
        assert ctx.pool.idle_count() == 0
        await client.finish()
        await origin.close()
        ctx.close()

    asyncio.run(main())
