"""Limits shared by every node of a fleet, kept in Redis: a token bucket per key, a
count of things open at once per key held as expiring leases, and failed logins per
key in a sliding window.

Each operation is one Lua script run atomically on the server, reading the time with
``TIME`` there, so nodes whose clocks disagree still agree on every bucket.  Every key
gets a TTL: an idle bucket, an empty lease set and an old failure count vanish by
themselves.

Leases survive a crashed node, in the sense that its leases do not outlive it: each
lease is a member of a sorted set scored by its expiry, a live node refreshes the
leases it holds (`RedisLimits.refresh_leases`, one pipelined round trip for all of
them, every ``lease_ttl / 3`` or so), and a crashed node's leases expire ``lease_ttl``
after its last refresh; `acquire` drops expired members before counting.

When Redis cannot answer, every call raises `SharedLimitsUnavailable` within
``connect_timeout + command_timeout`` seconds (no retries, no waiting for a free pool
connection beyond that bound), and for ``down_for`` seconds after a failure every call
raises it at once without trying: the caller applies its fail-open or fail-closed
setting.  Exception tree::

    Exception
     └── SharedLimitsUnavailable   Redis unreachable, too slow, or refusing (OOM, ...);
                                   ``__cause__`` is the client's error

Arguments that make no sense (a rate of 0, a cost over the burst) raise `ValueError`
before anything is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = [
    "Bucket",
    "Lease",
    "RedisLimits",
    "RedisLimitsSettings",
    "SharedLimitsUnavailable",
    "Window",
]

T = TypeVar("T")

# Token buckets, all or nothing.  KEYS[i]: a hash {tokens, stamp in µs} per bucket.
# ARGV: rate (tokens/s), burst, cost for each key in turn.  If every bucket holds its
# cost, spends them all and returns {0}; else spends none and returns {i, wait} where i
# is the first bucket short of tokens and wait (a string: Redis truncates Lua numbers)
# the longest time, in seconds, until every bucket holds its cost.  A key expires when
# its bucket would be full again, which is the state a missing key stands for.
TOKEN_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tokens, refused, wait = {}, 0, 0
for i = 1, #KEYS do
  local rate, burst, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'stamp')
  local have, stamp = tonumber(state[1]), tonumber(state[2])
  if have == nil or stamp == nil then
    have, stamp = burst, now
  end
  have = math.min(burst, have + math.max(0, now - stamp) * rate / 1000000)
  tokens[i] = have
  if have < cost then
    if refused == 0 then refused = i end
    wait = math.max(wait, (cost - have) / rate)
  end
end
if refused > 0 then
  return {refused, string.format('%.17g', wait)}
end
for i = 1, #KEYS do
  local rate, burst, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local left = tokens[i] - cost
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', left), 'stamp', now)
  redis.call('PEXPIRE', KEYS[i], math.max(1, math.ceil((burst - left) / rate * 1000)))
end
return {0}
"""

# Lease acquisition.  KEYS[1]: a sorted set of lease ids scored by expiry (ms).
# ARGV: maximum, ttl (ms), lease id.  Returns {1, count} or {0, count, ms until the
# first lease expires}.  The set lives as long as its longest lease.
ACQUIRE = """
local maximum, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count >= maximum then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, count, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {1, count + 1}
"""

# Lease refresh.  KEYS[1], ARGV: ttl (ms), lease id.  Returns 1, or 0 if the lease had
# expired (or was released) and is gone: it is not brought back.
REFRESH = """
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# Live leases.  KEYS[1].  Returns the number of unexpired members.
COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

# Failures in a sliding window.  KEYS[1]: a sorted set of failure ids scored by time
# (ms).  ARGV: window (ms), failure id or '' to only count, most entries kept.
# Returns {count in the window, ms until the oldest of them leaves it}.
FAILURES = """
local window, id, most = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
if id ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(most + 1))
  redis.call('PEXPIRE', KEYS[1], math.ceil(window))
end
local count = redis.call('ZCOUNT', KEYS[1], '(' .. (now - window), '+inf')
if count == 0 then
  return {0, 0}
end
local first = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - window), '+inf',
  'WITHSCORES', 'LIMIT', 0, 1)
