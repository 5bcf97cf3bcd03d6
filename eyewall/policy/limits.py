"""Rate limits per client address and per user: request rate (token bucket with burst)
and things open at once (connections, tunnels).  Pure: time is passed in, never read.

The limit parameters (rate, burst, maximum) are passed with every call rather than kept
here, so that the state in these objects survives a configuration reload that changes
them: a reload applies new limits to the tokens and counts already spent.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Counter", "Limited", "TokenBuckets"]


@dataclass(frozen=True, slots=True)
class Limited:
    """A limit fired: which one (``client_rps``, ``user_tunnels``, ...), for whom (a
    client address or user name), and when to try again (seconds)."""

    limit: str
    key: str
    retry_after: float

    def describe(self) -> str:
        """A one-line account for logs and error bodies."""
        return f"rate limit {self.limit} reached for {self.key}"


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, holding at most ``burst``.

    Memory is bounded by ``max_keys``: when full, buckets that have refilled completely
    (and so carry no state) are forgotten first.
    """

    def __init__(self, name: str, max_keys: int = 100_000) -> None:
        self.name = name
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last update]

    def take(self, key: str, now: float, rate: float, burst: float) -> Limited | None:
        """Spend one token for ``key`` at time ``now`` (seconds, any monotonic origin);
        a `Limited` with the wait until the next token if there is none."""
        burst = max(burst, 1.0)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now, rate, burst)
            self._buckets[key] = [burst - 1.0, now]
            return None
        tokens = min(burst, bucket[0] + max(0.0, now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return None
        bucket[0] = tokens
        return Limited(self.name, key, (1.0 - tokens) / rate)

    def _prune(self, now: float, rate: float, burst: float) -> None:
        full = [k for k, (t, last) in self._buckets.items() if t + (now - last) * rate >= burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


class Counter:
    """Things open at once per key (connections, tunnels)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._open: dict[str, int] = {}

    def acquire(self, key: str, maximum: int) -> Limited | None:
        """Count one more for ``key`` unless ``maximum`` (0: unlimited) are open."""
        n = self._open.get(key, 0)
        if maximum and n >= maximum:
            return Limited(self.name, key, 1.0)
        self._open[key] = n + 1
        return None

    def release(self, key: str) -> None:
        """Count one fewer open for ``key`` (forgotten at zero)."""
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)

    def count(self, key: str) -> int:
        """How many are open for ``key``."""
        return self._open.get(key, 0)

    def total(self) -> int:
        """How many are open for all keys."""
        return sum(self._open.values())
