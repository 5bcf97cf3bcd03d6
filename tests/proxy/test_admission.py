"""Admission against a limits store that answers with coroutines (memory shared by
workers, Redis): its steps are awaited, a store that cannot be reached fails open or
closed as it says, logins are throttled through it, and tunnel slots go back to it;
and the tunnel slots of this process's own limits (a refused origin, the user limit)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import bcrypt

from eyewall.errors import ErrorKind
from eyewall.policy.state import AdmissionState, CredentialCache, LimitsUnavailable
from tests.proxy.harness import Client, FakeContext, Origin, read_request, status, until


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


HASH = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> str:
    """A Proxy-Authorization field line."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}"


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1000):
        writer.write(data)
        await writer.drain()


class SharedStore:
    """A store shared with other processes, as the proxy sees one: every method a
    coroutine (kept in this process by an `AdmissionState`); ``down`` makes each raise
    `LimitsUnavailable` with ``fail_open``; ``calls`` lists what was asked."""

    asynchronous = True

    def __init__(self, fail_open: bool = False) -> None:
        self.inner = AdmissionState()
        self.credentials = CredentialCache()
        self.down = False
        self.fail_open = fail_open
        self.calls: list[str] = []
        self.locked_out: float | None = None  # what login_wait answers when set

    async def _call(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        await asyncio.sleep(0)  # a round trip
        if self.down:
            raise LimitsUnavailable("limits store unreachable", self.fail_open)
        if name == "login_wait" and self.locked_out is not None:
            return self.locked_out
        return getattr(self.inner, name)(*args)

    async def take(self, *args: Any) -> float | None:
        return await self._call("take", *args)

    async def acquire(self, *args: Any) -> bool:
        return await self._call("acquire", *args)

    async def release(self, *args: Any) -> None:
        await self._call("release", *args)

    async def login_wait(self, *args: Any) -> float | None:
        return await self._call("login_wait", *args)

    async def login_failed(self, *args: Any) -> None:
        await self._call("login_failed", *args)


async def get(ctx: FakeContext, url: str, *fields: str) -> tuple[Client, bytes]:
    client = Client(ctx)
    head = "".join(f"{f}\r\n" for f in fields)
    await client.send(f"GET {url} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    data = await client.until_received(b"\r\n\r\n")
    if status(data) == 200:
        data = await client.until_received(b"hello")
    return client, data


def test_a_shared_store_is_asked_and_its_rate_limit_holds() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"rate_limits.client_rps": 1, "rate_limits.client_burst": 1})
        ctx.state = store = SharedStore()
        origin = await Origin.start(answer)
        first, data = await get(ctx, f"{origin.url}/a")
        assert status(data) == 200 and store.calls == ["take"]
        second, data = await get(ctx, f"{origin.url}/b")
        assert status(data) == 429 and b"Retry-After: 1" in data
        assert ctx.flows[-1].cause == "client_rps"
        for c in (first, second):
            await c.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_store_that_fails_closed_refuses_with_503_and_the_origin_is_not_asked() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"rate_limits.client_rps": 5})
        ctx.state = store = SharedStore(fail_open=False)
        store.down = True
        asked: list[bool] = []

        async def origin_handler(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            asked.append(True)
            await answer(reader, w)

        origin = await Origin.start(origin_handler)
        client, data = await get(ctx, f"{origin.url}/")
        assert status(data) == 503 and b"Retry-After: 1" in data
        assert b"limits store unreachable" in data
        await until(lambda: ctx.flows)
        assert ctx.flows[0].error is ErrorKind.OVERLOADED and ctx.flows[0].rule == "limits-store"
        assert asked == []
        await client.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_a_store_that_fails_open_lets_requests_and_logins_through() -> None:
    async def main() -> None:
        ctx = FakeContext(
            **{"rate_limits.client_rps": 1, "rate_limits.client_burst": 1},
            **{"auth.users": {"alice": HASH}},
        )
        ctx.state = store = SharedStore(fail_open=True)
        store.down = True
        origin = await Origin.start(answer)
        clients = []
        for _ in range(3):  # beyond the rate: the limit is not applied
            client, data = await get(ctx, f"{origin.url}/", basic("alice", "right"))
            assert status(data) == 200
            clients.append(client)
        client, data = await get(ctx, f"{origin.url}/", basic("alice", "wrong"))
        assert status(data) == 407  # a wrong password is still wrong
        clients.append(client)
        assert {"take", "login_wait", "login_failed"} <= set(store.calls)
        for c in clients:
            await c.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_failed_logins_are_recorded_in_the_store_and_its_lockout_holds() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"auth.users": {"alice": HASH}})
        ctx.state = store = SharedStore()
        origin = await Origin.start(answer)
        wrong, data = await get(ctx, f"{origin.url}/", basic("alice", "wrong"))
        assert status(data) == 407
        assert store.calls == ["login_wait", "login_failed"]
        store.locked_out = 30.0  # another process counted enough failures
        locked, data = await get(ctx, f"{origin.url}/", basic("alice", "right"))
        assert status(data) == 429 and b"Retry-After: 30" in data
        assert ctx.flows[-1].cause == "throttled"
        store.locked_out = None
        right, data = await get(ctx, f"{origin.url}/", basic("alice", "right"))
        assert status(data) == 200
        store.calls.clear()
        again, data = await get(ctx, f"{origin.url}/", basic("alice", "right"))
        assert status(data) == 200 and store.calls == []  # a recent login: no store trip
        for c in (wrong, locked, right, again):
            await c.finish()
        await origin.close()
        ctx.close()

    run(main())


