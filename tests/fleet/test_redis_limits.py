"""Shared limits against a real redis-server: token buckets, leases that outlive no
crashed node, failures in a sliding window, and a bounded, explicit failure when Redis
cannot answer.

Time is moved by rewriting the stamps Redis keeps (the scripts read the server's
clock), never by sleeping; the few waits poll a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis
import uvloop
from tornado.ioloop import IOLoop

from eyewall.shared.redis_limits import (
    Bucket,
    RedisLimits,
    RedisLimitsSettings,
    SharedLimitsUnavailable,
    Window,
)
from tests.services import RedisServer, wait_for

pytestmark = pytest.mark.fleet
T = TypeVar("T")
SLOW = 0.001  # tokens a second: no refill within a test


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def settings(redis_server: RedisServer) -> RedisLimitsSettings:
    """Settings with a prefix of the test's own, so tests share the server, not keys."""
    return RedisLimitsSettings(url=redis_server.url, prefix=f"t{secrets.token_hex(4)}")


@pytest.fixture
def inspect(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client to look at, and rewrite, what the scripts stored."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def using(
    settings: RedisLimitsSettings, body: Callable[[RedisLimits], Awaitable[T]], **changes: Any
) -> T:
    """Run ``body`` with a fresh RedisLimits (one per event loop) and close it after."""

    async def main() -> T:
        limits = RedisLimits.from_settings(_replace(settings, **changes))
        try:
            return await body(limits)
        finally:
            await limits.close()

    return run(main())


def _replace(settings: RedisLimitsSettings, **changes: Any) -> RedisLimitsSettings:
    import dataclasses

    return dataclasses.replace(settings, **changes)


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- token bucket ---------------------------------------------------------------------------


def test_bucket_allows_the_burst_then_says_when(settings: RedisLimitsSettings) -> None:
    async def body(limits: RedisLimits) -> list[float | None]:
        return [await limits.take("rps", "10.0.0.1", rate=SLOW, burst=3) for _ in range(4)]

    results = using(settings, body)
    assert results[:3] == [None, None, None]
    retry = results[3]
    assert retry is not None and 0 < retry <= 1 / SLOW


def test_works_over_a_unix_socket(settings: RedisLimitsSettings, redis_server: RedisServer) -> None:
    async def body(limits: RedisLimits) -> list[float | None]:
        return [await limits.take("rps", "unix", rate=SLOW, burst=1) for _ in range(2)]

    allowed, limited = using(settings, body, url=redis_server.unix_url)
    assert allowed is None and limited is not None


def test_buckets_are_per_name_and_key(settings: RedisLimitsSettings) -> None:
    async def body(limits: RedisLimits) -> list[float | None]:
        first = await limits.take("rps", "a", rate=SLOW, burst=1)
        return [
            first,
            await limits.take("rps", "a", rate=SLOW, burst=1),
            await limits.take("rps", "b", rate=SLOW, burst=1),
            await limits.take("user_rps", "a", rate=SLOW, burst=1),
        ]

    allowed, again, other_key, other_name = using(settings, body)
    assert (allowed, other_key, other_name) == (None, None, None)
    assert again is not None


def test_take_all_spends_from_every_bucket_or_none(settings: RedisLimitsSettings) -> None:
    client = Bucket("client_rps", "10.0.0.2", rate=SLOW, burst=2)
    user = Bucket("user_rps", "alice", rate=SLOW, burst=1)

    async def body(limits: RedisLimits) -> None:
        assert await limits.take_all([client, user]) is None  # client 1 left, user 0
        refused = await limits.take_all([client, user])
        assert refused is not None
        bucket, wait = refused
        assert bucket == user and 0 < wait <= 1 / SLOW
        # The refusal spent nothing: the client's last token is still there.
        assert await limits.take_all([client]) is None
        assert await limits.take(client.name, client.key, client.rate, client.burst) is not None
        with pytest.raises(ValueError):
            await limits.take_all([])
        with pytest.raises(ValueError):
            await limits.take_all([client, client])

    using(settings, body)


