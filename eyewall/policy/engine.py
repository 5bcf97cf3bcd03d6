"""The access policy in force: client networks, users, limit parameters and rules.

Built by the application from settings (`eyewall.app.build_policy`) and swapped as a
whole on reload; it holds no counters (those are `AdmissionState`'s), only the
configuration and two caches that a new policy starts empty: which client addresses
are allowed, and rule decisions per (request, addresses), so a rule set of any size
costs a dictionary lookup on the hot path.  The order in which the checks are made is
`eyewall.policy.admission.decide`'s.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from eyewall.policy.auth import Users
from eyewall.policy.networks import IPNetwork, NetworkSet, parse_network
from eyewall.policy.rules import Decision, Request, RuleSet

__all__ = ["LOOPBACK", "LimitParameters", "Policy"]

LOOPBACK = (parse_network("127.0.0.0/8"), parse_network("::1/128"))
CACHE_SIZE = 16_384


@dataclass(frozen=True, slots=True)
class LimitParameters:
    """Rate and concurrency limits; 0 means no limit.  Rates are per second, bursts in
    requests (0: twice the rate)."""

    client_rps: float = 0.0
    client_burst: float = 0.0
    user_rps: float = 0.0
    user_burst: float = 0.0
    client_connections: int = 0
    client_tunnels: int = 0
    user_tunnels: int = 0

    @staticmethod
    def burst_of(rate: float, burst: float) -> float:
        """The bucket size for ``rate``: ``burst`` when set, else twice the rate (at least 1)."""
        return burst or max(1.0, 2 * rate)


class Policy:
    """Who may use the proxy and how: ``clients`` (networks allowed to connect; the
    default is loopback only), ``users`` (none: no authentication), ``limits``,
    ``rules`` (destination rules and guards) and ``login_ttl`` (seconds a verified login
    is remembered)."""

    def __init__(
        self,
        rules: RuleSet | None = None,
        clients: tuple[IPNetwork, ...] = LOOPBACK,
        users: Users | None = None,
        limits: LimitParameters | None = None,
        login_ttl: float = 300.0,
    ) -> None:
        self.rules = rules or RuleSet()
        self.clients = clients or LOOPBACK
        self._clients = NetworkSet(self.clients)
        self.users = users or Users()
        self.limits = limits or LimitParameters()
        self.login_ttl = login_ttl
        self._decisions: OrderedDict[tuple[object, ...], Decision] = OrderedDict()

    @property
    def auth_required(self) -> bool:
        """Whether requests must carry Proxy-Authorization."""
        return self.users.enabled

    def client_allowed(self, client: str) -> bool:
        """Whether ``client`` (an IP address; IPv4-mapped IPv6 counts as IPv4) is in one
        of the allowed networks."""
        return client in self._clients

    def decide(self, req: Request, addresses: tuple[str, ...] | None) -> Decision:
        """The rules' decision (see `RuleSet.evaluate`), cached (least recently used
        entries go first)."""
        key = (req, addresses)
        cache = self._decisions
        decision = cache.get(key)
        if decision is None:
            decision = self.rules.evaluate(req, addresses)
            cache[key] = decision
            if len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return decision

    def explain(self, req: Request, addresses: tuple[str, ...] | None) -> Decision:
        """The rules' decision with its step-by-step trace (not cached)."""
        return self.rules.evaluate(req, addresses, explain=True)
