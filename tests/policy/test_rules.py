"""Destination rules, pure: compiling [[rules]] tables and evaluating them, guards included."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eyewall.app import build_policy
from eyewall.config import ConfigError, load_settings
from eyewall.policy.networks import parse_network
from eyewall.policy.rules import Action, Request, RuleSet, compile_rule

PUBLIC = ("93.184.216.34",)  # example.com, outside every protected range


def ruleset(*raws: dict[str, Any], **options: Any) -> RuleSet:
    rules = tuple(compile_rule(raw, f"rules[{i}]") for i, raw in enumerate(raws))
    return RuleSet(rules, **options)


def req(**fields: Any) -> Request:
    base: dict[str, Any] = dict(
        client="127.0.0.1", method="GET", scheme="http", host="example.com", port=80
    )
    base.update(fields)
    base["groups"] = frozenset(base.get("groups", ()))
    return Request(**base)


# --- compile_rule ------------------------------------------------------------------------


def test_compile_rule_reads_every_field() -> None:
    rule = compile_rule(
        {
            "id": "all-fields_1.x:y",
            "action": "deny",
            "message": "not here",
            "hosts": ["Exact.COM.", "*.Sub.com", ".dom.com"],
            "host_regex": "^ads",
            "networks": ["10.0.0.1/8", "2001:db8::/32"],
            "ports": [80, "8000-8100"],
            "methods": ["get", "Post"],
            "schemes": ["HTTP", "connect"],
            "users": ["alice"],
            "groups": ["staff"],
            "clients": ["192.168.0.0/16", "::1"],
            "private": True,
        },
        "rules[0]",
    )
    assert (rule.id, rule.action, rule.message) == ("all-fields_1.x:y", Action.DENY, "not here")
    assert rule.hosts == {"exact.com"}
    assert rule.subdomains == (".sub.com",)
    assert rule.domains == ("dom.com",)
    assert rule.host_regex is not None and rule.host_regex.flags & re.IGNORECASE
    assert rule.networks == (parse_network("10.0.0.0/8"), parse_network("2001:db8::/32"))
    assert rule.ports == ((80, 80), (8000, 8100))
    assert rule.methods == {"GET", "POST"}
    assert rule.schemes == {"http", "connect"}
    assert (rule.users, rule.groups) == ({"alice"}, {"staff"})
    assert rule.clients == (parse_network("192.168.0.0/16"), parse_network("::1"))
    assert rule.private is True


def test_compile_rule_accepts_a_single_string_for_a_list_and_defaults() -> None:
    rule = compile_rule({"id": "r", "action": "intercept", "hosts": "example.com"}, "rules[0]")
    assert rule.hosts == {"example.com"} and rule.action is Action.INTERCEPT
    assert (rule.ports, rule.methods, rule.private, rule.message) == ((), frozenset(), False, "")


OK = {"id": "r", "action": "allow"}
BAD_RULES = [
    (["not", "a", "table"], "rules[3]: must be a table"),
    ({**OK, "host": "example.com"}, "rules[3].host: unknown rule field (did you mean hosts?)"),
    ({**OK, "zzz": 1}, "rules[3].zzz: unknown rule field"),
    ({"action": "allow"}, "rules[3].id:"),
    ({**OK, "id": "has space"}, "rules[3].id:"),
    ({**OK, "id": ""}, "rules[3].id:"),
    ({**OK, "id": "x" * 65}, "rules[3].id:"),
    ({**OK, "id": 7}, "rules[3].id:"),
    ({"id": "r"}, "rules[3].action:"),
    ({**OK, "action": "permit"}, "rules[3].action:"),
    ({**OK, "action": "resolve"}, "rules[3].action:"),
    ({**OK, "message": 5}, "rules[3].message:"),
    ({**OK, "message": "m" * 501}, "rules[3].message:"),
    ({**OK, "hosts": ["*"]}, "rules[3].hosts:"),
    ({**OK, "hosts": ["foo.*.com"]}, "rules[3].hosts:"),
    ({**OK, "hosts": ["*example.com"]}, "rules[3].hosts:"),
    ({**OK, "hosts": ["."]}, "rules[3].hosts:"),
    ({**OK, "hosts": 5}, "rules[3].hosts: must be a list of strings"),
    ({**OK, "hosts": [1.5]}, "rules[3].hosts: must be a list of strings"),
    ({**OK, "methods": {"GET": 1}}, "rules[3].methods: must be a list of strings"),
    ({**OK, "host_regex": "(unclosed"}, "rules[3].host_regex:"),
    ({**OK, "networks": ["10.0.0.0/33"]}, "rules[3].networks: invalid network"),
    ({**OK, "networks": ["not-a-net"]}, "rules[3].networks: invalid network"),
    ({**OK, "clients": ["300.1.1.1"]}, "rules[3].clients: invalid network"),
    ({**OK, "ports": [80, 0]}, "rules[3].ports[1]: ports must be 1-65535"),
    ({**OK, "ports": ["70000"]}, "rules[3].ports[0]: ports must be 1-65535"),
    ({**OK, "ports": ["9-1"]}, "rules[3].ports[0]: ports must be 1-65535"),
    ({**OK, "ports": ["x"]}, "rules[3].ports[0]: not a port or range"),
    ({**OK, "ports": ["80-"]}, "rules[3].ports[0]: not a port or range"),
    ({**OK, "ports": ["-80"]}, "rules[3].ports[0]: not a port or range"),
    ({**OK, "schemes": ["ftp"]}, "rules[3].schemes:"),
    ({**OK, "schemes": ["http", "ws"]}, "rules[3].schemes:"),
    ({**OK, "private": "yes"}, "rules[3].private:"),
    ({**OK, "private": 1}, "rules[3].private:"),
]


@pytest.mark.parametrize(("raw", "expected"), BAD_RULES)
def test_compile_rule_errors_start_with_the_path(raw: Any, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_rule(raw, "rules[3]")
    assert str(info.value).startswith(expected), str(info.value)


def test_port_bounds_are_inclusive() -> None:
    rule = compile_rule({**OK, "ports": ["1", 65535, "1-65535"]}, "rules[0]")
    assert rule.ports == ((1, 1), (65535, 65535), (1, 65535))


def test_config_loading_reports_rule_errors_and_duplicate_ids() -> None:
    settings = load_settings(overrides={"rules": [OK, {"id": "b", "action": "deny", "ports": [0]}]})
    with pytest.raises(ConfigError, match=re.escape("rules[1].ports[0]")):
        build_policy(settings)
    settings = load_settings(overrides={"rules": [OK, {**OK, "action": "deny"}]})
    with pytest.raises(ConfigError, match=re.escape("rules[1].id: duplicate rule id 'r'")):
        build_policy(settings)


# --- matching: one condition at a time, then combined -------------------------------------

CONNECT_443 = {"scheme": "connect", "method": "CONNECT", "port": 443}
MATCHES = [
    # (rule conditions, request fields, resolved addresses, matches)
    ({"hosts": ["example.com"]}, {}, PUBLIC, True),
    ({"hosts": ["example.com"]}, {"host": "www.example.com"}, PUBLIC, False),
    ({"hosts": ["EXAMPLE.com."]}, {}, PUBLIC, True),
    ({"hosts": ["*.example.com"]}, {"host": "www.example.com"}, PUBLIC, True),
    ({"hosts": ["*.example.com"]}, {"host": "a.b.example.com"}, PUBLIC, True),
    ({"hosts": ["*.example.com"]}, {"host": "example.com"}, PUBLIC, False),
    ({"hosts": ["*.example.com"]}, {"host": "badexample.com"}, PUBLIC, False),
    ({"hosts": [".example.com"]}, {"host": "example.com"}, PUBLIC, True),
    ({"hosts": [".example.com"]}, {"host": "www.example.com"}, PUBLIC, True),
    ({"hosts": [".example.com"]}, {"host": "notexample.com"}, PUBLIC, False),
    ({"hosts": [".example.com"]}, {"host": "example.com.evil.net"}, PUBLIC, False),
    ({"host_regex": "TRACK"}, {"host": "cdn.tracking.example"}, PUBLIC, True),
    ({"host_regex": r"^ads\d+\."}, {"host": "ads42.example.com"}, PUBLIC, True),
    ({"host_regex": r"^ads\d+\."}, {"host": "x.ads42.example.com"}, PUBLIC, False),
    ({"hosts": ["a.com"], "host_regex": r"^b\."}, {"host": "b.org"}, PUBLIC, True),
    ({"hosts": ["a.com"], "host_regex": r"^b\."}, {"host": "c.org"}, PUBLIC, False),
    ({"ports": [80, "8000-8100"]}, {"port": 80}, PUBLIC, True),
    ({"ports": [80, "8000-8100"]}, {"port": 8000}, PUBLIC, True),
    ({"ports": [80, "8000-8100"]}, {"port": 8100}, PUBLIC, True),
    ({"ports": [80, "8000-8100"]}, {"port": 8101}, PUBLIC, False),
    ({"ports": [80, "8000-8100"]}, {"port": 443}, PUBLIC, False),
    ({"methods": ["get", "Head"]}, {"method": "HEAD"}, PUBLIC, True),
    ({"methods": ["get", "Head"]}, {"method": "POST"}, PUBLIC, False),
    ({"schemes": ["HTTPS"]}, {"scheme": "https", "port": 443}, PUBLIC, True),
    ({"schemes": ["https"]}, {"scheme": "http"}, PUBLIC, False),
    ({"schemes": ["connect"]}, CONNECT_443, PUBLIC, True),
    ({"schemes": ["connect"]}, {"scheme": "https", "port": 443}, PUBLIC, False),
    ({"users": ["alice", "bob"]}, {"user": "bob"}, PUBLIC, True),
    ({"users": ["alice"]}, {"user": "mallory"}, PUBLIC, False),
    ({"users": ["alice"]}, {}, PUBLIC, False),
    ({"groups": ["staff", "ops"]}, {"user": "u", "groups": ["ops", "x"]}, PUBLIC, True),
    ({"groups": ["staff"]}, {"user": "u", "groups": ["dev"]}, PUBLIC, False),
    ({"groups": ["staff"]}, {}, PUBLIC, False),
    ({"clients": ["10.0.0.0/8", "2001:db8::/32"]}, {"client": "10.9.8.7"}, PUBLIC, True),
    ({"clients": ["10.0.0.0/8", "2001:db8::/32"]}, {"client": "11.0.0.1"}, PUBLIC, False),
    ({"clients": ["10.0.0.0/8", "2001:db8::/32"]}, {"client": "2001:db8::5"}, PUBLIC, True),
    ({"clients": ["10.0.0.0/8", "2001:db8::/32"]}, {"client": "2001:db9::5"}, PUBLIC, False),
    ({"networks": ["93.184.216.0/24"]}, {}, ("93.184.216.34",), True),
    ({"networks": ["93.184.216.0/24"]}, {}, ("8.8.8.8",), False),
    ({"networks": ["93.184.216.0/24"]}, {}, ("8.8.8.8", "93.184.216.34"), True),
    ({"networks": ["2606:2800::/32"]}, {}, ("2606:2800:220:1::1",), True),
    ({"networks": ["2606:2800::/32"]}, {}, ("93.184.216.34",), False),
    ({"hosts": ["example.com"], "ports": [443]}, {"port": 443}, PUBLIC, True),
    ({"hosts": ["example.com"], "ports": [443]}, {"port": 80}, PUBLIC, False),
    ({"hosts": ["example.com"], "ports": [443]}, {"host": "x.com", "port": 443}, PUBLIC, False),
    ({"methods": ["GET"], "users": ["alice"]}, {"user": "alice"}, PUBLIC, True),
    ({"methods": ["GET"], "users": ["alice"]}, {"user": "alice", "method": "PUT"}, PUBLIC, False),
]


@pytest.mark.parametrize(("conditions", "fields", "addresses", "matches"), MATCHES)
def test_conditions_are_anded_and_values_ored(
    conditions: dict[str, Any], fields: dict[str, Any], addresses: Any, matches: bool
) -> None:
    rules = ruleset({"id": "r", "action": "deny", "message": "m", **conditions})
    decision = rules.evaluate(req(**fields), addresses)
    assert (decision.action, decision.rule) == (
        (Action.DENY, "r") if matches else (Action.ALLOW, "default")
    )


def test_client_rule_matches_the_ipv4_mapped_form_of_its_clients() -> None:
    # Policy.client_allowed treats ::ffff:10.1.2.3 as 10.1.2.3; rules must agree, or a
    # deny rule naming 10.0.0.0/8 is skipped for a client seen on a dual-stack socket.
    rules = ruleset({"id": "lan", "action": "deny", "clients": ["10.0.0.0/8"]})
    assert rules.evaluate(req(client="::ffff:10.1.2.3"), PUBLIC).rule == "lan"


LABEL = st.sampled_from(["a", "b", "ex", "example", "com"])


@given(host=st.lists(LABEL, min_size=1, max_size=4), domain=st.lists(LABEL, min_size=1, max_size=3))
def test_wildcard_forms_match_exactly_their_documented_host_sets(
    host: list[str], domain: list[str]
) -> None:
    h, d = ".".join(host), ".".join(domain)
    is_sub = h.endswith("." + d)
    subdomains = ruleset({"id": "s", "action": "deny", "hosts": [f"*.{d}"]})
    domains = ruleset({"id": "d", "action": "deny", "hosts": [f".{d}"]})
    assert (subdomains.evaluate(req(host=h), PUBLIC).rule == "s") == is_sub
    assert (domains.evaluate(req(host=h), PUBLIC).rule == "d") == (is_sub or h == d)


# --- evaluation order, default, resolution -----------------------------------------------


def test_first_match_wins() -> None:
    allow = {"id": "a", "action": "allow", "hosts": ["example.com"]}
    deny = {"id": "d", "action": "deny", "message": "blocked", "hosts": [".example.com"]}
    assert ruleset(allow, deny).evaluate(req(), PUBLIC).rule == "a"
    decision = ruleset(deny, allow).evaluate(req(), PUBLIC)
    assert (decision.action, decision.rule, decision.message) == (Action.DENY, "d", "blocked")


@pytest.mark.parametrize(
    ("default", "expected"),
    [
        (Action.ALLOW, (Action.ALLOW, "default", "")),
        (Action.DENY, (Action.DENY, "default", "no rule allows it (access.default)")),
    ],
)
def test_default_action_when_no_rule_matches(default: Action, expected: tuple) -> None:
    rules = ruleset({"id": "other", "action": "allow", "hosts": ["other.org"]}, default=default)
    decision = rules.evaluate(req(), PUBLIC)
    assert (decision.action, decision.rule, decision.message) == expected


def test_a_networks_rule_asks_for_resolution_then_matches_any_address() -> None:
    rules = ruleset({"id": "net", "action": "deny", "networks": ["8.8.8.0/24"]})
    assert rules.evaluate(req(), None).action is Action.RESOLVE
    assert rules.evaluate(req(), ("93.184.216.34", "8.8.8.8")).rule == "net"
    assert rules.evaluate(req(), PUBLIC).rule == "default"


def test_a_rule_matching_before_any_networks_rule_needs_no_resolution() -> None:
    rules = ruleset(
        {"id": "early", "action": "allow", "hosts": ["example.com"]},
        {"id": "net", "action": "deny", "networks": ["0.0.0.0/0"]},
        allow_private=True,
    )
    decision = rules.evaluate(req(), None)
    assert (decision.action, decision.rule, decision.addresses) == (Action.ALLOW, "early", None)
    assert rules.evaluate(req(host="x.org"), None).action is Action.RESOLVE


# --- guard: CONNECT ports ----------------------------------------------------------------


def connect(port: int, host: str = "example.com") -> Request:
    return req(method="CONNECT", scheme="connect", host=host, port=port)


OTHER_HOST_8443 = {"id": "p", "action": "allow", "ports": [8443], "hosts": ["x.org"]}


@pytest.mark.parametrize(
    ("raws", "options", "port", "expected"),
    [
        ((), {}, 443, "default"),
        ((), {}, 8443, "connect-port"),
        ((), {"connect_ports": ((8000, 8100),)}, 8050, "default"),
        ((), {"connect_ports": ((8000, 8100),)}, 443, "connect-port"),
        (({"id": "p", "action": "allow", "ports": [8443]},), {}, 8443, "p"),
        (({"id": "p", "action": "allow", "ports": ["8000-9000"]},), {}, 8443, "p"),
        (({"id": "h", "action": "allow", "hosts": ["example.com"]},), {}, 8443, "connect-port"),
        ((OTHER_HOST_8443,), {}, 8443, "connect-port"),
        (({"id": "d", "action": "deny", "ports": [22]},), {}, 22, "d"),
    ],
)
def test_connect_port_guard(raws: tuple, options: dict, port: int, expected: str) -> None:
    decision = ruleset(*raws, **options).evaluate(connect(port), PUBLIC)
    assert decision.rule == expected
    if expected == "connect-port":
        assert decision.action is Action.DENY and str(port) in decision.message


def test_connect_port_guard_does_not_apply_to_plain_http() -> None:
    assert ruleset().evaluate(req(port=8443), PUBLIC).action is Action.ALLOW


# --- guard: private destinations ---------------------------------------------------------

ALLOW_LAN = {"id": "lan", "action": "allow", "networks": ["10.0.0.0/8"]}
PRIVATE = [
    # (rules, options, addresses, expected rule, expected addresses)
    ((), {}, PUBLIC, "default", PUBLIC),
    ((), {}, ("10.0.0.1",), "private-destination", None),
    ((), {}, ("::ffff:127.0.0.1", "169.254.169.254"), "private-destination", None),
    ((), {}, ("10.0.0.1", "93.184.216.34", "::1"), "default", ("93.184.216.34",)),
    ((), {"allow_private": True}, ("10.0.0.1", "::1"), "default", ("10.0.0.1", "::1")),
    ((), {"allow_private": True}, None, "default", None),
    (({"id": "p", "action": "allow", "private": True},), {}, ("127.0.0.1",), "p", ("127.0.0.1",)),
    (({"id": "p", "action": "allow", "private": True},), {}, None, "p", None),
    ((ALLOW_LAN,), {}, ("10.1.1.1",), "lan", ("10.1.1.1",)),
    ((ALLOW_LAN,), {}, ("10.1.1.1", "127.0.0.1", "93.184.216.34"), "lan", ("10.1.1.1",)),
    ((ALLOW_LAN,), {"allow_private": True}, ("192.168.1.1", "10.1.1.1"), "lan", ("10.1.1.1",)),
    ((ALLOW_LAN,), {}, ("192.168.1.1",), "private-destination", None),
]


@pytest.mark.parametrize(("raws", "options", "addresses", "rule", "permitted"), PRIVATE)
def test_private_destination_guard(
    raws: tuple, options: dict, addresses: Any, rule: str, permitted: Any
) -> None:
    decision = ruleset(*raws, **options).evaluate(req(), addresses)
    assert decision.rule == rule
    if rule == "private-destination":
        assert decision.action is Action.DENY
    else:
        assert (decision.action, decision.addresses) == (Action.ALLOW, permitted)


def test_private_destination_message_names_the_addresses_and_their_ranges() -> None:
    decision = ruleset().evaluate(req(host="intranet.example"), ("10.0.0.1", "::1"))
    assert decision.rule == "private-destination"
    for part in ("intranet.example", "10.0.0.1", "10.0.0.0/8", "RFC 1918", "::1", "loopback"):
        assert part in decision.message, part


def test_unresolved_request_needs_resolution_for_the_private_guard() -> None:
    assert ruleset().evaluate(req(), None).action is Action.RESOLVE


# --- explain -----------------------------------------------------------------------------


def test_trace_names_the_failed_condition_and_the_matching_rule() -> None:
    rules = ruleset(
        {"id": "ads", "action": "deny", "hosts": ["ads.example"]},
        {"id": "tls-only", "action": "deny", "ports": [443], "hosts": ["example.com"]},
        {"id": "web", "action": "allow", "ports": [80]},
        {"id": "never", "action": "deny"},
    )
    decision = rules.evaluate(req(), ("10.0.0.1", "93.184.216.34"), explain=True)
    assert decision.rule == "web"
    trace = decision.trace
    assert len([line for line in trace if line.startswith("rule ")]) == 3, trace
    assert "ads" in trace[0] and "host" in trace[0] and "no match" in trace[0]
    assert "tls-only" in trace[1] and "port" in trace[1]
    assert "web" in trace[2] and "matches" in trace[2]
    assert any("10.0.0.1" in line and "protected" in line for line in trace), trace
    assert any("93.184.216.34" in line and "allowed" in line for line in trace), trace


def test_trace_shows_default_and_guards() -> None:
    default = ruleset().evaluate(connect(22), PUBLIC, explain=True).trace
    assert any("default" in line for line in default), default
    assert any(line.startswith("guard connect-port") for line in default), default
    private = ruleset().evaluate(req(), ("127.0.0.1",), explain=True).trace
    assert any(line.startswith("guard private-destination") for line in private), private


def test_trace_of_a_network_rule_says_when_no_address_was_resolved() -> None:
    """explain after a failed resolution: a network rule compared nothing."""
    rules = ruleset({"id": "no-metadata", "action": "deny", "networks": ["169.254.0.0/16"]})
    trace = rules.evaluate(req(), (), explain=True).trace
    assert trace[0] == (
        "rule no-metadata (deny): no match (no addresses to compare: the name did not resolve)"
    ), trace
    resolved = rules.evaluate(req(), PUBLIC, explain=True).trace
    assert resolved[0] == "rule no-metadata (deny): no match (network differs)", resolved


@pytest.mark.parametrize(
    ("written", "target_host"),
    [
        ("93.184.215.14", "93.184.215.14"),
        ("1572394766", "93.184.215.14"),  # a rule may be written oddly too
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("127.1", "127.0.0.1"),
    ],
)
def test_a_host_rule_naming_an_address_matches_the_address_in_its_one_spelling(
    written: str, target_host: str
) -> None:
    """Targets come with addresses written one way (`canonical_host`); rules naming an
    address are read the same way, so they meet."""
    rules = ruleset({"id": "ip", "action": "deny", "hosts": [written]})
    assert rules.evaluate(req(host=target_host), PUBLIC).rule == "ip"
    assert rules.evaluate(req(host="10.0.0.2"), PUBLIC).rule != "ip"


@pytest.mark.parametrize(
    "carrier",
    ["64:ff9b::5db8:d70e", "2002:5db8:d70e::1", "::93.184.215.14", "93.184.215.14"],
)
def test_an_ipv6_address_carrying_an_ipv4_one_meets_the_rules_naming_that(carrier: str) -> None:
    """NAT64, 6to4 and IPv4-compatible addresses reach the IPv4 address inside them:
    a rule naming that address, or a network holding it, covers them too."""
    by_host = ruleset({"id": "h", "action": "deny", "hosts": ["93.184.215.14"]})
    assert by_host.evaluate(req(host=carrier), PUBLIC).rule == "h"
    by_net = ruleset({"id": "n", "action": "deny", "networks": ["93.184.215.0/24"]})
    assert by_net.evaluate(req(host="example.com"), (carrier,)).rule == "n"
    other = ruleset({"id": "h", "action": "deny", "hosts": ["93.184.215.15"]})
    assert other.evaluate(req(host=carrier), PUBLIC).rule != "h"


def test_a_client_network_is_not_met_by_an_ipv6_client_carrying_an_ipv4_address() -> None:
    """Only destinations are reached through the address inside: a client's own
    address is what it is (the mapped form aside)."""
    rules = ruleset({"id": "c", "action": "deny", "clients": ["10.0.0.0/8"]})
    assert rules.evaluate(req(client="64:ff9b::a00:1"), PUBLIC).rule != "c"
    assert rules.evaluate(req(client="::ffff:10.0.0.1"), PUBLIC).rule == "c"


@pytest.mark.parametrize(("unspecified", "loopback"), [("0.0.0.0", "127.0.0.1"), ("::", "::1")])
def test_an_unspecified_destination_meets_the_rules_naming_loopback(
    unspecified: str, loopback: str
) -> None:
    """0.0.0.0 and :: reach this host: rules on its loopback address or network cover
    them (with allow_private the SSRF guard does not)."""
    by_host = ruleset({"id": "h", "action": "deny", "hosts": [loopback]})
    assert by_host.evaluate(req(host=unspecified), PUBLIC).rule == "h"
    net = "127.0.0.0/8" if ":" not in loopback else "::1/128"
    by_net = ruleset({"id": "n", "action": "deny", "networks": [net]})
    assert by_net.evaluate(req(host="example.com"), (unspecified,)).rule == "n"
