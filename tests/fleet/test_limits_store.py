"""The fleet's `LimitsStore` (eyewall/shared/limits_store.py) against a real
redis-server: two stores stand for two nodes and share every limit; Redis taken away
(a relay in the test closes) makes each step follow ``when_down``, with one log line
going down and one coming back.

Time is never slept: rates are slow enough that nothing refills during a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from eyewall.policy.state import AdmissionState, LimitsUnavailable
from eyewall.shared.limits_store import RedisLimitsStore
from eyewall.shared.redis_limits import RedisLimits, RedisLimitsSettings
from tests.services import RedisServer

pytestmark = pytest.mark.fleet
SLOW = 0.001  # tokens a second


class Relay:
    """A TCP relay on 127.0.0.1 to Redis that the test can cut (``down``) and restore
    (``up``, same port): Redis going away without touching the shared server."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.pipes.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            up_writer.close()
            self.pipes.discard(task)


def settings_for(url: str, **changes: Any) -> RedisLimitsSettings:
    values: dict[str, Any] = {
        "url": url,
        "prefix": f"t{secrets.token_hex(4)}",
        "down_for": 0.0,  # try Redis on every call: recovery shows at once
        "connect_timeout": 5.0,  # a loaded machine is no Redis down (it is refused here)
        "command_timeout": 5.0,
        **changes,
    }
    return RedisLimitsSettings(**values)


@contextlib.asynccontextmanager
async def nodes(
    settings: RedisLimitsSettings, count: int = 2, when_down: str = "local"
) -> AsyncIterator[list[RedisLimitsStore]]:
    stores = [
        RedisLimitsStore(RedisLimits.from_settings(settings), AdmissionState(), when_down)
        for _ in range(count)
    ]
    for store in stores:
        store.start()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


def test_two_nodes_spend_from_one_bucket(redis_server: RedisServer) -> None:
    async def body() -> None:
        async with nodes(settings_for(redis_server.url)) as (a, b):
            answers = [
                await store.take("client_rps", "203.0.113.7", 0.0, SLOW, 3)
                for store in (a, b, a, b)
            ]
            assert answers[:3] == [None, None, None]
            assert answers[3] is not None and answers[3] > 0
            # another client, its own bucket
            assert await b.take("client_rps", "203.0.113.8", 0.0, SLOW, 3) is None

    run(body)


def test_connection_caps_hold_across_nodes_and_release(redis_server: RedisServer) -> None:
    async def body() -> None:
        async with nodes(settings_for(redis_server.url)) as (a, b):
            assert await a.acquire("client_connections", "c", 2)
            assert await b.acquire("client_connections", "c", 2)
            assert not await a.acquire("client_connections", "c", 2)
            assert not await b.acquire("client_connections", "c", 2)
            await a.release("client_connections", "c")
            assert await b.acquire("client_connections", "c", 2)
            assert (a.held, b.held) == (0, 2)
            # 0 is unlimited and costs no round trip
            assert await a.acquire("client_tunnels", "c", 0)
            await a.release("client_tunnels", "c")
            assert a.stats.latency.keys() == {"acquire", "release"}

    run(body)


def test_failed_logins_on_one_node_lock_out_on_the_other(redis_server: RedisServer) -> None:
    async def body() -> None:
        async with nodes(settings_for(redis_server.url)) as (a, b):
            per_source = a.local.logins.per_source
            assert await b.login_wait("198.51.100.9", "alice", 0.0) is None
            for _ in range(per_source):
                await a.login_failed("198.51.100.9", "alice", 0.0)
            wait = await b.login_wait("198.51.100.9", "bob", 0.0)
            assert wait is not None and 0 < wait <= a.local.logins.window
            # the user is not locked out from elsewhere yet (per_user is larger)
            assert await b.login_wait("198.51.100.10", "alice", 0.0) is None

    run(body)


