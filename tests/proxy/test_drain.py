"""Stopping at the drain deadline, in-process with a real `Proxy`: whatever still waits
on an origin is cut, answered and recorded before the proxy stops."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest

from eyewall.addons.runner import Addons
from eyewall.app import build_policy
from eyewall.config import load_settings
from eyewall.errors import ErrorKind
from eyewall.flow import Flow
from eyewall.proxy.server import Proxy
from eyewall.proxy.timeouts import Phase
from tests.proxy.harness import BlackHole, until


async def read_all(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


def stopping_proxy(flows: list[Flow], addons: Addons | None = None, **overrides: Any) -> Proxy:
    """A real `Proxy` on a loopback port of its own that may reach loopback origins on
    any port, with ``overrides``; finished flows go to ``flows``."""
    settings = load_settings(
        overrides={
            "listen": ["127.0.0.1:0"],
            "access.allow_private": True,
            "access.connect_ports": ["1-65535"],
            **overrides,
        }
    )
    return Proxy(settings, build_policy(settings), publish=flows.append, addons=addons)


def test_connects_pending_at_the_drain_deadline_are_answered_and_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request and a CONNECT whose connects have not completed when the drain
    deadline comes each get a 502 (``connection_terminated``) and a record; before,
    both clients were closed without a byte and neither flow was recorded."""

    async def main() -> None:
        flows: list[Flow] = []
        proxy = stopping_proxy(flows, **{"timeouts.drain": 0.2, "timeouts.upstream_connect": 30.0})
        hole = BlackHole()
        opened = hole.opened
        monkeypatch.setattr(proxy.pool, "open_socket", hole)
        proxy.start_listening()
        port = proxy.addresses[0][1]
        answers = asyncio.gather(
            read_all(port, b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            read_all(port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"),
        )
        await until(lambda: len(opened) == 2)
        await proxy.shutdown()
        for answer in await answers:
            assert answer.startswith(b"HTTP/1.1 502 "), answer
            assert b"drain deadline" in answer
        assert sorted(f.method for f in flows) == ["CONNECT", "GET"]
        assert {f.error for f in flows} == {ErrorKind.CONNECTION_TERMINATED}

    asyncio.run(main())


def test_hurry_cuts_at_once_what_the_drain_would_wait_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second stop signal (`Proxy.hurry`) ends a 60 s drain now: the request still
    connecting is answered 502 and recorded, as at the drain deadline (a second signal
    used to cancel the stop, and the cut request went unrecorded)."""

    async def main() -> None:
        flows: list[Flow] = []
        proxy = stopping_proxy(flows, **{"timeouts.drain": 60.0, "timeouts.upstream_connect": 60.0})
        hole = BlackHole()
        opened = hole.opened
        monkeypatch.setattr(proxy.pool, "open_socket", hole)
        proxy.start_listening()
        port = proxy.addresses[0][1]
        answer = asyncio.ensure_future(
            read_all(port, b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        await until(lambda: opened)
        stopping = asyncio.ensure_future(proxy.shutdown(grace=60.0))
        await until(lambda: proxy.stopping)
        assert proxy.hurry() and not proxy.hurry()  # the third signal's: False
        await asyncio.wait_for(stopping, 10)  # not the minutes of grace and drain
        assert (await answer).startswith(b"HTTP/1.1 502 ")
        assert [f.error for f in flows] == [ErrorKind.CONNECTION_TERMINATED]
        assert "a second stop signal" in flows[0].error_detail  # not "its drain deadline"

    asyncio.run(main())


SLOW_HOOK = """
import asyncio

class Slow:
    async def requestheaders(self, flow):
        await asyncio.sleep(3600)
"""


@pytest.mark.parametrize("where", ["admission", "hook"])
def test_requests_in_admission_or_a_hook_at_the_drain_deadline_are_answered_and_recorded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    """Not only what waits on an origin: a password check or an addon hook still
    running at the deadline is cut too, answered 502 and recorded (the clients got no
    byte, and nothing was recorded)."""

    async def main() -> None:
        flows: list[Flow] = []
        overrides: dict[str, Any] = {"timeouts.drain": 0.2, "timeouts.addon_hook": 3600.0}
        addons = None
        request = b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n\r\n"
        if where == "admission":
            overrides["auth.users"] = {"alice": "$2b$04$" + "a" * 53}
            auth = base64.b64encode(b"alice:pw").decode()
            request = request[:-2] + f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode()
        else:
            (tmp_path / "slow.py").write_text(SLOW_HOOK)
            addons = Addons([str(tmp_path / "slow.py")], [], 3600.0)
            addons.load_all()
        proxy = stopping_proxy(flows, addons, **overrides)
        checking: list[Any] = []

        async def never(*args: Any, **kwargs: Any) -> Any:  # a bcrypt check that never ends
            checking.append(args)
            await asyncio.Event().wait()

        monkeypatch.setattr(proxy.verifier, "verify", never)
        proxy.start_listening()
        answer = asyncio.ensure_future(read_all(proxy.addresses[0][1], request))
        if where == "admission":
            await until(lambda: checking)
        else:
            await until(lambda: any(c.watch.phase is Phase.HOOK for c in proxy.connections))
        await proxy.shutdown()
        assert (await answer).startswith(b"HTTP/1.1 502 ")
        assert [f.error for f in flows] == [ErrorKind.CONNECTION_TERMINATED]
        assert "drain deadline" in flows[0].error_detail

    asyncio.run(main())


BUFFER_RESPONSE = """
class Buffer:
    def responseheaders(self, flow):
        flow.response.buffer(100_000)
"""


@pytest.mark.parametrize("where", ["request body", "response body for an addon"])
def test_bodies_on_their_way_at_the_drain_deadline_are_answered_and_recorded(
    tmp_path: Path, where: str
) -> None:
    """Nothing was sent to the client yet: a request body still going to the origin, or
    a response body read for an addon, is cut with a 502, not a silent close."""

    writers: list[asyncio.StreamWriter] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        if where != "request body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await reader.read()  # and stalls

    async def main() -> None:
        flows: list[Flow] = []
        server = await asyncio.start_server(origin, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        addons = None
        if where != "request body":
            (tmp_path / "buffer.py").write_text(BUFFER_RESPONSE)
            addons = Addons([str(tmp_path / "buffer.py")], [], 30.0)
            addons.load_all()
        proxy = stopping_proxy(flows, addons, **{"timeouts.drain": 0.3})
        proxy.start_listening()
        request = f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n".encode()
        if where == "request body":
            request += b"Content-Length: 1000\r\n\r\n" + b"u" * 10  # the rest never comes
        else:
            request += b"Content-Length: 0\r\n\r\n"
        answer = asyncio.ensure_future(read_all(proxy.addresses[0][1], request))
        phase = Phase.SENDING if where == "request body" else Phase.BUFFERING
        await until(lambda: any(c.watch.phase is phase for c in proxy.connections))
        await proxy.shutdown()
        assert (await answer).startswith(b"HTTP/1.1 502 ")
        assert [f.error for f in flows] == [ErrorKind.CONNECTION_TERMINATED]
        assert flows[0].status == 502
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
