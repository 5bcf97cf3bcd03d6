"""Destination rules: ordered, first match wins, an explicit default, built-in guards.

A rule matches when every condition it names matches (conditions are ANDed; the values
in one condition are ORed).  Conditions:

    hosts     exact names, "*.example.com" (subdomains only) or ".example.com" (the
              domain and its subdomains); an IP address matches in every spelling
              (targets' hosts come as `eyewall.http1.target.canonical_host` writes them)
    host_regex  a regular expression searched in the host name (an address in its
              canonical form: 127.0.0.1, never 127.1 or 2130706433)
    networks  destination CIDRs, matched against the resolved addresses
    ports     ports or ranges ("8000-8100")
    methods   request methods;  schemes: "http", "https" (absolute-form) or "connect"
    users, groups   the authenticated user;  clients: client CIDRs

After the rules, two guards apply to whatever was allowed:

    connect-port         CONNECT only to `connect_ports`, unless the matching allow rule
                         names the port in its own `ports`
    private-destination  no connection to protected ranges (loopback, RFC 1918,
                         link-local/metadata, CGNAT, ULA, multicast, ...), unless
                         `allow_private`, the rule says `private = true`, or the rule's
                         own `networks` contain the address
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from eyewall.http1.target import canonical_host
from eyewall.policy.networks import IPNetwork, embedded_ipv4, parse_network, protected_range

__all__ = ["Action", "Decision", "Request", "Rule", "RuleSet", "compile_rule", "parse_ports"]

_RULE_KEYS = {
    "id",
    "action",
    "message",
    "hosts",
    "host_regex",
    "networks",
    "ports",
    "methods",
    "schemes",
    "users",
    "groups",
    "clients",
    "private",
}
_SCHEMES = {"http", "https", "connect"}


class Action(enum.Enum):
    """What a rule does with a request: allow, deny, intercept (CONNECT only), or resolve
    (evaluate again once the name's addresses are known)."""

    ALLOW = "allow"
    DENY = "deny"
    INTERCEPT = "intercept"  # TLS interception of matching CONNECTs
    RESOLVE = "resolve"  # not a decision yet: evaluate again with the resolved addresses


@dataclass(frozen=True, slots=True)
class Request:
    """What the rules look at."""

    client: str  # client IP address
    method: str
    scheme: str  # "http", "https" or "connect"
    host: str
    port: int
    user: str | None = None
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of evaluating the rules for one request: the action, the rule or guard that
    decided it, and the addresses the proxy may connect to."""

    action: Action
    rule: str  # the rule id, "default", or a guard name
    message: str = ""
    # Addresses the proxy may connect to; None means "whatever the name resolves to".
    addresses: tuple[str, ...] | None = None
    trace: tuple[str, ...] = ()  # why, step by step (filled when asked to explain)


RESOLVE = Decision(Action.RESOLVE, "")


def parse_ports(values: Sequence[Any], path: str) -> tuple[tuple[int, int], ...]:
    """Port numbers and ``low-high`` ranges from a config list (``path`` names it in errors).
    Raises ValueError for anything else or a port outside 1..65535."""
    ranges = []
    for i, value in enumerate(values):
        text = str(value).strip()
        low, sep, high = text.partition("-")
        if not all(p.isascii() and p.isdigit() for p in ((low, high) if sep else (low,))):
            raise ValueError(f"{path}[{i}]: not a port or range: {value!r}")
        lo, hi = int(low), int(high) if sep else int(low)
        if not 0 < lo <= hi < 65536:
            raise ValueError(f"{path}[{i}]: ports must be 1-65535: {value!r}")
        ranges.append((lo, hi))
    return tuple(ranges)


def _in_ports(port: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


@dataclass(frozen=True)
class Rule:
    """One destination rule: match conditions (hosts, domains, networks, ports, methods,
    clients, users, groups) and an action; all given conditions must match."""

    id: str
    action: Action
    message: str = ""
    hosts: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()  # ".example.com": the domain and its subdomains
    subdomains: tuple[str, ...] = ()  # "*.example.com": subdomains only (".example.com")
    host_regex: re.Pattern[str] | None = None
    networks: tuple[IPNetwork, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    methods: frozenset[str] = frozenset()
    schemes: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    clients: tuple[IPNetwork, ...] = ()
    private: bool = False
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def match(self, req: Request, addresses: tuple[str, ...] | None) -> str | None:
        """None if the rule matches, else the first condition that does not."""
        if self.hosts or self.domains or self.subdomains or self.host_regex is not None:
            host = req.host
            inner = _reached(host) if host[-1:].isdigit() or ":" in host else None
            if not (self._names(host) or (inner is not None and self._names(inner))):
                return "host"
        if self.ports and not _in_ports(req.port, self.ports):
            return "port"
        if self.methods and req.method.upper() not in self.methods:
            return "method"
        if self.schemes and req.scheme not in self.schemes:
            return "scheme"
        if self.users and req.user not in self.users:
            return "user"
        if self.groups and not (self.groups & req.groups):
            return "group"
        if self.clients and not _in_networks(req.client, self.clients):
            return "client"
        if self.networks:
            assert addresses is not None, "networks need resolved addresses"
            if not any(_in_networks(a, self.networks, inner=True) for a in addresses):
                return "network"
        return None

    def _names(self, host: str) -> bool:
        return bool(
            host in self.hosts
            or any(host == d or host.endswith("." + d) for d in self.domains)
            or any(host.endswith(s) for s in self.subdomains)
            or (self.host_regex is not None and self.host_regex.search(host))
        )


@lru_cache(maxsize=1024)
def _reached(host: str) -> str | None:
    """The other address a connection to ``host`` (an address) reaches, so that a rule
    naming that one covers it: the IPv4 address an IPv6 one carries (NAT64
    64:ff9b::/96, 6to4, IPv4-compatible; `embedded_ipv4`), or this host's loopback for
    an unspecified address (0.0.0.0, ::); None for anything else."""
    try:
        ip = ip_address(host)
    except ValueError:
        return None
    other = _alias(ip)
    return str(other) if other is not None else None


def _alias(ip: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address | None:
    if ip.is_unspecified:
        return _LOOPBACK_V4 if ip.version == 4 else _LOOPBACK_V6
    return embedded_ipv4(ip) if ip.version == 6 else None


_LOOPBACK_V4 = IPv4Address("127.0.0.1")
_LOOPBACK_V6 = IPv6Address("::1")


def _in_networks(address: str, networks: tuple[IPNetwork, ...], inner: bool = False) -> bool:
    """``address`` in one of ``networks``; an IPv4-mapped address counts as its IPv4
    address, and with ``inner`` (destinations) an address counts as the one a
    connection to it reaches too (`_reached`: the IPv4 address inside NAT64, 6to4 and
    IPv4-compatible ones, this host's loopback for 0.0.0.0 and ::)."""
    ip = ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if any(ip.version == n.version and ip in n for n in networks):
        return True
    other = _alias(ip) if inner else None
    return other is not None and any(n.version == other.version and other in n for n in networks)


def _strings(raw: Mapping[str, Any], key: str, path: str) -> list[str]:
    value = raw.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise ValueError(f"{path}.{key}: must be a list of strings")
    return [str(v) for v in value]


def compile_rule(raw: Mapping[str, Any], path: str) -> Rule:
    """Build a rule from its TOML table; ValueError messages start with the path."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: must be a table")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(_RULE_KEYS), n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"{path}.{unknown[0]}: unknown rule field{hint}")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", rule_id):
        raise ValueError(f"{path}.id: required, letters, digits and _ . : - only")
    try:
        action = Action(raw.get("action"))
    except ValueError:
        raise ValueError(f"{path}.action: must be allow, deny or intercept") from None
    if action is Action.RESOLVE:
        raise ValueError(f"{path}.action: must be allow, deny or intercept")
    message = raw.get("message", "")
    if not isinstance(message, str) or len(message) > 500:
        raise ValueError(f"{path}.message: must be a string of at most 500 characters")
    hosts, domains, subdomains = set(), [], []
    for host in _strings(raw, "hosts", path):
        host = host.lower().rstrip(".")
        if host.startswith("*."):
            subdomains.append(host[1:])
        elif host.startswith("."):
            domains.append(host[1:])
        elif host and "*" not in host:
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            hosts.add(canonical_host(host))  # an address as targets write it (any spelling)
        else:
            raise ValueError(f"{path}.hosts: {host!r}: use exact names, *.suffix or .domain")
    regex = raw.get("host_regex")
    pattern = None
    if regex is not None:
        try:
            pattern = re.compile(str(regex), re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"{path}.host_regex: {e}") from None
    networks: list[IPNetwork] = []
    clients: list[IPNetwork] = []
    for key, out in (("networks", networks), ("clients", clients)):
        for n in _strings(raw, key, path):
            try:
                out.append(parse_network(n))
            except ValueError as e:
                raise ValueError(f"{path}.{key}: invalid network: {e}") from None
    schemes = {s.lower() for s in _strings(raw, "schemes", path)}
    if schemes - _SCHEMES:
        raise ValueError(f"{path}.schemes: must be among http, https, connect")
    private = raw.get("private", False)
    if not isinstance(private, bool):
        raise ValueError(f"{path}.private: must be true or false")
    return Rule(
        id=rule_id,
        action=action,
        message=message,
        hosts=frozenset(hosts),
        domains=tuple(domains),
        subdomains=tuple(subdomains),
        host_regex=pattern,
        networks=tuple(networks),
        ports=parse_ports(_strings(raw, "ports", path), f"{path}.ports"),
        methods=frozenset(m.upper() for m in _strings(raw, "methods", path)),
        schemes=frozenset(schemes),
        users=frozenset(_strings(raw, "users", path)),
        groups=frozenset(_strings(raw, "groups", path)),
        clients=tuple(clients),
        private=private,
        source=dict(raw),
    )


@dataclass(frozen=True)
class RuleSet:
    """The destination rules in order, the default action, the ports CONNECT may reach and
    whether private addresses are allowed; first match wins, then the guards."""

    rules: tuple[Rule, ...] = ()
    default: Action = Action.ALLOW
    connect_ports: tuple[tuple[int, int], ...] = ((443, 443),)
    allow_private: bool = False

    def evaluate(
        self, req: Request, addresses: tuple[str, ...] | None, explain: bool = False
    ) -> Decision:
        """The decision for ``req``; `RESOLVE` while it depends on addresses not given."""
        trace: list[str] = []
        chosen: Rule | None = None
        for rule in self.rules:
            if rule.networks and addresses is None:
                return RESOLVE
            failed = rule.match(req, addresses)
            if explain:
                if failed is None:
                    outcome = "matches"
                elif failed == "network" and not addresses:
                    outcome = "no match (no addresses to compare: the name did not resolve)"
                else:
                    outcome = f"no match ({failed} differs)"
                trace.append(f"rule {rule.id} ({rule.action.value}): {outcome}")
            if failed is None:
                chosen = rule
                break
        action = chosen.action if chosen is not None else self.default
        rule_id = chosen.id if chosen is not None else "default"
        if chosen is None and explain:
            trace.append(f"no rule matched: default action {self.default.value}")
        if action is Action.DENY:
            message = chosen.message if chosen is not None else "no rule allows it (access.default)"
            return Decision(action, rule_id, message, trace=tuple(trace))
        port_named = chosen is not None and _in_ports(req.port, chosen.ports)
        if req.scheme == "connect" and not (_in_ports(req.port, self.connect_ports) or port_named):
            message = (
                f"CONNECT to port {req.port} is not allowed (to allow it: access.connect_ports,"
                " or the ports of an allow rule)"
            )
            if explain:
                trace.append(f"guard connect-port: {message}")
            return Decision(Action.DENY, "connect-port", message, trace=tuple(trace))
        exempt = self.allow_private or (chosen is not None and chosen.private)
        if exempt and not (chosen is not None and chosen.networks):
            return Decision(action, rule_id, addresses=addresses, trace=tuple(trace))
        if addresses is None:
            return RESOLVE
        if not addresses:  # the name did not resolve: nothing to guard
            return Decision(action, rule_id, addresses=(), trace=tuple(trace))
        permitted = []
        for address in addresses:
            in_rule = chosen is not None and _in_networks(address, chosen.networks)
            if chosen is not None and chosen.networks and not in_rule:
                if explain:
                    trace.append(f"address {address}: outside rule {rule_id}'s networks")
                continue
            protected = None if (exempt or in_rule) else protected_range(address)
            if protected is None:
                permitted.append(address)
                if explain:
                    trace.append(f"address {address}: allowed")
            elif explain:
                trace.append(f"address {address}: protected ({protected})")
        if not permitted:
            ranges = [protected_range(a) or "outside the rule's networks" for a in addresses]
            detail = "; ".join(f"{a} ({r})" for a, r in zip(addresses, ranges, strict=True))
            message = f"{req.host} resolves only to protected addresses: {detail}"
            if explain:
                trace.append(f"guard private-destination: {message}")
            return Decision(Action.DENY, "private-destination", message, trace=tuple(trace))
        return Decision(action, rule_id, addresses=tuple(permitted), trace=tuple(trace))