return {count, math.ceil(tonumber(first[2]) + window - now)}
"""

# Lockout over several failure windows.  KEYS[i]: failure sets as FAILURES keeps them.
# ARGV: window (ms) and allowance for each key in turn.  Returns, as a string, the
# longest time (ms) until every key has fewer than its allowance of failures in its
# window, or -1 if none has that many now.  The failure that must leave the window is
# the allowance-th newest: the (count - allowance)-th oldest, counting from 0.
LOCKOUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local wait = -1
for i = 1, #KEYS do
  local window, allowance = tonumber(ARGV[2*i-1]), tonumber(ARGV[2*i])
  local since = '(' .. (now - window)
  local count = redis.call('ZCOUNT', KEYS[i], since, '+inf')
  if count >= allowance then
    local entry = redis.call('ZRANGEBYSCORE', KEYS[i], since, '+inf', 'WITHSCORES',
      'LIMIT', count - allowance, 1)
    wait = math.max(wait, tonumber(entry[2]) + window - now)
  end
end
return string.format('%.17g', wait)
"""


class SharedLimitsUnavailable(Exception):
    """Redis did not answer in time, could not be reached, or refused the command.

    The limit was neither checked nor counted.  The caller applies its setting: fail
    open (admit) or fail closed (refuse, e.g. 503).
    """


