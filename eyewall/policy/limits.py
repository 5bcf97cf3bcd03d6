"""Rate limits per client address and per user: request rate (token bucket with burst)
and concurrent connections and tunnels.  Time is passed in, never read here."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Counter", "Limited", "TokenBuckets"]


@dataclass(frozen=True, slots=True)
class Limited:
    """A limit fired: which one, for whom, and when to try again."""

    limit: str  # e.g. "client_rps", "user_tunnels"
    key: str  # the client address or user name
    retry_after: float  # seconds

    def describe(self) -> str:
        return f"rate limit {self.limit} reached for {self.key}"


class TokenBuckets:
    """One bucket per key: ``rate`` tokens a second, holding at most ``burst``."""

    def __init__(self, name: str, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.name = name
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last update]

    def take(self, key: str, now: float) -> Limited | None:
        """Spend one token for ``key``; a `Limited` if there is none."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            self._buckets[key] = [self.burst - 1.0, now]
            return None
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return None
        bucket[0] = tokens
        return Limited(self.name, key, (1.0 - tokens) / self.rate)

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely (they carry no state)."""
        full = [
            k
            for k, (t, last) in self._buckets.items()
            if t + (now - last) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()


class Counter:
    """Things open at once per key (connections, tunnels), with a maximum."""

    def __init__(self, name: str, maximum: int) -> None:
        self.name = name
        self.maximum = maximum
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> Limited | None:
        n = self._open.get(key, 0)
        if self.maximum and n >= self.maximum:
            return Limited(self.name, key, 1.0)
        self._open[key] = n + 1
        return None

    def release(self, key: str) -> None:
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)

    def count(self, key: str) -> int:
        return self._open.get(key, 0)