def test_bucket_refills_at_its_rate(settings: RedisLimitsSettings, inspect: redis.Redis) -> None:
    key = f"{settings.prefix}:tb:rps:c"

    async def drain(limits: RedisLimits) -> float | None:
        for _ in range(2):
            assert await limits.take("rps", "c", rate=2, burst=2) is None
        return await limits.take("rps", "c", rate=2, burst=2)

    retry = using(settings, drain)
    assert retry is not None and 0 < retry <= 0.5
    # Move the bucket's stamp 0.75 s into the past: 1.5 tokens have come back.
    stamp = int(inspect.hget(key, "stamp"))  # type: ignore[arg-type]
    inspect.hset(key, "stamp", stamp - 750_000)

    async def spend(limits: RedisLimits) -> list[float | None]:
        return [await limits.take("rps", "c", rate=2, burst=2) for _ in range(2)]

    first, second = using(settings, spend)
    assert first is None
    assert second is not None and 0 < second <= 0.25


def test_bucket_key_expires_when_it_would_be_full(
    settings: RedisLimitsSettings, inspect: redis.Redis
) -> None:
    key = f"{settings.prefix}:tb:rps:idle"

    async def take(limits: RedisLimits) -> float | None:
        return await limits.take("rps", "idle", rate=10, burst=5, cost=2)

    assert using(settings, take) is None
    # 2 tokens short of full at 10 a second: full again within 200 ms, then gone.
    assert 0 < inspect.pttl(key) <= 200
    wait_for(lambda: inspect.exists(key) == 0, "idle bucket to vanish")


def test_bucket_is_atomic_across_nodes(settings: RedisLimitsSettings) -> None:
    # 200 calls at once open 64 connections: generous bounds, this is about atomicity
    roomy = _replace(settings, connect_timeout=10.0, command_timeout=10.0)

    async def body(limits: RedisLimits) -> int:
        other = RedisLimits.from_settings(roomy)  # a second node
        try:
            results = await asyncio.gather(
                *(
                    node.take("rps", "shared", rate=SLOW, burst=50)
                    for _ in range(100)
                    for node in (limits, other)
                )
            )
        finally:
            await other.close()
        return sum(r is None for r in results)

    assert using(roomy, body) == 50


@pytest.mark.parametrize(("rate", "burst", "cost"), [(0, 1, 1), (-1, 1, 1), (1, 1, 2), (1, 1, 0)])
def test_bucket_refuses_nonsense(
    settings: RedisLimitsSettings, rate: float, burst: float, cost: float
) -> None:
    async def body(limits: RedisLimits) -> float | None:
        return await limits.take("rps", "x", rate=rate, burst=burst, cost=cost)

    with pytest.raises(ValueError):
        using(settings, body)


# -- leases ------------------------------------------------------------------------------------


def test_leases_count_up_to_the_maximum(settings: RedisLimitsSettings) -> None:
    async def body(limits: RedisLimits) -> None:
        first = await limits.acquire("tunnels", "alice", maximum=2)
        second = await limits.acquire("tunnels", "alice", maximum=2)
        assert first is not None and second is not None and first.id != second.id
        assert await limits.acquire("tunnels", "alice", maximum=2) is None
        assert await limits.count("tunnels", "alice") == 2
        assert limits.held == 2
        await first.release()
        await first.release()  # idempotent
        assert await limits.count("tunnels", "alice") == 1
        async with await limits.acquire("tunnels", "alice", maximum=2) as third:  # type: ignore[union-attr]
            assert third is not None
            assert await limits.count("tunnels", "alice") == 2
        assert await limits.count("tunnels", "alice") == 1
        assert await limits.acquire("tunnels", "bob", maximum=1) is not None

    using(settings, body)


def test_crashed_node_leases_expire(settings: RedisLimitsSettings, inspect: redis.Redis) -> None:
    key = f"{settings.prefix}:lease:conns:10.0.0.9"

    async def crash(limits: RedisLimits) -> None:
        # Node A takes both leases, then dies: no release, no more refreshes.
        for _ in range(2):
            assert await limits.acquire("conns", "10.0.0.9", maximum=2) is not None

    using(settings, crash)

    async def other_node(limits: RedisLimits) -> bool:
        return await limits.acquire("conns", "10.0.0.9", maximum=2) is not None

    assert using(settings, other_node) is False
    # Let one of A's leases reach its expiry.
    member = inspect.zrange(key, 0, 0)[0]
    inspect.zadd(key, {member: server_ms(inspect) - 1}, xx=True)
    assert using(settings, other_node) is True
    assert inspect.zscore(key, member) is None  # dropped before counting


