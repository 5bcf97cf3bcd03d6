"""A bug costs one exchange, never the proxy: an unexpected exception while handling a
request answers 500 if nothing was sent yet (else just closes), drops that client
connection only, and is logged; and a pooled connection the origin closed while idle
is noticed before a request that cannot be retried is sent on it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from eyewall.errors import ErrorKind
from eyewall.http1 import fields as wire
from eyewall.proxy import bodies
from eyewall.proxy.upstream import Upstream
from tests.proxy.harness import Client, FakeContext, Origin, read_request, status, until


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def answering(body: bytes):  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    return handler


def boom(*args: object, **kwargs: object) -> object:
    raise RuntimeError("a bug")


def opened(ctx: FakeContext) -> list[Upstream]:
    """The origin connections ``ctx``'s pool opens from now on."""
    connections: list[Upstream] = []
    open_ = ctx.pool.open

    async def recording(*args: Any, **kwargs: Any) -> Upstream:
        up = await open_(*args, **kwargs)
        connections.append(up)
        return up

    ctx.pool.open = recording  # type: ignore[method-assign]
    return connections


def close_leaked(connections: list[Upstream]) -> list[Upstream]:
    """Close the connections left open; returns them."""
    leaked = [up for up in connections if not up.stream.closed()]
    for up in leaked:
        up.stream.close()
    return leaked


def test_a_bug_before_the_response_answers_500_and_drops_only_that_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(answering(b"hello"))
        bystander = Client(ctx)  # a connection served before, during and after
        await bystander.send(f"GET {origin.url}/1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await bystander.until_received(b"hello")
        monkeypatch.setattr(wire, "response_fields", boom)
        upstreams = opened(ctx)
        victim = Client(ctx)
        await victim.send(f"GET {origin.url}/2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await victim.response()  # answered, then closed
        assert status(data) == 500 and b"internal error" in data
        await victim.finish()  # hanging up ends the proxy's lingering close at once
        await until(lambda: len(ctx.flows) == 2)
        assert ctx.flows[1].error is ErrorKind.INTERNAL
        monkeypatch.undo()
        bystander.received = b""
        await bystander.send(f"GET {origin.url}/3 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status(await bystander.until_received(b"hello")) == 200
        await bystander.finish()
        close_leaked(upstreams)
        await origin.close()
        ctx.close()

    with caplog.at_level(logging.ERROR):
        run(main())
    assert "internal error handling t-2 " in caplog.text and "RuntimeError: a bug" in caplog.text


def test_a_bug_after_the_response_began_closes_without_a_second_answer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(answering(b"x" * (256 << 10)))  # streamed, not whole
        monkeypatch.setattr(bodies, "copy_length", boom)
        upstreams = opened(ctx)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await client.response()
        assert status(data) == 200 and b"500" not in data  # the head went, nothing else
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.INTERNAL
        await client.finish()
        close_leaked(upstreams)
        await origin.close()
        ctx.close()

    with caplog.at_level(logging.ERROR):
        run(main())
    assert "internal error handling t-1 " in caplog.text


def test_the_origin_connection_of_an_exchange_that_hit_a_bug_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> list[Upstream]:
        ctx = FakeContext()
        origin = await Origin.start(answering(b"hello"))
        monkeypatch.setattr(wire, "response_fields", boom)
        upstreams = opened(ctx)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status(await client.response()) == 500
        await client.finish()
        leaked = close_leaked(upstreams)
        await origin.close()
        ctx.close()
        return leaked

    assert run(main()) == []


def test_a_post_is_not_sent_on_a_pooled_connection_the_origin_closed() -> None:
    """The origin closes its keep-alive connection while it is idle in the pool; the
    POST that comes next must go on a new connection (a POST is not retried)."""
    connections: list[asyncio.StreamWriter] = []
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            head = await read_request(reader)
            requests.append(head.split(b"\r\n", 1)[0])
            if head.startswith(b"POST"):
                await reader.readexactly(4)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    async def main() -> None:
        ctx = FakeContext()
        origin = await Origin.start(handler)
        client = Client(ctx)
        await client.send(f"GET {origin.url}/a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await client.until_received(b"hello")
        await until(lambda: ctx.pool.idle_count() == 1, "the connection pooled")
        connections[0].close()  # the origin gives up on the idle connection
        await connections[0].wait_closed()
        client.received = b""
        await client.send(
            f"POST {origin.url}/b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\ndata".encode()
        )
        assert status(await client.until_received(b"hello")) == 200
        assert len(connections) == 2 and requests == [b"GET /a HTTP/1.1", b"POST /b HTTP/1.1"]
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())
