"""Destination ranges the proxy protects by default (SSRF guard).

An address is protected when it, or the IPv4 address embedded in it (IPv4-mapped,
IPv4-compatible, NAT64 and 6to4 forms), falls in one of `PROTECTED`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from functools import lru_cache

__all__ = [
    "PROTECTED",
    "IPAddress",
    "IPNetwork",
    "NetworkSet",
    "OwnListeners",
    "parse_network",
    "protected_range",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTECTED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), label)
    for net, label in (
        ("0.0.0.0/8", "'this' network"),
        ("10.0.0.0/8", "private network (RFC 1918)"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private network (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation range"),
        ("192.168.0.0/16", "private network (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking range"),
        ("198.51.100.0/24", "documentation range"),
        ("203.0.113.0/24", "documentation range"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("100::/64", "discard-only"),
        ("2001:db8::/32", "documentation range"),
        ("fc00::/7", "unique local (private IPv6)"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address carried inside an IPv6 one, if any."""
    if ip.version == 4:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    packed = ip.packed
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(packed[-4:])
    return None


@lru_cache(maxsize=4096)
def protected_range(address: str) -> str | None:
    """The name of the protected range ``address`` is in, or None if it is public."""
    ip = ipaddress.ip_address(address)
    inner = embedded_ipv4(ip)
    candidates = (ip, inner) if inner is not None else (ip,)
    for candidate in candidates:
        for network, label in PROTECTED:
            if candidate.version == network.version and candidate in network:
                shown = f"{network}" if candidate is ip else f"{network} via {ip}"
                return f"{label}, {shown}"
    return None


class NetworkSet:
    """Networks and a membership test for addresses, remembered per address (at most
    ``memo`` of them, then forgotten at once).  An IPv4-mapped IPv6 address counts as
    its IPv4 address; a zone (``fe80::1%eth0``) is ignored."""

    def __init__(self, networks: Iterable[IPNetwork], memo: int = 65536) -> None:
        self.networks = tuple(networks)
        self._memo = memo
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` (an IP address string) is in one of the networks; raises
        ValueError for anything else."""
        if not isinstance(address, str):
            return False
        known = self._known.get(address)
        if known is None:
            ip = ipaddress.ip_address(address.partition("%")[0])
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            known = any(ip.version == n.version and ip in n for n in self.networks)
            if len(self._known) >= self._memo:
                self._known.clear()
            self._known[address] = known
        return known


def parse_network(text: str) -> IPNetwork:
    """A CIDR (``10.0.0.0/8``) or a single address; raises ValueError."""
    return ipaddress.ip_network(text.strip(), strict=False)


def _normalised(address: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class OwnListeners:
    """The proxy's own listening addresses: a request aimed at one of them would loop
    into the proxy (hiding the real client) or reach the admin API, so it is refused.

    ``endpoints`` are bound ``(address, port)`` pairs; an unspecified address (0.0.0.0,
    ::) means every address of this host.  ``is_local(address)`` tells whether an
    address belongs to this host (the I/O layer answers it; it is asked only when the
    port is one of the proxy's own).  Every spelling counts: IPv4-mapped IPv6, and the
    unspecified addresses, which reach this host's loopback when connected to.
    """

    def __init__(
        self,
        endpoints: Iterable[tuple[str, int]] = (),
        is_local: Callable[[str], bool] = lambda address: False,
    ) -> None:
        self.is_local = is_local
        self.by_port: dict[int, list[IPAddress]] = {}
        for host, port in endpoints:
            ip = _normalised(host) if host != "localhost" else None
            bound = (
                [ip]
                if ip is not None
                else [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
            )
            self.by_port.setdefault(port, []).extend(bound)

    def __contains__(self, destination: object) -> bool:
        if not isinstance(destination, tuple) or len(destination) != 2:
            return False
        address, port = destination
        bound = self.by_port.get(port)
        if not bound:
            return False
        ip = _normalised(str(address))
        if ip is None:
            return False
        if ip.is_unspecified:
            return True
        for own in bound:
            if own == ip:
                return True
            if own.is_unspecified and (ip.is_loopback or self.is_local(str(ip))):
                return True
        return False