def test_redis_down_local_applies_this_nodes_limits(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        relay = Relay(redis_server.port)
        await relay.up()
        url = f"redis://127.0.0.1:{relay.port}/0"
        async with nodes(settings_for(url), count=1, when_down="local") as (a,):
            assert await a.take("client_rps", "x", 0.0, SLOW, 2) is None
            assert await a.acquire("client_connections", "x", 1)
            await relay.down()
            # the local bucket starts full: two more, then refused
            waits = [await a.take("client_rps", "x", 0.0, SLOW, 2) for _ in range(3)]
            assert waits[:2] == [None, None] and waits[2] is not None
            # the local count starts at zero: one connection, then refused
            assert await a.acquire("client_connections", "x", 1)
            assert not await a.acquire("client_connections", "x", 1)
            await a.login_failed("192.0.2.1", None, 0.0)
            assert await a.login_wait("192.0.2.1", None, 0.0) is None
            assert a.local.logins.locked("192.0.2.1", None, 0.0) is None  # counted locally
            # releasing while down: the local one goes back to the local count
            await a.release("client_connections", "x")
            assert a.local.client_connections.count("x") == 0
            assert not a.stats.up
            await relay.up()
            assert await a.take("client_rps", "y", 0.0, SLOW, 2) is None
            assert a.stats.up
            outcomes = {outcome for _, outcome in a.stats.unavailable}
            assert outcomes == {"local"}
            assert sum(a.stats.unavailable.values()) == 7
            await relay.down()

    with caplog.at_level(logging.WARNING, "eyewall.shared_limits"):
        run(body)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "Redis does not answer" in messages[0]
    assert "each node applies the limits alone" in messages[0]
    assert "answers again" in messages[1] and "7 checks" in messages[1]


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_down_open_or_closed(redis_server: RedisServer, mode: str) -> None:
    async def body() -> None:
        relay = Relay(redis_server.port)
        await relay.up()
        url = f"redis://127.0.0.1:{relay.port}/0"
        async with nodes(settings_for(url), count=1, when_down=mode) as (a,):
            await relay.down()
            steps = [
                lambda: a.take("client_rps", "x", 0.0, SLOW, 1),
                lambda: a.take("client_rps", "x", 0.0, SLOW, 1),
                lambda: a.acquire("client_tunnels", "x", 1),
                lambda: a.acquire("client_tunnels", "x", 1),
                lambda: a.login_wait("192.0.2.1", "u", 0.0),
                lambda: a.login_failed("192.0.2.1", "u", 0.0),
            ]
            for step in steps:
                if mode == "open":
                    assert await step() in (None, True)
                else:
                    with pytest.raises(LimitsUnavailable) as raised:
                        await step()
                    assert not raised.value.fail_open
                    assert "Redis" not in str(raised.value)  # the client sees this
            if mode == "open":  # admitted, counted nowhere; released without a trace
                await a.release("client_tunnels", "x")
                assert a.held == 1 and a.local.client_tunnels.total() == 0
            assert a.stats.unavailable == {
                ("take", mode): 2,
                ("acquire", mode): 2,
                ("login_wait", mode): 1,
                ("login_failed", mode): 1,
            }

    run(body)


def test_when_down_is_checked(redis_server: RedisServer) -> None:
    limits = RedisLimits.from_settings(settings_for(redis_server.url))
    with pytest.raises(ValueError):
        RedisLimitsStore(limits, AdmissionState(), "sometimes")
    asyncio.run(limits.close())


def test_leases_are_refreshed_in_the_background(redis_server: RedisServer) -> None:
    async def body() -> None:
        settings = settings_for(redis_server.url, lease_ttl=1.0)  # refreshed every 1/3 s
        async with nodes(settings, count=1) as (a,):
            assert await a.acquire("client_tunnels", "r", 1)
            client = a.redis.client
            key = a.redis.key("lease", "client_tunnels", "r")
            (first,) = await client.zrange(key, 0, -1, withscores=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while "refresh" not in a.stats.latency:
                assert loop.time() < deadline, "no refresh"
                await asyncio.sleep(0.01)
            (later,) = await client.zrange(key, 0, -1, withscores=True)
            assert later[0] == first[0] and later[1] > first[1]  # same lease, expiry pushed on
            assert a.stats.leases_lost == 0

    run(body)