@dataclass(frozen=True, slots=True)
class RedisLimitsSettings:
    """Where Redis is and how long to wait for it.

    ``url``: ``redis://host:port/db``, ``rediss://`` for TLS, ``unix:///path?db=0``.
    ``connect_timeout``, ``command_timeout`` (seconds): a call raises
    `SharedLimitsUnavailable` after at most their sum.
    ``down_for`` (seconds): after a failure, calls fail at once for this long (0: every
    call tries).
    ``max_connections``: the pool's size; a call waits for a free connection within its
    time bound.
    ``lease_ttl`` (seconds): how long a lease outlives its holder's last refresh.
    ``prefix``: put before every key, ``PREFIX:KIND:NAME:KEY``.
    ``failures_kept``: most failures remembered per key (bounds memory under attack).
    """

    url: str = "redis://127.0.0.1:6379/0"
    connect_timeout: float = 0.25
    command_timeout: float = 0.25
    down_for: float = 1.0
    max_connections: int = 32
    lease_ttl: float = 30.0
    prefix: str = "eyewall"
    failures_kept: int = 1000


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket to spend from: ``cost`` tokens of bucket ``name``/``key``, which
    refills at ``rate`` tokens a second up to ``burst``."""

    name: str
    key: str
    rate: float
    burst: float
    cost: float = 1


@dataclass(frozen=True, slots=True)
class Window:
    """Failures of ``name``/``key`` counted over the last ``window`` seconds: with
    ``allowance`` of them in it, the key is locked out until enough leave (`lockout`)."""

    name: str
    key: str
    window: float
    allowance: int


class Lease:
    """One unit of a concurrency limit, held until `release` or until it expires
    ``lease_ttl`` seconds after the last refresh.  ``lost`` turns true when a refresh
    finds it already expired."""

    __slots__ = ("_limits", "_redis_key", "id", "key", "lost", "name", "released")

    def __init__(self, limits: RedisLimits, name: str, key: str, lease_id: str) -> None:
        self._limits = limits
        self._redis_key = limits.key("lease", name, key)
        self.name = name
        self.key = key
        self.id = lease_id
        self.lost = False
        self.released = False

    async def release(self) -> None:
        """Give the lease back.  Idempotent.  It stops being refreshed at once, so if
        Redis is unreachable now (`SharedLimitsUnavailable`) it still expires."""
        if self.released:
            return
        self.released = True
        self._limits._held.pop(self.id, None)
        await self._limits._run(
            "release", lambda: self._limits.client.zrem(self._redis_key, self.id)
        )

    async def refresh(self) -> bool:
        """Push the expiry ``lease_ttl`` seconds on; False if the lease was lost."""
        ok = await self._limits._run("refresh", lambda: self._refresh_call(None))
        if not ok:
            self._mark_lost()
        return bool(ok)

    def _refresh_call(self, pipe: Any) -> Awaitable[Any]:
        ttl = _ms(self._limits.settings.lease_ttl)
        return self._limits._refresh(keys=[self._redis_key], args=[ttl, self.id], client=pipe)

    def _mark_lost(self) -> None:
        self.lost = True
        self._limits._held.pop(self.id, None)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()

    def __repr__(self) -> str:
        return f"Lease({self.name!r}, {self.key!r}, {self.id!r})"


class RedisLimits:
    """The shared limits of one node (one process), over one Redis connection pool.

    ``client`` is a ``redis.asyncio.Redis``; `from_settings` builds one whose timeouts,
    retries and pool follow ``settings``.  ``clock`` (monotonic seconds) is only read
    for ``down_for``.
    """

    def __init__(
        self,
        client: Redis,
        settings: RedisLimitsSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.settings = settings
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._clock = clock
        self._down_until = float("-inf")
        self._last_error = ""
        self._ids = itertools.count(1)
        self._held: dict[str, Lease] = {}
        self._buckets = client.register_script(TOKEN_BUCKETS)
        self._acquire = client.register_script(ACQUIRE)
        self._refresh = client.register_script(REFRESH)
        self._count = client.register_script(COUNT)
        self._failures = client.register_script(FAILURES)
        self._lockout = client.register_script(LOCKOUT)

    @classmethod
    def from_settings(
        cls, settings: RedisLimitsSettings, clock: Callable[[], float] = time.monotonic
    ) -> RedisLimits:
        """A client for ``settings.url`` that never retries and bounds every wait.
        Connects lazily: nothing is sent before the first call."""
        pool = BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.max_connections,
            timeout=settings.connect_timeout + settings.command_timeout,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.command_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(Redis.from_pool(pool), settings, clock)  # the client owns the pool

    def key(self, kind: str, name: str, key: str) -> str:
        """The Redis key of limit ``name`` for ``key``; ``kind`` is tb, lease or fail."""
        return f"{self.settings.prefix}:{kind}:{name}:{key}"

    async def take(
        self, name: str, key: str, rate: float, burst: float, cost: float = 1
    ) -> float | None:
        """Spend ``cost`` tokens from bucket ``name``/``key``, which refills at ``rate``
        tokens a second up to ``burst``.  None if they were there (allowed), else the
        seconds until they will be (nothing is spent then).

        Raises `ValueError` unless 0 < rate and 0 < cost <= burst;
        `SharedLimitsUnavailable`.
        """
        refused = await self.take_all([Bucket(name, key, rate, burst, cost)])
        return None if refused is None else refused[1]

    async def take_all(self, buckets: Sequence[Bucket]) -> tuple[Bucket, float] | None:
        """Spend from every bucket of ``buckets`` or from none, in one round trip (say
        the client's and the user's request rates).  None if all were allowed, else the
        first bucket short of tokens and the seconds until all will have theirs.

        All keys go to one script: with Redis Cluster they would need one hash slot.
        Raises `ValueError` for no buckets, the same bucket twice, or a bucket as
        `take` would;
        `SharedLimitsUnavailable`.
        """
        if not buckets or len({(b.name, b.key) for b in buckets}) < len(buckets):
            raise ValueError("need one or more distinct buckets")
        keys, args = [], []
        for b in buckets:
            if not (b.rate > 0 and 0 < b.cost <= b.burst):
                raise ValueError(f"need 0 < rate and 0 < cost <= burst, got {b}")
            keys.append(self.key("tb", b.name, b.key))
            args += [b.rate, b.burst, b.cost]
        reply = await self._run("take", lambda: self._buckets(keys=keys, args=args))
        refused = int(reply[0])
        return None if refused == 0 else (buckets[refused - 1], float(reply[1]))

    async def acquire(self, name: str, key: str, maximum: int) -> Lease | None:
        """Take one of ``maximum`` leases of ``name``/``key``: a `Lease`, refreshed by
        `refresh_leases` until released, or None if ``maximum`` are held already.

        Raises `ValueError` if ``maximum`` < 1; `SharedLimitsUnavailable`.
        """
        if maximum < 1:
            raise ValueError(f"maximum must be at least 1, got {maximum}")
        lease = Lease(self, name, key, f"{self.node_id}:{next(self._ids)}")
        ttl = _ms(self.settings.lease_ttl)
        reply = await self._run(
            "acquire",
            lambda: self._acquire(keys=[lease._redis_key], args=[maximum, ttl, lease.id]),
        )
        if not int(reply[0]):
            return None
        self._held[lease.id] = lease
        return lease

    async def count(self, name: str, key: str) -> int:
        """How many unexpired leases of ``name``/``key`` exist, on every node together.

        Raises `SharedLimitsUnavailable`."""
        reply = await self._run("count", lambda: self._count(keys=[self.key("lease", name, key)]))
        return int(reply)

    @property
    def held(self) -> int:
        """How many leases this node holds and refreshes."""
        return len(self._held)

    async def refresh_leases(self) -> list[Lease]:
        """Refresh every lease this node holds, in one pipelined round trip.  Returns
        those found lost (expired before this refresh; they are marked ``lost`` and no
        longer refreshed).

        Raises `SharedLimitsUnavailable`; the leases are then kept and tried again
        next time (they expire if Redis stays away longer than ``lease_ttl``).
        """
        leases = list(self._held.values())
        if not leases:
            return []

        async def batch() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for lease in leases:
                    await lease._refresh_call(pipe)
                return await pipe.execute()

        results = await self._run("refresh_leases", batch)
        lost = [lease for lease, ok in zip(leases, results, strict=True) if not int(ok)]
        for lease in lost:
            lease._mark_lost()
        return lost

    async def record_failure(self, name: str, key: str, window: float) -> tuple[int, float]:
        """Count one failure (a failed login, say) for ``name``/``key``.  Returns the
        failures within the last ``window`` seconds, this one included, and the seconds
        until the oldest of them leaves the window.  Use one window per ``name``.

        Raises `ValueError` if ``window`` <= 0; `SharedLimitsUnavailable`.
        """
        return await self._failures_call(name, key, window, secrets.token_hex(8))

    async def failures(self, name: str, key: str, window: float) -> tuple[int, float]:
        """The failures of ``name``/``key`` within the last ``window`` seconds, and the
        seconds until the oldest of them leaves it ((0, 0.0) if none).  Counts only.

        Raises `ValueError` if ``window`` <= 0; `SharedLimitsUnavailable`.
        """
        return await self._failures_call(name, key, window, "")

    async def lockout(self, windows: Sequence[Window]) -> float | None:
        """Seconds until every window of ``windows`` holds fewer failures than its
        allowance (the longest wait), or None if none is at its allowance: whether a
        login may be tried, for a source and a user name in one round trip.

        Raises `ValueError` for no windows, a window <= 0 or an allowance < 1;
        `SharedLimitsUnavailable`.
        """
        keys, args = self._windows(windows)
        reply = await self._run("lockout", lambda: self._lockout(keys=keys, args=args))
        wait = float(reply)
        return None if wait < 0 else wait / 1000

    async def record_failures(self, windows: Sequence[Window]) -> None:
        """Count one failure in each of ``windows``, in one round trip (pipelined).

        Raises `ValueError` as `lockout`; `SharedLimitsUnavailable`.
        """
        keys, args = self._windows(windows)
        kept = self.settings.failures_kept

        async def batch() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for i, key in enumerate(keys):
                    token = secrets.token_hex(8)
                    await self._failures(keys=[key], args=[args[2 * i], token, kept], client=pipe)
                return await pipe.execute()

        await self._run("record_failures", batch)

    def _windows(self, windows: Sequence[Window]) -> tuple[list[str], list[float]]:
        if not windows:
            raise ValueError("need one or more windows")
        keys: list[str] = []
        args: list[float] = []
        for w in windows:
            if w.window <= 0 or w.allowance < 1:
                raise ValueError(f"need 0 < window and 1 <= allowance, got {w}")
            keys.append(self.key("fail", w.name, w.key))
            args += [w.window * 1000, w.allowance]
        return keys, args

    async def clear_failures(self, name: str, key: str) -> None:
        """Forget the failures of ``name``/``key`` (after a successful login, say).

        Raises `SharedLimitsUnavailable`."""
        await self._run("clear_failures", lambda: self.client.delete(self.key("fail", name, key)))

    async def _failures_call(
        self, name: str, key: str, window: float, failure_id: str
    ) -> tuple[int, float]:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        args: list[float | str] = [window * 1000, failure_id, self.settings.failures_kept]
        count, wait_ms = await self._run(
            "failures",
            lambda: self._failures(keys=[self.key("fail", name, key)], args=args),
        )
        return int(count), int(wait_ms) / 1000

    async def ping(self) -> None:
        """Check that Redis answers.  Raises `SharedLimitsUnavailable`."""
        await self._run("ping", self.client.ping)

    async def close(self) -> None:
        """Close the pool's connections.  Held leases are not released: they expire."""
        await self.client.aclose()

    async def _run(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` within the time bound, with every failure made one exception."""
        now = self._clock()
        if now < self._down_until:
            raise SharedLimitsUnavailable(
                f"redis {what}: not tried, down for {self._down_until - now:.2f} s more "
                f"after: {self._last_error}"
            )
        bound = self.settings.connect_timeout + self.settings.command_timeout
        try:
            async with asyncio.timeout(bound):
                return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self.settings.down_for > 0:
                self._down_until = self._clock() + self.settings.down_for
            raise SharedLimitsUnavailable(f"redis {what}: {self._last_error}") from exc


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
