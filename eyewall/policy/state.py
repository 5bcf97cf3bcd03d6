"""What admission remembers between requests: token buckets, open connections and
tunnels, failed logins and verified credentials.

`AdmissionState` is owned by the application, not by the `Policy`: a reload swaps the
policy (rules, users, limit parameters) and keeps this state, so a client at its
connection cap stays there, spent tokens stay spent and a guesser stays locked out.
Pure data structures; time is passed in.  The event loop is the only thread that
touches them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable
from typing import Protocol

from eyewall.policy.auth import Credentials, LoginThrottle
from eyewall.policy.limits import Counter, TokenBuckets

__all__ = ["AdmissionState", "CredentialCache", "LimitsStore", "LimitsUnavailable"]


class LimitsUnavailable(Exception):
    """A shared limits store cannot be reached.  ``fail_open``: let the request through
    without that limit (the store's setting); otherwise refuse it."""

    def __init__(self, message: str, fail_open: bool) -> None:
        super().__init__(message)
        self.fail_open = fail_open


class CredentialCache:
    """Credentials that passed a bcrypt check, until ``now`` passes their expiry.

    Keys are hashes of (user, password, stored hash): the password is never held, and
    a password changed in the user file invalidates the entry.  Bounded; the least
    recently used entry goes first.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._verified: OrderedDict[bytes, float] = OrderedDict()

    def hit(self, credentials: Credentials, stored: bytes | None, now: float) -> bool:
        """Whether ``credentials`` passed a check against ``stored`` and that is still valid at
        ``now`` (seconds, monotonic)."""
        if stored is None:
            return False
        key = credentials.fingerprint(stored)
        expiry = self._verified.get(key)
        if expiry is None:
            return False
        if expiry < now:
            del self._verified[key]
            return False
        self._verified.move_to_end(key)
        return True

    def remember(self, credentials: Credentials, stored: bytes, until: float) -> None:
        """Record that ``credentials`` passed against ``stored``, valid until ``until``."""
        self._verified[credentials.fingerprint(stored)] = until
        self._verified.move_to_end(credentials.fingerprint(stored))
        while len(self._verified) > self.size:
            self._verified.popitem(last=False)

    def __len__(self) -> int:
        return len(self._verified)


class LimitsStore(Protocol):
    """Where the limits live: this process (`AdmissionState`), memory shared by worker
    processes, or Redis.  ``asynchronous`` stores return coroutines from every method
    and raise `LimitsUnavailable` when unreachable; the verified-login cache is always
    this process's own."""

    asynchronous: bool
    credentials: CredentialCache

    def take(
        self, limit: str, key: str, now: float, rate: float, burst: float
    ) -> float | Awaitable[float | None] | None:
        """Spend a token of bucket ``limit`` for ``key``: None, or seconds to wait."""

    def acquire(self, counter: str, key: str, maximum: int) -> bool | Awaitable[bool]:
        """Count one more open ``counter`` for ``key`` unless ``maximum`` (0: unlimited) are
        open; False when at the maximum."""

    def release(self, counter: str, key: str) -> Awaitable[None] | None:
        """Count one fewer open ``counter`` for ``key``."""

    def login_wait(
        self, client: str, user: str | None, now: float
    ) -> float | Awaitable[float | None] | None:
        """Seconds ``client``'s source or ``user`` is locked out for, or None."""

    def login_failed(self, client: str, user: str | None, now: float) -> Awaitable[None] | None:
        """Count a failed login for ``client``'s source and ``user``."""


class AdmissionState:
    """The limits of one process, kept across reloads (see the module docstring), and
    the verified-login cache.  The methods are what admission's limit steps do
    (`eyewall.policy.admission.perform`); a store shared by several processes offers
    the same ones, as coroutines (``asynchronous``)."""

    asynchronous = False

    def __init__(self) -> None:
        self.client_rps = TokenBuckets("client_rps")
        self.user_rps = TokenBuckets("user_rps")
        self.client_connections = Counter("client_connections")
        self.client_tunnels = Counter("client_tunnels")
        self.user_tunnels = Counter("user_tunnels")
        self.logins = LoginThrottle()
        self.credentials = CredentialCache()
        self._buckets = {"client_rps": self.client_rps, "user_rps": self.user_rps}
        self._counters = {
            "client_connections": self.client_connections,
            "client_tunnels": self.client_tunnels,
            "user_tunnels": self.user_tunnels,
        }

    def take(self, limit: str, key: str, now: float, rate: float, burst: float) -> float | None:
        """Spend a token of bucket ``limit`` for ``key``: None, or seconds to wait."""
        limited = self._buckets[limit].take(key, now, rate, burst)
        return None if limited is None else limited.retry_after

    def acquire(self, counter: str, key: str, maximum: int) -> bool:
        """Count one more open ``counter`` (connections, tunnels) for ``key`` unless
        ``maximum`` (0: unlimited) are open."""
        return self._counters[counter].acquire(key, maximum) is None

    def release(self, counter: str, key: str) -> None:
        """Count one fewer open ``counter`` for ``key``."""
        self._counters[counter].release(key)

    def login_wait(self, client: str, user: str | None, now: float) -> float | None:
        """Seconds ``client``'s source or ``user`` is locked out for, or None."""
        return self.logins.locked(client, user, now)

    def login_failed(self, client: str, user: str | None, now: float) -> None:
        """Count a failed login for ``client``'s source and ``user``."""
        self.logins.failed(client, user, now)