def test_tunnel_slots_are_taken_from_the_store_and_given_back() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"rate_limits.client_tunnels": 1})
        ctx.state = store = SharedStore()
        origin = await Origin.start(echo)
        authority = f"127.0.0.1:{origin.port}"
        first = Client(ctx)
        await first.send(f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())
        assert status(await first.until_received(b"\r\n\r\n")) == 200
        second = Client(ctx)
        await second.send(f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())
        data = await second.until_received(b"request id")
        assert status(data) == 429 and b"client_tunnels" in data
        await first.finish()  # the tunnel ends: its slot goes back, in the background
        await until(lambda: "release" in store.calls, "the slot given back")
        await until(lambda: store.inner.client_tunnels.count("127.0.0.1") == 0)
        await second.finish()
        await origin.close()
        ctx.close()

    run(main())


# -- tunnel slots of this process's own limits ---------------------------------------------


def test_a_connect_the_origin_refuses_is_502_and_gives_its_slot_back() -> None:
    async def main() -> None:
        ctx = FakeContext(**{"rate_limits.client_tunnels": 1})
        origin = await Origin.start(echo)
        port = origin.port
        await origin.close()
        origin.server.close()
        await origin.server.wait_closed()
        refused = Client(ctx)
        await refused.send(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        data = await refused.until_received(b"request id")
        assert status(data) == 502 and b"connection_refused" in data
        assert ctx.state.client_tunnels.count("127.0.0.1") == 0  # the slot is free
        await refused.finish()
        ctx.close()

    run(main())


def test_the_user_tunnel_limit_refuses_and_keeps_the_client_slot_free() -> None:
    async def main() -> None:
        ctx = FakeContext(
            **{"rate_limits.user_tunnels": 1, "rate_limits.client_tunnels": 5},
            **{"auth.users": {"alice": HASH}},
        )
        origin = await Origin.start(echo)
        connect = (
            f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n{basic('alice', 'right')}\r\n\r\n"
        ).encode()
        first = Client(ctx)
        await first.send(connect)
        assert status(await first.until_received(b"\r\n\r\n")) == 200
        second = Client(ctx)
        await second.send(connect)
        data = await second.until_received(b"request id")
        assert status(data) == 429 and b"rate limit user_tunnels reached for alice" in data
        assert ctx.flows[-1].cause == "tunnels"
        assert ctx.state.client_tunnels.count("127.0.0.1") == 1  # only the first's
        assert ctx.state.user_tunnels.count("alice") == 1
        for c in (first, second):
            await c.finish()
        await origin.close()
        ctx.close()

    run(main())
