"""Proxy authentication, Basic scheme (RFC 9110 §11.7.1, RFC 7617), and its defence
against password guessing.

Users come from an htpasswd file and/or inline entries, bcrypt hashes only.  A bcrypt
check costs tens of milliseconds on purpose, so the I/O layer runs `Users.verify` in a
thread; this module only decides.  An unknown user is checked against a dummy hash of
the same cost as the configured users' hashes, so the time a check takes does not tell
which names exist.

`LoginThrottle` is the brute-force defence: failed logins are counted per source
network (an IPv4 address, an IPv6 /64, since one IPv6 client holds a whole /64) and per
user name in a sliding window; a source or a name over its allowance is locked out —
answered at once, without a bcrypt check, whatever the password — until the window
frees a slot.  A success resets nothing (a guesser's own account must not wipe its
count), and a client that hangs up early gains nothing (its check is either not run or
counted).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import threading
from collections import Counter as Tally
from collections.abc import Mapping
from dataclasses import dataclass

import bcrypt

__all__ = [
    "Credentials",
    "HtpasswdError",
    "LoginThrottle",
    "Users",
    "parse_basic",
    "parse_htpasswd",
    "source_key",
]

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
DEFAULT_COST = 10
MAX_USER = 256  # characters of a user name (Basic credentials, user files)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password from a ``Proxy-Authorization: Basic`` field."""

    user: str
    password: str

    def fingerprint(self, salt: bytes = b"") -> bytes:
        """A cache key that does not hold the password (a Basic user name never
        contains ":", so the pair is unambiguous); ``salt`` binds it to the stored hash,
        so a changed password invalidates what was cached."""
        return hashlib.sha256(f"{self.user}:{self.password}:".encode() + salt).digest()


def parse_basic(value: str | None) -> Credentials | None:
    """Credentials from a ``Proxy-Authorization: Basic ...`` value, or None when the
    value is missing, another scheme, or malformed (bad base64, not UTF-8, no colon,
    an empty user name or one longer than `MAX_USER` characters, which no user file
    holds: it is never checked, logged or recorded)."""
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
    if not colon or not user or len(user) > MAX_USER:
        return None
    return Credentials(user, password)


def _check_hash(user: str, hashed: str, where: str) -> bytes:
    if not hashed.startswith(_BCRYPT_PREFIXES):
        raise ValueError(f"{where}: user {user!r} has an unsupported hash (only bcrypt)")
    if not _BCRYPT_HASH.fullmatch(hashed):
        raise ValueError(f"{where}: user {user!r} has a malformed bcrypt hash")
    return hashed.encode()


