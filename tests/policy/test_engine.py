"""The `Policy` built from settings (`eyewall.app.build_policy`): client networks, the
decision cache, users and groups, and errors naming the setting."""

from __future__ import annotations

import logging
import re
from typing import Any

import bcrypt
import pytest

from eyewall.app import build_policy
from eyewall.config import ConfigError, load_settings
from eyewall.policy.engine import Policy
from eyewall.policy.rules import Action, Request

ALICE = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=4)).decode()
BOB = bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(rounds=4)).decode()


def policy(**overrides: Any) -> Policy:
    return build_policy(load_settings(overrides=overrides))


@pytest.mark.parametrize(
    ("allow_clients", "client", "allowed"),
    [
        ((), "127.0.0.1", True),
        ((), "127.9.9.9", True),
        ((), "::1", True),
        ((), "::ffff:127.0.0.1", True),
        ((), "10.0.0.1", False),
        ((), "::ffff:10.0.0.1", False),
        ((), "2001:db8::1", False),
        (("10.0.0.0/8", "2001:db8::/32"), "10.2.3.4", True),
        (("10.0.0.0/8", "2001:db8::/32"), "::ffff:10.2.3.4", True),
        (("10.0.0.0/8", "2001:db8::/32"), "2001:db8::7", True),
        (("10.0.0.0/8", "2001:db8::/32"), "127.0.0.1", False),
        (("10.0.0.0/8", "2001:db8::/32"), "11.0.0.1", False),
    ],
)
def test_client_allowed(allow_clients: tuple, client: str, allowed: bool) -> None:
    p = policy(**{"access.allow_clients": list(allow_clients)})
    assert p.client_allowed(client) is allowed
    assert p.client_allowed(client) is allowed  # and again, from the cache


def test_decide_caches_per_request_and_addresses() -> None:
    p = policy(rules=[{"id": "lan", "action": "allow", "networks": ["10.0.0.0/8"]}])
    calls: list[tuple[str, ...] | None] = []
    rules = p.rules

    class Counting:
        def evaluate(self, req: Request, addresses: Any, explain: bool = False) -> Any:
            calls.append(addresses)
            return rules.evaluate(req, addresses, explain)

    p.rules = Counting()  # type: ignore[assignment]
    req = Request("127.0.0.1", "GET", "http", "example.com", 80)
    assert p.decide(req, None).action is Action.RESOLVE
    first = p.decide(req, ("93.184.216.34",))
    assert p.decide(req, ("93.184.216.34",)) is first
    assert p.decide(req, None).action is Action.RESOLVE
    lan = p.decide(req, ("10.1.1.1",))
    assert (first.rule, lan.rule) == ("default", "lan")
    assert calls == [None, ("93.184.216.34",), ("10.1.1.1",)]


def test_policy_users_and_groups_from_settings() -> None:
    p = policy(**{"auth.users": {"alice": ALICE}, "auth.groups": {"staff": ["alice"]}})
    assert p.auth_required and p.users.groups("alice") == {"staff"}
    assert p.users.groups(None) == frozenset()
    assert not policy().auth_required


def test_policy_errors_name_the_auth_setting() -> None:
    def unreadable(path: str) -> str:
        raise OSError(13, "Permission denied")

    settings = load_settings(overrides={"auth.htpasswd": "/etc/eyewall/htpasswd"})
    with pytest.raises(ConfigError, match=r"^auth\.htpasswd: cannot read /etc/eyewall/htpasswd"):
        build_policy(settings, read_text=unreadable)
    with pytest.raises(ConfigError, match=r"^auth\.htpasswd: /etc/eyewall/htpasswd:1: user 'bob'"):
        build_policy(settings, read_text=lambda p: "bob:{SHA}abc\n")
    assert build_policy(settings, read_text=lambda p: f"bob:{BOB}\n").auth_required
    inline = load_settings(overrides={"auth.users": {"carol": "$apr1$x$y"}})
    with pytest.raises(ConfigError, match=r"^auth\.users\.carol"):
        build_policy(inline)


def test_rules_naming_undefined_groups_are_errors() -> None:
    """Squid treats an undefined ACL as fatal: a rule that can never match is a typo.
    A user missing from the user file is only a warning (next test)."""
    settings = load_settings(
        overrides={
            "auth.users": {"alice": ALICE},
            "auth.groups": {"staff": ["alice"]},
            "rules": [
                {"id": "a", "action": "allow", "groups": ["staff", "admins"]},
                {"id": "b", "action": "deny", "users": ["alice", "zed"]},
                {"id": "a", "action": "deny", "hosts": ["x.example"]},
                {"id": "c", "action": "nope"},
            ],
        }
    )
    with pytest.raises(ConfigError) as raised:
        build_policy(settings)
    errors = raised.value.errors
    assert any(re.match(r"rules\[0\]\.groups: undefined group 'admins'", e) for e in errors)
    assert not any("zed" in e for e in errors)
    assert any(re.match(r"rules\[2\]\.id: duplicate rule id 'a'", e) for e in errors)
    assert any(re.match(r"rules\[3\]\.action: must be allow, deny or intercept", e) for e in errors)


def test_users_missing_from_the_user_file_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """Removing a user from the file revokes them: the reload must apply, though a rule
    or a group still names them (they match nobody until the file has them again)."""
    settings = load_settings(
        overrides={
            "auth.users": {"alice": ALICE},
            "auth.groups": {"staff": ["alice", "bob"]},
            "rules": [{"id": "b", "action": "allow", "users": ["alice", "bob"]}],
        }
    )
    with caplog.at_level(logging.WARNING, logger="eyewall"):
        policy = build_policy(settings)
    assert policy.users.groups("alice") == {"staff"} and "bob" not in policy.users.hashes
    assert [r.getMessage() for r in caplog.records] == [
        "auth.groups.staff: no user 'bob' in the user file (it matches nobody)",
        "rules[0].users: no user 'bob' in the user file (it matches nobody)",
    ]


def test_mixed_bcrypt_costs_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """Unknown users are checked against a dummy hash of one cost: with several costs in
    the file, timing tells the users apart (user enumeration)."""
    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=5)).decode()
    settings = load_settings(overrides={"auth.users": {"alice": ALICE, "bob": slow}})
    with caplog.at_level(logging.WARNING, logger="eyewall"):
        build_policy(settings)
    assert [r.getMessage() for r in caplog.records] == [
        "the user file mixes bcrypt costs (4, 5): how long a login takes tells which user"
        " names exist; hash every password at one cost"
    ]


def test_rules_naming_users_without_any_users_configured_are_errors() -> None:
    settings = load_settings(overrides={"rules": [{"id": "u", "action": "allow", "users": ["a"]}]})
    with pytest.raises(ConfigError, match=r"rules\[0\]\.users: no users are configured"):
        build_policy(settings)
