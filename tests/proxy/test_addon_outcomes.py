"""What an addon decides once the origin has answered: replacing the response in
``responseheaders`` (the origin's body is not read and its connection is closed, not
pooled), killing the client connection there, replacing a buffered response in
``response``, and a buffered response too large for the addon's limit streaming on
whole; with a close-delimited body too."""

from __future__ import annotations

import asyncio
from pathlib import Path

from eyewall.addons.runner import Addons
from eyewall.errors import ErrorKind
from tests.proxy.harness import Client, FakeContext, Origin, read_request, status, until

ADDON = """
class Decide:
    def responseheaders(self, flow):
        path = flow.request.path
        if path == "/replace":
            flow.respond(403, {"X-By": "addon"}, "replaced by an addon\\n")
        elif path == "/kill":
            flow.kill()
        elif path.startswith("/buffer"):
            flow.response.buffer(1000)

    def response(self, flow):
        if flow.request.path.startswith("/buffer") and not flow.response.truncated:
            flow.respond(200, {"X-Seen": str(len(flow.response.body))}, "rewritten")
"""


def addons(tmp_path: Path) -> Addons:
    path = tmp_path / "decide.py"
    path.write_text(ADDON)
    loaded = Addons([str(path)], [], 30.0)
    loaded.load_all()
    return loaded


def origin_sending(body: bytes, close_delimited: bool = False):  # type: ignore[no-untyped-def]
    """An origin answering every request with ``body``; ``close_delimited``: without a
    length, ending the body by closing."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            if close_delimited:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()

    return handler


async def exchange(ctx: FakeContext, url: str) -> tuple[Client, bytes]:
    """A request and everything until the proxy closes the connection."""
    client = Client(ctx)
    await client.send(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return client, await client.response()


def test_a_response_replaced_in_responseheaders_closes_the_origin_connection(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        ctx = FakeContext(addons(tmp_path))
        origin = await Origin.start(origin_sending(b"x" * 100_000))
        client = Client(ctx)
        await client.send(f"GET {origin.url}/replace HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await client.until_received(b"replaced by an addon\n")
        assert status(data) == 403 and b"X-By: addon" in data and b"xxx" not in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].status == 403
        # recorded as what the client got: the addon's answer, not the origin's head
        response = ctx.flows[0].response
        assert response is not None and (response.status, response.reason) == (403, "Forbidden")
        assert response.headers.get("x-by") == "addon"
        assert ctx.pool.idle_count() == 0  # its unread body makes it useless
        await client.finish()
        await origin.close()
        ctx.close()

    asyncio.run(main())


def test_a_kill_in_responseheaders_closes_the_client_without_an_answer(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = FakeContext(addons(tmp_path))
        origin = await Origin.start(origin_sending(b"hello"))
        client, data = await exchange(ctx, f"{origin.url}/kill")
        assert data == b""
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.ADDON_KILLED
        assert ctx.pool.idle_count() == 0
        await client.finish()
        await origin.close()
        ctx.close()

    asyncio.run(main())


def test_a_buffered_response_is_replaced_in_the_response_hook(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = FakeContext(addons(tmp_path))
        for close_delimited in (False, True):
            origin = await Origin.start(origin_sending(b"y" * 600, close_delimited))
            client = Client(ctx)
            await client.send(f"GET {origin.url}/buffer HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await client.until_received(b"rewritten")
            assert status(data) == 200 and b"X-Seen: 600" in data and b"yyy" not in data
            await client.finish()
            await origin.close()
        ctx.close()

    asyncio.run(main())


def test_a_response_beyond_the_addons_buffer_streams_on_whole(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = FakeContext(addons(tmp_path))
        for close_delimited in (False, True):
            body = bytes(range(256)) * 40 + b"<end>"  # more than the addon's 1000 bytes
            origin = await Origin.start(origin_sending(body, close_delimited))
            client = Client(ctx)
            await client.send(f"GET {origin.url}/buffer-big HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await client.until_received(b"\r\n\r\n")
            end = b"\r\n0\r\n\r\n" if close_delimited else b"<end>"
            head, _, received = (await client.until_received(end)).partition(b"\r\n\r\n")
            assert status(head) == 200 and b"X-Seen" not in head
            if close_delimited:  # relayed to an HTTP/1.1 client as chunks
                assert b"Transfer-Encoding: chunked" in head
                received = dechunk(received)
            assert received == body
            await client.finish()
            await origin.close()
        ctx.close()

    asyncio.run(main())


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def test_an_answer_before_the_origin_is_recorded_as_the_response(tmp_path: Path) -> None:
    """Records show what a client answered by an addon got (and that no origin was
    contacted): the answer's status, reason and fields as the flow's response."""
    path = tmp_path / "early.py"
    path.write_text(
        "class Early:\n    def requestheaders(self, flow):\n"
        "        flow.respond(451, {'X-By': 'addon'}, 'no')\n"
    )
    loaded = Addons([str(path)], [], 30.0)
    loaded.load_all()

    async def main() -> None:
        ctx = FakeContext(loaded, **{"flows.body_limit": 65536})
        client = Client(ctx)
        await client.send(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await client.until_received(b"\r\n\r\nno")
        assert status(data) == 451
        await until(lambda: ctx.flows)
        [flow] = ctx.flows
        assert flow.response is not None and flow.response.status == 451
        assert flow.response.reason == "Unavailable For Legal Reasons"
        assert flow.response.headers.get("x-by") == "addon" and not flow.upstream
        # its body is captured as an origin's would be (it was "0 of 2 bytes")
        assert flow.response_body == b"no" and flow.bytes_out == 2
        await client.finish()
        ctx.close()

    asyncio.run(main())
