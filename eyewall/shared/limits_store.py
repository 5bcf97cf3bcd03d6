"""The limits of a fleet: a `LimitsStore` (`eyewall.policy.state`) whose token buckets,
connection and tunnel counts and failed logins live in Redis
(`eyewall.shared.redis_limits`), so that every node behind the load balancer spends
from the same ones.

Each admission step is one round trip: `take` one Lua script, `acquire` one (a lease,
refreshed in the background every third of ``lease_ttl``; a crashed node's expire),
`release` one ZREM, `login_wait` one script over the source's and the user's failure
windows, `login_failed` one pipeline.  The verified-login cache stays in the node
(each node checks a password with bcrypt once per ``auth.cache_ttl``).

When Redis cannot answer within ``connect_timeout + command_timeout``, the step is
decided by ``when_down``:

    local    this node's own limits (`AdmissionState`) decide: the fleet then allows
             up to N times a limit, each node enforcing it alone (the default)
    open     no limit: the request goes through
    closed   `LimitsUnavailable` (not fail-open): the request, connection or tunnel is
             refused with 503

The first failure logs one warning, the recovery one more; in between every check is
counted (`LimitsStoreStats`), not logged.  After a failure Redis is not tried again for
``retry_after`` seconds, so a dead Redis costs nothing per request.  Local state starts
empty when Redis goes away (nothing is written twice while it answers).

The latency each call adds is measured into a histogram (`LimitsStoreStats.latency`,
seconds, by operation).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from eyewall.policy.auth import source_key
from eyewall.policy.state import AdmissionState, CredentialCache, LimitsUnavailable
from eyewall.shared.redis_limits import Lease, RedisLimits, SharedLimitsUnavailable, Window

__all__ = ["LATENCY_BUCKETS", "MODES", "LimitsStoreStats", "RedisLimitsStore"]

log = logging.getLogger("eyewall.shared_limits")
T = TypeVar("T")

MODES = ("local", "open", "closed")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_EFFECT = {
    "local": "each node applies the limits alone",
    "open": "requests go through without the shared limits",
    "closed": "requests, connections and tunnels are refused with 503",
}
_LOCAL, _NONE = "local", "none"  # holdings that are not Redis leases


@dataclass
class LimitsStoreStats:
    """What the store counted, for metrics.  ``unavailable``: checks Redis did not
    answer, by (operation, how they were decided: local, open or closed);
    ``latency``: per operation, counts per bucket of `LATENCY_BUCKETS` (seconds, the
    last for anything slower) and the sum; ``leases_lost``: leases found expired at a
    refresh (their node could not reach Redis for lease_ttl)."""

    unavailable: dict[tuple[str, str], int] = field(default_factory=dict)
    latency: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    leases_lost: int = 0
    up: bool = True

    def observe(self, operation: str, seconds: float) -> None:
        """Count one round trip of ``operation`` that took ``seconds``."""
        counts, total = self.latency.setdefault(
            operation, ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        )
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        total[0] += seconds


class RedisLimitsStore:
    """A `LimitsStore` over ``redis`` for a node; ``local`` decides when Redis cannot
    (``when_down`` "local"), and its verified-login cache and login-throttle
    parameters (window, allowance per source and per user) are the ones used.

    Call `start` on the event loop (it begins the lease refreshes) and `close` at the
    end.  ``when_down`` may be changed at any time (a reload).
    """

    asynchronous = True

    def __init__(
        self,
        redis: RedisLimits,
        local: AdmissionState,
        when_down: str = "local",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if when_down not in MODES:
            raise ValueError(f"when_down must be one of {MODES}, got {when_down!r}")
        self.redis = redis
        self.local = local
        self.credentials: CredentialCache = local.credentials
        self.when_down = when_down
        self.stats = LimitsStoreStats()
        self._clock = clock
        self._holdings: dict[tuple[str, str], list[Lease | str]] = {}
        self._down_since = 0.0
        self._decided_locally = 0
        self._refresher: asyncio.Task[None] | None = None

    # -- the LimitsStore methods ---------------------------------------------------------

    async def take(
        self, limit: str, key: str, now: float, rate: float, burst: float
    ) -> float | None:
        """Spend a token of bucket ``limit`` for ``key``: None, or seconds to wait.
        Raises `LimitsUnavailable` (closed)."""
        try:
            return await self._timed("take", self.redis.take(limit, key, rate, max(burst, 1.0)))
        except SharedLimitsUnavailable as e:
            return self._fallback(
                "take", e, lambda: self.local.take(limit, key, now, rate, burst), None
            )

    async def acquire(self, counter: str, key: str, maximum: int) -> bool:
        """Count one more open ``counter`` for ``key`` unless ``maximum`` (0:
        unlimited, and then Redis is not asked) are open on all nodes together.
        Raises `LimitsUnavailable` (closed)."""
        holdings = self._holdings.setdefault((counter, key), [])
        if not maximum:
            holdings.append(_NONE)
            return True
        try:
            lease = await self._timed("acquire", self.redis.acquire(counter, key, maximum))
        except SharedLimitsUnavailable as e:
            uncounted: str | None = _NONE  # when_down "open": admitted, counted nowhere
            held = self._fallback(
                "acquire",
                e,
                lambda: _LOCAL if self.local.acquire(counter, key, maximum) else None,
                uncounted,
            )
            if held is None:
                self._forget_if_empty(counter, key)
                return False
            holdings.append(held)
            return True
        if lease is None:
            self._forget_if_empty(counter, key)
            return False
        holdings.append(lease)
        return True

    async def release(self, counter: str, key: str) -> None:
        """Give back what `acquire` counted.  A lease Redis cannot take back now
        expires by itself (lease_ttl)."""
        holdings = self._holdings.get((counter, key))
        if not holdings:
            return
        held = holdings.pop()
        self._forget_if_empty(counter, key)
        if held == _LOCAL:
            self.local.release(counter, key)
        elif isinstance(held, Lease):
            try:
                await self._timed("release", held.release())
            except SharedLimitsUnavailable as e:
                self._note_down("release", e, "lease expires")

    async def login_wait(self, client: str, user: str | None, now: float) -> float | None:
        """Seconds ``client``'s source or ``user`` is locked out for by failed logins
        on any node, or None.  Raises `LimitsUnavailable` (closed)."""
        try:
            return await self._timed("login_wait", self.redis.lockout(self._windows(client, user)))
        except SharedLimitsUnavailable as e:
            return self._fallback(
                "login_wait", e, lambda: self.local.login_wait(client, user, now), None
            )

    async def login_failed(self, client: str, user: str | None, now: float) -> None:
        """Count a failed login for ``client``'s source and ``user``.  Raises
        `LimitsUnavailable` (closed)."""
        try:
            await self._timed(
                "login_failed", self.redis.record_failures(self._windows(client, user))
            )
        except SharedLimitsUnavailable as e:
            self._fallback(
                "login_failed", e, lambda: self.local.login_failed(client, user, now), None
            )

    # -- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Begin refreshing this node's leases (on the running loop)."""
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh_forever())

    async def close(self) -> None:
        """Stop refreshing and close the connections; leases still held expire."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        await self.redis.close()

    async def check(self) -> str | None:
        """Ping Redis once: None if it answers, else why not (for a start-up line;
        the store then counts as down, and its recovery is logged)."""
        try:
            await self.redis.ping()
        except SharedLimitsUnavailable as e:
            if self.stats.up:
                self.stats.up = False
                self._down_since = self._clock()
                self._decided_locally = 0
            return str(e)
        return None

    async def _refresh_forever(self) -> None:
        interval = self.redis.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            if not self.redis.held:
                continue
            try:
                lost = await self._timed("refresh", self.redis.refresh_leases())
            except SharedLimitsUnavailable as e:
                self._note_down("refresh", e, "leases kept, tried again")
                continue
            if lost:
                self.stats.leases_lost += len(lost)
                log.warning(
                    "shared limits: %d leases of this node had expired in Redis (it could"
                    " not be reached for shared_limits.lease_ttl); they count no more",
                    len(lost),
                )

    # -- helpers -------------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Open connections and tunnels this node counts, in Redis or locally."""
        return sum(len(h) for h in self._holdings.values())

    def _windows(self, client: str, user: str | None) -> list[Window]:
        throttle = self.local.logins
        windows = [Window("login_source", source_key(client), throttle.window, throttle.per_source)]
        if user is not None:
            windows.append(Window("login_user", user, throttle.window, throttle.per_user))
        return windows

    def _forget_if_empty(self, counter: str, key: str) -> None:
        if not self._holdings.get((counter, key)):
            self._holdings.pop((counter, key), None)

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        result = await call
        self.stats.observe(operation, time.perf_counter() - started)
        if not self.stats.up:
            self._back_up()
        return result

    def _fallback(
        self, operation: str, error: SharedLimitsUnavailable, local: Callable[[], T], open_: T
    ) -> T:
        """Decide a check Redis did not answer, as ``when_down`` says."""
        mode = self.when_down
        self._note_down(operation, error, mode)
        self._decided_locally += 1
        if mode == "local":
            return local()
        if mode == "open":
            return open_
        # The message reaches the client: the details went to the log.
        raise LimitsUnavailable("the proxy's shared limits are unavailable; try again", False)

    def _note_down(self, operation: str, error: SharedLimitsUnavailable, outcome: str) -> None:
        key = (operation, outcome)
        self.stats.unavailable[key] = self.stats.unavailable.get(key, 0) + 1
        if self.stats.up:
            self.stats.up = False
            self._down_since = self._clock()
            self._decided_locally = 0
            log.warning(
                "shared limits: Redis does not answer (%s); %s until it does"
                " (shared_limits.when_down = %s)",
                error,
                _EFFECT[self.when_down],
                self.when_down,
            )

    def _back_up(self) -> None:
        self.stats.up = True
        log.warning(
            "shared limits: Redis answers again after %.1f s; %d checks were decided by"
            " shared_limits.when_down meanwhile",
            self._clock() - self._down_since,
            self._decided_locally,
        )