def test_crashed_node_leases_expire_in_real_time(settings: RedisLimitsSettings) -> None:
    async def crash(limits: RedisLimits) -> None:
        assert await limits.acquire("conns", "gone", maximum=1) is not None

    using(settings, crash, lease_ttl=0.05)

    async def other_node(limits: RedisLimits) -> bool:
        lease = await limits.acquire("conns", "gone", maximum=1)
        return lease is not None

    wait_for(lambda: using(settings, other_node), "the crashed node's lease to expire")


def test_refresh_keeps_leases_and_reports_lost_ones(
    settings: RedisLimitsSettings, inspect: redis.Redis
) -> None:
    key = f"{settings.prefix}:lease:conns:k"

    async def body(limits: RedisLimits) -> None:
        kept = await limits.acquire("conns", "k", maximum=5)
        dropped = await limits.acquire("conns", "k", maximum=5)
        assert kept is not None and dropped is not None
        now = server_ms(inspect)
        # Both near their end; one of them past it.
        inspect.zadd(key, {kept.id: now + 1000, dropped.id: now - 1}, xx=True)
        lost = await limits.refresh_leases()
        assert lost == [dropped] and dropped.lost and not kept.lost
        assert limits.held == 1
        assert inspect.zscore(key, kept.id) >= now + 30_000 - 1000  # type: ignore[operator]
        assert inspect.zscore(key, dropped.id) is None
        assert 29_000 < inspect.pttl(key) <= 30_000
        assert await kept.refresh() is True
        await kept.release()
        assert await kept.refresh() is False and kept.lost
        assert await limits.refresh_leases() == []

    using(settings, body)


# -- failures in a sliding window ----------------------------------------------------------------


def test_failures_count_within_the_window(
    settings: RedisLimitsSettings, inspect: redis.Redis
) -> None:
    key = f"{settings.prefix}:fail:login:mallory"

    async def record(limits: RedisLimits) -> list[tuple[int, float]]:
        return [await limits.record_failure("login", "mallory", window=60) for _ in range(3)]

    counts = using(settings, record)
    assert [c for c, _ in counts] == [1, 2, 3]
    assert all(0 < wait <= 60 for _, wait in counts)
    assert 59_000 < inspect.pttl(key) <= 60_000

    # The two oldest failures fall out of the window.
    now = server_ms(inspect)
    for member in inspect.zrange(key, 0, 1):
        inspect.zadd(key, {member: now - 61_000}, xx=True)

    async def count(limits: RedisLimits) -> tuple[int, float]:
        return await limits.failures("login", "mallory", window=60)

    assert using(settings, count)[0] == 1

    async def clear(limits: RedisLimits) -> tuple[int, float]:
        await limits.clear_failures("login", "mallory")
        return await limits.failures("login", "mallory", window=60)

    assert using(settings, clear) == (0, 0.0)


def test_failures_kept_per_key_are_bounded(settings: RedisLimitsSettings) -> None:
    async def body(limits: RedisLimits) -> int:
        for _ in range(8):
            await limits.record_failure("login", "flood", window=60)
        count, _ = await limits.failures("login", "flood", window=60)
        return count

    assert using(settings, body, failures_kept=5) == 5


def test_lockout_over_a_source_and_a_user_in_one_call(
    settings: RedisLimitsSettings, inspect: redis.Redis
) -> None:
    source = Window("login_source", "10.0.0.9", 60, 3)
    user = Window("login_user", "alice", 60, 5)

    async def body(limits: RedisLimits) -> list[float | None]:
        waits = [await limits.lockout([source, user])]
        for _ in range(3):
            await limits.record_failures([source, user])
            waits.append(await limits.lockout([source, user]))
        waits.append(await limits.lockout([user]))
        return waits

    waits = using(settings, body)
    # Three failures lock the source out (for up to the window), not yet the user.
    assert waits[:3] == [None, None, None]
    assert waits[3] is not None and 59 < waits[3] <= 60
    assert waits[4] is None
    # The lockout lasts until the allowance-th newest failure leaves the window: with a
    # fourth failure, moving the oldest back 50 s changes nothing; the second does.
    using(settings, lambda limits: limits.record_failures([source]))
    key = f"{settings.prefix}:fail:login_source:10.0.0.9"
    oldest, second, *_ = inspect.zrange(key, 0, -1, withscores=True)

    def lockout() -> float | None:
        return using(settings, lambda limits: limits.lockout([source]))

    inspect.zadd(key, {oldest[0]: oldest[1] - 50_000}, xx=True)
    wait = lockout()
    assert wait is not None and 59 < wait <= 60
    inspect.zadd(key, {second[0]: second[1] - 50_000}, xx=True)
    wait = lockout()
    assert wait is not None and 9 < wait <= 10


