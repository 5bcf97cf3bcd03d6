"""Proxy authentication, Basic scheme (RFC 9110 §11.7.1, RFC 7617).

Users come from an htpasswd file and/or inline entries, bcrypt hashes only.  A bcrypt
check costs tens of milliseconds on purpose, so the proxy runs `Users.verify` in a
thread and remembers successful credentials (by a SHA-256 of them, never the password)
for `cache_ttl` seconds.  Unknown users are checked against a dummy hash, so timing does
not reveal which names exist.  Repeated failures from one client are counted so the
proxy can slow them down and log them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import bcrypt

__all__ = ["Credentials", "FailureTracker", "Users", "parse_basic", "parse_htpasswd"]

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_DUMMY_HASH = bcrypt.hashpw(b"eyewall-dummy-password", bcrypt.gensalt(rounds=10))


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str

    def fingerprint(self) -> bytes:
        """A cache key that does not hold the password (a Basic user name never
        contains ":", so the pair is unambiguous)."""
        return hashlib.sha256(f"{self.user}:{self.password}".encode()).digest()


def parse_basic(value: str | None) -> Credentials | None:
    """Credentials from a ``Proxy-Authorization: Basic ...`` value, or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return Credentials(user, password)


def _check_hash(user: str, hashed: str, where: str) -> bytes:
    if not hashed.startswith(_BCRYPT_PREFIXES):
        raise ValueError(f"{where}: user {user!r} has an unsupported hash (only bcrypt)")
    if not _BCRYPT_HASH.fullmatch(hashed):
        raise ValueError(f"{where}: user {user!r} has a malformed bcrypt hash")
    return hashed.encode()


def parse_htpasswd(text: str, where: str) -> dict[str, bytes]:
    """``user:hash`` lines; blank lines and ``#`` comments skipped."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise ValueError(f"{where} line {number}: expected user:hash")
        users[user] = _check_hash(user, hashed, f"{where} line {number}")
    return users


class Users:
    """The user database: names, bcrypt hashes and group membership."""

    def __init__(
        self,
        hashes: Mapping[str, bytes],
        groups: Mapping[str, frozenset[str]] | None = None,
        cache_ttl: float = 300.0,
        cache_size: int = 10_000,
    ) -> None:
        self.hashes = dict(hashes)
        self.groups_of = dict(groups or {})
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self._verified: OrderedDict[bytes, float] = OrderedDict()

    @classmethod
    def from_settings(
        cls,
        inline: Mapping[str, str],
        htpasswd_text: str | None,
        groups: Mapping[str, list[str]],
        cache_ttl: float,
        where: str = "auth",
    ) -> Users:
        hashes = parse_htpasswd(htpasswd_text, f"{where}.htpasswd") if htpasswd_text else {}
        for user, hashed in inline.items():
            hashes[user] = _check_hash(user, hashed, f"{where}.users.{user}")
        members: dict[str, set[str]] = {}
        for group, names in groups.items():
            for name in names:
                if name not in hashes:
                    raise ValueError(f"{where}.groups.{group}: unknown user {name!r}")
                members.setdefault(name, set()).add(group)
        return cls(hashes, {u: frozenset(g) for u, g in members.items()}, cache_ttl)

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def cached(self, credentials: Credentials, now: float) -> bool:
        """True if these credentials were verified within the cache lifetime."""
        key = credentials.fingerprint()
        expiry = self._verified.get(key)
        if expiry is None:
            return False
        if expiry < now:
            del self._verified[key]
            return False
        return True

    def verify(self, credentials: Credentials) -> bool:
        """The slow check (run it off the event loop); constant time in the password."""
        hashed = self.hashes.get(credentials.user)
        # bcrypt reads at most 72 bytes (as htpasswd -B does); newer bcrypt raises instead.
        password = credentials.password.encode()[:72]
        try:
            ok = bcrypt.checkpw(password, hashed if hashed is not None else _DUMMY_HASH)
        except ValueError:
            return False
        return ok and hashed is not None

    def remember(self, credentials: Credentials, now: float) -> None:
        self._verified[credentials.fingerprint()] = now + self.cache_ttl
        while len(self._verified) > self.cache_size:
            self._verified.popitem(last=False)

    def groups(self, user: str) -> frozenset[str]:
        return self.groups_of.get(user, frozenset())


class FailureTracker:
    """Failed attempts per client in a sliding window, to slow brute force down."""

    def __init__(self, window: float = 60.0, free: int = 3, max_clients: int = 10_000) -> None:
        self.window = window
        self.free = free  # failures before responses start being delayed
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}

    def record(self, client: str, now: float) -> int:
        """Count a failure; returns the failures within the window, this one included."""
        recent = [t for t in self._failures.get(client, ()) if t > now - self.window]
        recent.append(now)
        if len(self._failures) >= self.max_clients and client not in self._failures:
            self._failures.clear()
        self._failures[client] = recent[-100:]
        return len(recent)

    def delay(self, failures: int) -> float:
        """Seconds to hold the 407 back: none at first, then doubling up to 8 s."""
        if failures <= self.free:
            return 0.0
        return min(8.0, 0.25 * 2.0 ** (failures - self.free - 1))

    def clear(self, client: str) -> None:
        self._failures.pop(client, None)
