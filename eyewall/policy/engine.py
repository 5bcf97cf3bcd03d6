"""The policy in force: built from `Settings`, consulted by the proxy for every request.

Checks run in this order: client network (403), authentication (407), request rate
(429), destination rules and guards (403).  Rule decisions are cached per (client,
user, method, scheme, host, port, addresses), so a rule set of any size costs a dictionary
lookup on the hot path; a reload builds a new `Policy` and with it an empty cache.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from eyewall.config import Settings
from eyewall.policy.auth import Credentials, FailureTracker, Users
from eyewall.policy.limits import Counter, Limited, TokenBuckets
from eyewall.policy.networks import IPNetwork, parse_network
from eyewall.policy.rules import Action, Decision, Request, RuleSet, parse_ports
from eyewall.tls.ca import CertificateAuthority, default_ca_dir

__all__ = ["Policy", "PolicyError"]

LOOPBACK = (parse_network("127.0.0.0/8"), parse_network("::1/128"))
CACHE_SIZE = 16_384


class PolicyError(ValueError):
    """The settings cannot make a policy; the message starts with the setting's path."""


@dataclass(frozen=True, slots=True)
class RateLimiters:
    client_rps: TokenBuckets | None
    user_rps: TokenBuckets | None
    client_connections: Counter
    client_tunnels: Counter
    user_tunnels: Counter


class Policy:
    def __init__(
        self, settings: Settings, users: Users, ca: CertificateAuthority | None = None
    ) -> None:
        access = settings.access
        self.settings = settings
        self.ca = ca  # the interception CA, loaded when a rule intercepts
        self.rules = RuleSet(
            settings.rules,
            Action(access.default),
            parse_ports(access.connect_ports, "access.connect_ports"),
            access.allow_private,
        )
        self.clients: tuple[IPNetwork, ...] = (
            tuple(parse_network(n) for n in access.allow_clients) or LOOPBACK
        )
        self.users = users
        self.failures = FailureTracker()
        r = settings.rate_limits
        self.limits = RateLimiters(
            TokenBuckets("client_rps", r.client_rps, r.client_burst or int(2 * r.client_rps))
            if r.client_rps
            else None,
            TokenBuckets("user_rps", r.user_rps, r.user_burst or int(2 * r.user_rps))
            if r.user_rps
            else None,
            Counter("client_connections", r.client_connections),
            Counter("client_tunnels", r.client_tunnels),
            Counter("user_tunnels", r.user_tunnels),
        )
        self._client_ok: dict[str, bool] = {}
        # bcrypt runs here, not on the event loop; two threads so a flood of wrong
        # passwords cannot take every core; checks in progress, by credentials.
        self.verifier = ThreadPoolExecutor(2, thread_name_prefix="bcrypt")
        self.verifying: dict[bytes, asyncio.Future[bool]] = {}
        self._decisions: OrderedDict[tuple[object, ...], Decision] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: Settings, read_text: Callable[[str], str] | None = None
    ) -> Policy:
        """Build the policy; raises PolicyError naming the setting at fault."""
        read = read_text or (lambda p: Path(p).read_text())
        auth = settings.auth
        text = None
        if auth.htpasswd:
            try:
                text = read(auth.htpasswd)
            except OSError as e:
                raise PolicyError(f"auth.htpasswd: cannot read {auth.htpasswd}: {e}") from None
        try:
            users = Users.from_settings(
                dict(auth.users),
                text,
                {g: list(m) for g, m in auth.groups},
                auth.cache_ttl,
            )
        except ValueError as e:
            raise PolicyError(str(e)) from None
        ca = None
        if any(rule.action is Action.INTERCEPT for rule in settings.rules):
            directory = Path(settings.tls.ca_dir) if settings.tls.ca_dir else default_ca_dir()
            try:
                ca = CertificateAuthority.load(directory)
            except (OSError, ValueError) as e:
                raise PolicyError(f"tls.ca_dir: {e}") from None
        return cls(settings, users, ca)

    # -- checks, in the order the proxy makes them --------------------------------------

    def client_allowed(self, client: str) -> bool:
        ok = self._client_ok.get(client)
        if ok is None:
            ip = ip_address(client)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            ok = any(ip.version == n.version and ip in n for n in self.clients)
            if len(self._client_ok) > 65536:
                self._client_ok.clear()
            self._client_ok[client] = ok
        return ok

    @property
    def auth_required(self) -> bool:
        return self.users.enabled

    def request_rate(self, client: str, user: str | None, now: float) -> Limited | None:
        limits = self.limits
        if limits.client_rps is not None:
            limited = limits.client_rps.take(client, now)
            if limited is not None:
                return limited
        if limits.user_rps is not None and user is not None:
            return limits.user_rps.take(user, now)
        return None

    def decide(self, req: Request, addresses: tuple[str, ...] | None) -> Decision:
        key = (req, addresses)
        cache = self._decisions
        decision = cache.get(key)
        if decision is None:
            decision = self.rules.evaluate(req, addresses)
            cache[key] = decision
            if len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        return decision

    def explain(self, req: Request, addresses: tuple[str, ...] | None) -> Decision:
        return self.rules.evaluate(req, addresses, explain=True)

    def groups(self, user: str | None) -> frozenset[str]:
        return self.users.groups(user) if user else frozenset()

    def credentials_cached(self, credentials: Credentials, now: float) -> bool:
        return self.users.cached(credentials, now)
