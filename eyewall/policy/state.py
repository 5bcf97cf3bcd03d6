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

from eyewall.policy.auth import Credentials, LoginThrottle
from eyewall.policy.limits import Counter, TokenBuckets

__all__ = ["AdmissionState", "CredentialCache"]


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
        self._verified[credentials.fingerprint(stored)] = until
        self._verified.move_to_end(credentials.fingerprint(stored))
        while len(self._verified) > self.size:
            self._verified.popitem(last=False)

    def __len__(self) -> int:
        return len(self._verified)


class AdmissionState:
    """The mutable side of admission, kept across reloads (see the module docstring)."""

    def __init__(self) -> None:
        self.client_rps = TokenBuckets("client_rps")
        self.user_rps = TokenBuckets("user_rps")
        self.client_connections = Counter("client_connections")
        self.client_tunnels = Counter("client_tunnels")
        self.user_tunnels = Counter("user_tunnels")
        self.logins = LoginThrottle()
        self.credentials = CredentialCache()