def test_lockout_refuses_nonsense(settings: RedisLimitsSettings) -> None:
    for windows in ([], [Window("a", "b", 0, 1)], [Window("a", "b", 1, 0)]):
        with pytest.raises(ValueError):
            using(settings, lambda limits, w=windows: limits.lockout(w))


# -- when Redis cannot answer ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_redis_raises_then_is_not_tried_for_a_while() -> None:
    clock = Clock()
    settings = RedisLimitsSettings(url=f"redis://127.0.0.1:{closed_port()}/0", down_for=5)

    async def body() -> list[str]:
        limits = RedisLimits.from_settings(settings, clock=clock)
        messages = []
        for advance in (0, 1, 5):
            clock.now += advance
            with pytest.raises(SharedLimitsUnavailable) as caught:
                await limits.take("rps", "x", rate=1, burst=1)
            messages.append(str(caught.value))
        await limits.close()
        return messages

    tried, skipped, tried_again = run(body())
    assert "not tried" not in tried and "ConnectionError" in tried
    assert "not tried, down for 4.00 s more" in skipped
    assert "not tried" not in tried_again


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections, reads, never answers: a hung Redis."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("operation", ["take", "acquire", "failures", "ping"])
def test_silent_redis_times_out_with_the_documented_error(
    silent_server: int, operation: str
) -> None:
    settings = RedisLimitsSettings(
        url=f"redis://127.0.0.1:{silent_server}/0", connect_timeout=0.1, command_timeout=0.1
    )

    async def body() -> None:
        limits = RedisLimits.from_settings(settings)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "take": lambda: limits.take("rps", "x", rate=1, burst=1),
            "acquire": lambda: limits.acquire("conns", "x", maximum=1),
            "failures": lambda: limits.record_failure("login", "x", window=1),
            "ping": limits.ping,
        }
        with pytest.raises(SharedLimitsUnavailable, match="Timeout"):
            await calls[operation]()
        await limits.close()

    run(body())


def test_redis_going_away_mid_run_raises_the_documented_error() -> None:
    server = RedisServer.start()  # our own, to stop
    settings = RedisLimitsSettings(url=server.url, down_for=0)

    async def body() -> None:
        limits = RedisLimits.from_settings(settings)
        assert await limits.take("rps", "x", rate=SLOW, burst=5) is None
        server.stop()
        with pytest.raises(SharedLimitsUnavailable):
            await limits.take("rps", "x", rate=SLOW, burst=5)
        await limits.close()

    try:
        run(body())
    finally:
        server.stop()


# -- event loops -------------------------------------------------------------------------------


def _scenario(settings: RedisLimitsSettings) -> Callable[[], Coroutine[Any, Any, list[object]]]:
    async def main() -> list[object]:
        limits = RedisLimits.from_settings(settings)
        lease = await limits.acquire("conns", "loop", maximum=1)
        assert lease is not None
        result: list[object] = [
            await limits.take("rps", "loop", rate=SLOW, burst=1),
            await limits.acquire("conns", "loop", maximum=1),
            (await limits.record_failure("login", "loop", window=10))[0],
        ]
        await lease.release()
        await limits.close()
        return result

    return main


def test_works_on_uvloop(settings: RedisLimitsSettings) -> None:
    assert uvloop.run(_scenario(settings)()) == [None, None, 1]


def test_works_on_tornado_ioloop(settings: RedisLimitsSettings) -> None:
    # Eyewall's I/O layer: Tornado's IOLoop on asyncio's default loop.
    assert IOLoop(make_current=False).run_sync(_scenario(settings)) == [None, None, 1]


def test_public_api_is_pinned() -> None:
    from eyewall.shared import redis_limits

    assert sorted(redis_limits.__all__) == [
        "Bucket",
        "Lease",
        "RedisLimits",
        "RedisLimitsSettings",
        "SharedLimitsUnavailable",
        "Window",
    ]
    public = sorted(n for n in vars(RedisLimits) if not n.startswith("_"))
    assert public == [
        "acquire",
        "clear_failures",
        "close",
        "count",
        "failures",
        "from_settings",
        "held",
        "key",
        "lockout",
        "ping",
        "record_failure",
        "record_failures",
        "refresh_leases",
        "take",
        "take_all",
    ]