class HtpasswdError(ValueError):
    """Bad lines in an htpasswd file: ``errors`` has one message per line at fault."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def parse_htpasswd(text: str, where: str) -> dict[str, bytes]:
    """``user:hash`` lines (``htpasswd -B``); blank lines and ``#`` comments skipped.

    Raises `HtpasswdError` naming every line that is not ``user:bcrypt-hash``, as
    ``WHERE:LINE: problem`` (``where`` is the file, or the setting naming it).
    """
    users: dict[str, bytes] = {}
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            errors.append(f"{where}:{number}: expected user:hash")
            continue
        if len(user) > MAX_USER:
            errors.append(f"{where}:{number}: user name longer than {MAX_USER} characters")
            continue
        try:
            users[user] = _check_hash(user, hashed, f"{where}:{number}")
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise HtpasswdError(errors)
    return users


def _cost(hashed: bytes) -> int:
    m = _BCRYPT_HASH.fullmatch(hashed.decode())
    return int(m.group(1)) if m else DEFAULT_COST


class Users:
    """The user database: names, bcrypt hashes and group membership.  Immutable once
    built; a reload builds a new one."""

    def __init__(
        self,
        hashes: Mapping[str, bytes] | None = None,
        groups: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.hashes = dict(hashes or {})
        self.groups_of = dict(groups or {})  # user -> groups
        self.absent: list[str] = []  # "setting: no user 'name'" for names nobody defines
        costs = Tally(_cost(h) for h in self.hashes.values())
        self.costs = frozenset(costs)  # bcrypt costs in use; more than one leaks timing
        self.dummy_cost = costs.most_common(1)[0][0] if costs else DEFAULT_COST
        self._dummy: bytes | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_entries(
        cls,
        inline: Mapping[str, str],
        htpasswd_text: str | None,
        groups: Mapping[str, list[str]],
        where: str = "auth",
        htpasswd_path: str = "",
    ) -> Users:
        """Build from an htpasswd text (read from ``htpasswd_path``, named in errors) and
        inline ``name = hash`` entries (inline wins), with ``group = [users]``.  A group
        member who is not a user is left out and named in ``absent`` (removing a user
        from the file must not make the reload that revokes them fail).  Raises
        ValueError naming the setting at fault (a bad inline hash), or `HtpasswdError`
        naming every bad line of the file."""
        source = f"{where}.htpasswd: {htpasswd_path}" if htpasswd_path else f"{where}.htpasswd"
        hashes = parse_htpasswd(htpasswd_text, source) if htpasswd_text else {}
        for user, hashed in inline.items():
            hashes[user] = _check_hash(user, hashed, f"{where}.users.{user}")
        members: dict[str, set[str]] = {}
        absent: list[str] = []
        for group, names in groups.items():
            for name in names:
                if name not in hashes:
                    absent.append(f"{where}.groups.{group}: no user {name!r}")
                    continue
                members.setdefault(name, set()).add(group)
        users = cls(hashes, {u: frozenset(g) for u, g in members.items()})
        users.absent = absent
        return users

    @property
    def enabled(self) -> bool:
        """Whether any user is configured (then every request must authenticate)."""
        return bool(self.hashes)

    def stored(self, user: str) -> bytes | None:
        """The hash on file for ``user`` (used to bind cached logins to it)."""
        return self.hashes.get(user)

    def _dummy_hash(self) -> bytes:
        with self._lock:
            if self._dummy is None:
                salt = bcrypt.gensalt(rounds=self.dummy_cost)
                self._dummy = bcrypt.hashpw(b"eyewall-dummy-password", salt)
            return self._dummy

    def verify(self, credentials: Credentials) -> bool:
        """The slow check: run it in a thread, never on the event loop.  Takes about as
        long for an unknown user as for a known one (the dummy hash has the users' most
        common cost; it is made by the first check of any user)."""
        dummy = self._dummy_hash()
        hashed = self.hashes.get(credentials.user)
        # bcrypt reads at most 72 bytes (as htpasswd -B does); newer bcrypt raises instead.
        password = credentials.password.encode()[:72]
        try:
            ok = bcrypt.checkpw(password, hashed if hashed is not None else dummy)
        except ValueError:
            return False
        return ok and hashed is not None

    def groups(self, user: str | None) -> frozenset[str]:
        """The groups ``user`` belongs to (empty for None or an unknown user)."""
        return self.groups_of.get(user, frozenset()) if user else frozenset()


def source_key(client: str) -> str:
    """The unit a brute-force throttle counts: an IPv4 address (IPv4-mapped IPv6 too),
    or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class _Window:
    """Event times per key within a sliding window, bounded in keys and per key."""

    def __init__(self, window: float, max_keys: int) -> None:
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, list[float]] = {}

    def recent(self, key: str, now: float) -> list[float]:
        events = self._events.get(key)
        if not events:
            return []
        cutoff = now - self.window
        if events[0] <= cutoff:
            events = [t for t in events if t > cutoff]
            if events:
                self._events[key] = events
            else:
                del self._events[key]
        return events

    def add(self, key: str, now: float, keep: int) -> int:
        events = self.recent(key, now)
        if not events:
            if len(self._events) >= self.max_keys:
                self._prune(now)
            events = self._events[key] = []
        events.append(now)
        del events[:-keep]
        return len(events)

    def _prune(self, now: float) -> None:
        cutoff = now - self.window
        stale = [k for k, ev in self._events.items() if not ev or ev[-1] <= cutoff]
        for key in stale:
            del self._events[key]
        if len(self._events) >= self.max_keys:  # all active: forget the oldest half
            oldest = sorted(self._events, key=lambda k: self._events[k][-1])
            for key in oldest[: len(oldest) // 2]:
                del self._events[key]


class LoginThrottle:
    """Failed logins per source network and per user name within ``window`` seconds.

    A source with ``per_source`` failures in the window, or a user name with
    ``per_user``, is locked out until its oldest failure leaves the window.
    """

    def __init__(
        self,
        window: float = 60.0,
        per_source: int = 5,
        per_user: int = 20,
        max_keys: int = 100_000,
    ) -> None:
        self.window = window
        self.per_source = per_source
        self.per_user = per_user
        self._sources = _Window(window, max_keys)
        self._users = _Window(window, max_keys)

    def locked(self, client: str, user: str | None, now: float) -> float | None:
        """Seconds until ``client``'s source (or ``user``) may try again, or None."""
        waits = []
        for windows, key, allowance in (
            (self._sources, source_key(client), self.per_source),
            (self._users, user, self.per_user),
        ):
            if key is None:
                continue
            events = windows.recent(key, now)
            if len(events) >= allowance:
                waits.append(events[-allowance] + self.window - now)
        return max(waits) if waits else None

    def failed(self, client: str, user: str | None, now: float) -> int:
        """Count a failed login; returns the source's failures in the window."""
        if user is not None:
            self._users.add(user, now, self.per_user)
        return self._sources.add(source_key(client), now, self.per_source)
