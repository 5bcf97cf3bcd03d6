"""Protected destination ranges (the SSRF guard's list) and network parsing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eyewall.policy.networks import PROTECTED, NetworkSet, parse_network, protected_range

IPV4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)
IPV4_PROTECTED = [(int(n.network_address), int(n.netmask)) for n, _ in PROTECTED if n.version == 4]


def expected_protected(ip: ipaddress.IPv4Address) -> bool:
    """Independently of `protected_range`: a mask-and-compare over PROTECTED's IPv4 rows."""
    return any(int(ip) & mask == base for base, mask in IPV4_PROTECTED)


@pytest.mark.parametrize(("network", "label"), PROTECTED, ids=[str(n) for n, _ in PROTECTED])
def test_first_and_last_address_of_every_protected_range(network, label: str) -> None:
    for ip in (network[0], network[-1]):
        verdict = protected_range(str(ip))
        assert verdict is not None, ip
        # The verdict is "label, network" of the first row containing ip: this very row,
        # except 240.0.0.0/4's last address, the broadcast address listed before it.
        assert any(verdict == f"{lb}, {n}" and ip in n for n, lb in PROTECTED), verdict
        if str(ip) != "255.255.255.255":
            assert verdict == f"{label}, {network}"


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.255",
        "192.0.3.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "198.51.99.255",
        "203.0.112.255",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "::2:0:0:1",
        "2001:db7:ffff::1",
        "2001:db9::1",
        "fbff:ffff::1",
        "100:0:0:1::",
    ],
)
def test_public_addresses_are_not_protected(address: str) -> None:
    assert protected_range(address) is None


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("127.0.0.1", "127.0.0.0/8"),
        ("::1", "::1/128"),
        ("::", "::/128"),
        ("10.1.2.3", "10.0.0.0/8"),
        ("172.31.255.255", "172.16.0.0/12"),
        ("192.168.1.1", "192.168.0.0/16"),
        ("100.100.100.200", "100.64.0.0/10"),  # Alibaba Cloud metadata sits in CGNAT
        ("169.254.169.254", "169.254.0.0/16"),  # AWS, GCP, Azure metadata
        ("fd00:ec2::254", "fc00::/7"),  # AWS metadata over IPv6
        ("fe80::1", "fe80::/10"),
        ("ff02::1", "ff00::/8"),
        ("0.0.0.0", "0.0.0.0/8"),
        ("255.255.255.255", "broadcast, 255.255.255.255/32"),
    ],
)
def test_well_known_protected_addresses(address: str, network: str) -> None:
    verdict = protected_range(address)
    assert verdict is not None and network in verdict, verdict


def test_cloud_metadata_is_labelled_as_such() -> None:
    assert "metadata" in (protected_range("169.254.169.254") or "")


@pytest.mark.parametrize(
    ("address", "inner_network"),
    [
        ("::ffff:127.0.0.1", "127.0.0.0/8"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "169.254.0.0/16"),
        ("::127.0.0.1", "127.0.0.0/8"),  # IPv4-compatible
        ("::10.0.0.1", "10.0.0.0/8"),
        ("64:ff9b::a00:1", "10.0.0.0/8"),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", "127.0.0.0/8"),
        ("2002:c0a8:0101::1", "192.168.0.0/16"),  # 6to4 of 192.168.1.1
        ("2002:a9fe:a9fe::", "169.254.0.0/16"),
    ],
)
def test_embedded_ipv4_inherits_its_protection(address: str, inner_network: str) -> None:
    verdict = protected_range(address)
    assert verdict is not None, address
    assert inner_network in verdict and "via" in verdict, verdict


@pytest.mark.parametrize(
    "address", ["::ffff:8.8.8.8", "::8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_embedded_public_ipv4_stays_public(address: str) -> None:
    assert protected_range(address) is None


@given(IPV4)
def test_ipv4_verdict_is_exactly_membership_in_the_protected_ipv4_networks(ip) -> None:
    assert (protected_range(str(ip)) is not None) == expected_protected(ip)


@given(IPV4)
def test_every_embedding_of_an_ipv4_address_gets_its_verdict(ip) -> None:
    v4 = int(ip)
    embeddings = {
        "mapped": ipaddress.IPv6Address((0xFFFF << 32) | v4),
        "nat64": ipaddress.IPv6Address((0x64FF9B << 96) | v4),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | 1),
    }
    if v4 > 1:  # ::0 and ::1 are the unspecified and loopback addresses themselves
        embeddings["compatible"] = ipaddress.IPv6Address(v4)
    expected = expected_protected(ip)
    for form, address in embeddings.items():
        assert (protected_range(str(address)) is not None) == expected, (form, address)


@given(IPV4)
def test_ipv4_mapped_form_has_the_same_verdict_as_the_ipv4_address(ip) -> None:
    plain = protected_range(str(ip)) is not None
    assert (protected_range(f"::ffff:{ip}") is not None) == plain


@pytest.mark.parametrize("address", ["", "example.com", "10.0.0.256", "::g", "10.0.0.0/8"])
def test_protected_range_rejects_what_is_not_an_address(address: str) -> None:
    with pytest.raises(ValueError):
        protected_range(address)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits set: allowed, masked off
        (" 192.168.1.0/24 ", "192.168.1.0/24"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_parse_network_accepts_cidrs_and_bare_addresses(text: str, expected: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize("text", ["", "10.0.0.0/33", "10.0.0.0/x", "example.com", "::1/129"])
def test_parse_network_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_network(text)


def test_network_set_membership_is_remembered_and_bounded() -> None:
    nets = NetworkSet([parse_network("10.0.0.0/8"), parse_network("2001:db8::/32")], memo=2)
    assert "10.1.2.3" in nets and "::ffff:10.1.2.3" in nets  # IPv4-mapped is IPv4
    assert "2001:db8::1%eth0" in nets  # the zone is ignored
    assert "192.0.2.1" not in nets and 5 not in nets
    assert len(nets._known) <= 2  # forgotten at once when full
    assert not NetworkSet([]) and nets
