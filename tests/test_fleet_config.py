"""The fleet's settings (eyewall/config.py: fleet, proxy_protocol, shared_limits,
shared_flows): what they accept, what they refuse and how they say it, and what
`eyewall.fleet` makes of them without connecting anywhere."""

from __future__ import annotations

import importlib.util
import socket

import pytest

from eyewall.config import ConfigError, load_settings, restart_settings
from eyewall.fleet import FleetNode, node_name, problems
from eyewall.policy.state import AdmissionState


def errors(**overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_settings(overrides={k.replace("__", "."): v for k, v in overrides.items()})
    return raised.value.errors


def test_defaults_leave_a_single_node_alone() -> None:
    settings = load_settings()
    assert settings.proxy_protocol.trusted == ()
    assert settings.shared_limits.redis == "" and settings.shared_limits.when_down == "local"
    assert settings.shared_flows.postgresql == ""
    assert node_name(settings) == socket.gethostname()
    node = FleetNode(settings)
    local = AdmissionState()
    assert node.limits_store(local) is local and node.flows is None


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("shared_limits__redis", "http://redis:6379", "must be empty or a URL starting redis://"),
        ("shared_limits__redis", "redis-host:6379", "must be empty or a URL"),
        ("shared_flows__postgresql", "mysql://db/x", "postgresql:// or postgres://"),
        ("shared_limits__when_down", "maybe", "must be local, open or closed"),
        ("shared_limits__lease_ttl", 1.0, "must be at least 3"),
        ("shared_limits__prefix", "a b", "must be a token"),
        ("fleet__node", "node 1", "must be a token"),
        ("proxy_protocol__trusted", ["10.0.0.0/33"], "not a network"),
        ("proxy_protocol__header_timeout", 0.0, "must be greater than 0"),
        ("shared_flows__max_pending", 1024, "must be at least 1048576"),
    ],
)
def test_bad_values_name_their_flag(setting: str, value: object, message: str) -> None:
    found = errors(**{setting: value})
    flag = "--" + setting.replace("__", "-").replace("_", "-")
    aliases = {
        "--fleet-node": "--node",
        "--proxy-protocol-header-timeout": "--proxy-protocol-timeout",
    }
    flag = aliases.get(flag, flag)
    assert len(found) == 1 and found[0].startswith(flag) and message in found[0], found


def test_proxy_protocol_listeners_must_be_listeners() -> None:
    found = errors(listen=["127.0.0.1:3128"], proxy_protocol__listeners=["127.0.0.1:3129"])
    assert found == ["--proxy-protocol-listener: 127.0.0.1:3129 is not in listen or tls.listen"]
    settings = load_settings(
        overrides={"listen": ["127.0.0.1:3128"], "proxy_protocol.listeners": ["127.0.0.1:3128"]}
    )
    assert [str(e) for e in settings.proxy_protocol.listeners] == ["127.0.0.1:3128"]


def test_what_a_reload_may_change() -> None:
    old = load_settings()
    new = load_settings(
        overrides={
            "shared_limits.when_down": "closed",
            "proxy_protocol.trusted": ["10.0.0.5/32"],
            "shared_limits.redis": "redis://10.0.0.20:6379/0",
            "shared_flows.postgresql": "postgresql://eyewall@db/eyewall",
        }
    )
    assert restart_settings(old, new) == ["shared_limits.redis", "shared_flows.postgresql"]


def test_a_missing_client_library_is_a_configuration_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(
        overrides={
            "shared_limits.redis": "redis://10.0.0.20:6379/0",
            "shared_flows.postgresql": "postgresql://eyewall@db/eyewall",
        }
    )
    assert problems(settings) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    assert problems(settings) == [
        "shared_limits.redis: needs the redis package, which is not installed"
        " (pip install 'eyewall[fleet]')"
    ]


def test_a_node_with_every_part_connects_nothing_until_started() -> None:
    settings = load_settings(
        overrides={
            "fleet.node": "eyewall-1",
            "shared_limits.redis": "redis://192.0.2.1:6379/0",  # nobody there
            "shared_flows.postgresql": "postgresql://eyewall@192.0.2.1/eyewall",
        }
    )
    node = FleetNode(settings)
    store = node.limits_store(AdmissionState())
    assert store is node.limits and store.asynchronous
    assert node.flows is not None and node.flows.node == "eyewall-1"
    assert node.flows.max_count == settings.flows.max_count
    node.reconfigure(load_settings(overrides={"shared_limits.when_down": "open"}))
    assert node.limits is not None and node.limits.when_down == "open"
