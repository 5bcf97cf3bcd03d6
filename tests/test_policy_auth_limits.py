"""Authentication, rate limits and the `Policy` built from settings, all with injected time."""

from __future__ import annotations

import base64
import re
from typing import Any

import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eyewall.config import ConfigError, load_settings
from eyewall.policy.auth import (
    Credentials,
    FailureTracker,
    Users,
    parse_basic,
    parse_htpasswd,
)
from eyewall.policy.engine import Policy, PolicyError
from eyewall.policy.limits import Counter, Limited, TokenBuckets
from eyewall.policy.rules import Action, Request


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


ALICE, BOB = hashed("alice-pw"), hashed("bob-pw")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --- parse_basic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Basic " + b64(b"alice:pw"), ("alice", "pw")),
        ("basic " + b64(b"alice:pw"), ("alice", "pw")),
        ("  BASIC   " + b64(b"alice:pw") + "  ", ("alice", "pw")),
        ("Basic " + b64(b"alice:p:w:"), ("alice", "p:w:")),
        ("Basic " + b64(b"alice:"), ("alice", "")),
        ("Basic " + b64("jürgen:pässwörd".encode()), ("jürgen", "pässwörd")),
        (None, None),
        ("", None),
        ("Basic", None),
        ("Basic ", None),
        ("Bearer " + b64(b"alice:pw"), None),
        ("Basic !!!notbase64", None),
        ("Basic " + b64(b"alice:pw").rstrip("="), None),  # padding missing
        ("Basic " + b64(b"alicepw"), None),  # no colon
        ("Basic " + b64(b":pw"), None),  # empty user
        ("Basic " + b64(b"\xffalice:pw"), None),  # not UTF-8
    ],
)
def test_parse_basic(value: str | None, expected: tuple[str, str] | None) -> None:
    got = parse_basic(value)
    assert (None if got is None else (got.user, got.password)) == expected


# --- htpasswd and users ------------------------------------------------------------------


def test_parse_htpasswd_skips_comments_and_blank_lines() -> None:
    text = f"# users\n\nalice:{ALICE}\r\n   \n  # bob below\n  bob:{BOB}  \n"
    assert parse_htpasswd(text, "auth.htpasswd") == {"alice": ALICE.encode(), "bob": BOB.encode()}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "where line 3: user 'bob' has an unsupported"),
        ("bob:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/", "where line 3: user 'bob' has an unsupp"),
        ("bob:plaintext", "where line 3: user 'bob'"),
        ("bob", "where line 3: expected user:hash"),
        (":" + BOB, "where line 3: expected user:hash"),
        ("bob:$2b$04$truncated", "where line 3: user 'bob'"),  # bcrypt prefix, not a hash
    ],
)
def test_parse_htpasswd_rejects_bad_lines_naming_line_and_user(line: str, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_htpasswd(f"alice:{ALICE}\n# comment\n{line}\n", "where")


def test_users_from_inline_and_file_are_merged_with_groups() -> None:
    users = Users.from_settings(
        {"bob": BOB}, f"alice:{ALICE}\n", {"staff": ["alice", "bob"], "ops": ["alice"]}, 60.0
    )
    assert set(users.hashes) == {"alice", "bob"} and users.enabled
    assert users.groups("alice") == {"staff", "ops"}
    assert users.groups("bob") == {"staff"}
    assert users.groups("nobody") == frozenset()


@pytest.mark.parametrize(
    ("inline", "text", "groups", "expected"),
    [
        ({}, f"alice:{ALICE}", {"admins": ["alice", "zed"]}, "auth.groups.admins: unknown user"),
        ({"carol": "{SHA}abc"}, None, {}, "auth.users.carol:"),
        ({}, "carol:$apr1$x$y", {}, "auth.htpasswd line 1: user 'carol'"),
    ],
)
def test_users_from_settings_errors(inline: dict, text: Any, groups: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        Users.from_settings(inline, text, groups, 60.0)


def test_users_enabled_only_with_users() -> None:
    assert not Users.from_settings({}, None, {}, 60.0).enabled
    assert not Users.from_settings({}, "# nobody yet\n", {}, 60.0).enabled


def test_verify_checks_the_password_and_unknown_users_fail() -> None:
    users = Users({"alice": ALICE.encode()})
    assert users.verify(Credentials("alice", "alice-pw"))
    assert not users.verify(Credentials("alice", "bob-pw"))
    assert not users.verify(Credentials("alice", ""))
    assert not users.verify(Credentials("bob", "alice-pw"))


def test_verify_survives_passwords_longer_than_bcrypt_accepts() -> None:
    # A client controls the password; bcrypt 5 raises ValueError beyond 72 bytes.
    long = "x" * 100
    users = Users({"alice": ALICE.encode(), "long": hashed(long[:72]).encode()})
    assert not users.verify(Credentials("alice", long))
    assert not users.verify(Credentials("nobody", long))
    assert users.verify(Credentials("long", long))  # htpasswd -B hashes the first 72 bytes


# --- the credentials cache ---------------------------------------------------------------


def test_cache_remembers_until_expiry() -> None:
    users = Users({"alice": ALICE.encode()}, cache_ttl=300.0)
    good = Credentials("alice", "alice-pw")
    assert not users.cached(good, 100.0)
    users.remember(good, 100.0)
    assert users.cached(good, 100.0) and users.cached(good, 400.0)
    assert not users.cached(Credentials("alice", "other"), 200.0)
    assert not users.cached(good, 400.5)
    assert not users.cached(good, 100.0)  # the expired entry was dropped


def test_cache_size_is_bounded_oldest_first() -> None:
    users = Users({}, cache_ttl=300.0, cache_size=2)
    a, b, c = (Credentials(u, "pw") for u in "abc")
    for creds in (a, b, c):
        users.remember(creds, 0.0)
    assert [users.cached(x, 1.0) for x in (a, b, c)] == [False, True, True]


def test_cache_key_does_not_hold_the_password() -> None:
    creds = Credentials("alice", "hunter2-secret")
    key = creds.fingerprint()
    assert len(key) == 32 and key == Credentials("alice", "hunter2-secret").fingerprint()
    assert b"hunter2" not in key and "hunter2".encode("utf-16-le") not in key
    assert key != Credentials("alice", "hunter2-secreT").fingerprint()
    assert key != Credentials("alicE", "hunter2-secret").fingerprint()


def test_cache_key_tells_user_and_password_apart() -> None:
    # user\0password is ambiguous: these two would share a cache entry.
    assert Credentials("a", "b\0c").fingerprint() != Credentials("a\0b", "c").fingerprint()


# --- failure tracking --------------------------------------------------------------------


def test_failures_are_counted_in_a_sliding_window_per_client() -> None:
    tracker = FailureTracker(window=60.0)
    assert [tracker.record("c", t) for t in (0.0, 10.0, 20.0)] == [1, 2, 3]
    assert tracker.record("other", 20.0) == 1
    assert tracker.record("c", 65.0) == 3  # 0.0 left the window; 10, 20, 65 remain
    assert tracker.record("c", 200.0) == 1
    tracker.clear("c")
    assert tracker.record("c", 201.0) == 1


def test_delay_is_free_at_first_then_doubles_up_to_8_seconds() -> None:
    tracker = FailureTracker(free=3)
    delays = [tracker.delay(n) for n in range(0, 12)]
    assert delays == [0, 0, 0, 0, 0.25, 0.5, 1, 2, 4, 8, 8, 8]
    assert all(tracker.delay(n) == 8.0 for n in range(9, 102))


def test_failure_tracker_memory_is_bounded() -> None:
    tracker = FailureTracker(max_clients=2)
    tracker.record("a", 0.0)
    tracker.record("b", 0.0)
    assert tracker.record("a", 1.0) == 2
    tracker.record("c", 2.0)  # a third client: the table is emptied, not grown
    assert tracker.record("a", 3.0) == 1


# --- token buckets and counters ----------------------------------------------------------


def test_bucket_grants_a_burst_then_limits_with_retry_after() -> None:
    buckets = TokenBuckets("client_rps", rate=2.0, burst=3)
    assert [buckets.take("k", 10.0) for _ in range(3)] == [None] * 3
    limited = buckets.take("k", 10.0)
    assert limited == Limited("client_rps", "k", 0.5)
    assert limited.describe() == "rate limit client_rps reached for k"
    assert buckets.take("k", 10.25) is not None  # half a token so far
    assert buckets.take("k", 10.5) is None  # one token after 1 / rate
    assert buckets.take("k", 10.5) is not None


def test_bucket_refills_over_time_up_to_the_burst() -> None:
    buckets = TokenBuckets("r", rate=1.0, burst=2)
    buckets.take("k", 0.0)
    buckets.take("k", 0.0)
    assert buckets.take("k", 0.0) is not None
    granted = [buckets.take("k", 1000.0) is None for _ in range(3)]
    assert granted == [True, True, False]


def test_bucket_keys_are_independent() -> None:
    buckets = TokenBuckets("r", rate=1.0, burst=1)
    assert buckets.take("a", 0.0) is None
    assert buckets.take("a", 0.0) is not None
    assert buckets.take("b", 0.0) is None


@given(
    rate=st.floats(min_value=0.1, max_value=50.0),
    burst=st.integers(min_value=1, max_value=20),
    steps=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=150),
)
def test_granted_tokens_never_exceed_burst_plus_refill(
    rate: float, burst: int, steps: list[float]
) -> None:
    buckets = TokenBuckets("r", rate, burst)
    start = now = 1000.0
    granted = 0
    for step in steps:
        now += step
        limited = buckets.take("k", now)
        if limited is None:
            granted += 1
        else:
            assert 0 < limited.retry_after <= 1 / rate + 1e-9
        assert granted <= burst + rate * (now - start) + 1e-6


def test_counter_maximum_and_release() -> None:
    tunnels = Counter("client_tunnels", 2)
    assert tunnels.acquire("a") is None and tunnels.acquire("a") is None
    limited = tunnels.acquire("a")
    assert limited is not None and (limited.limit, limited.key) == ("client_tunnels", "a")
    assert tunnels.acquire("b") is None
    tunnels.release("a")
    assert tunnels.count("a") == 1 and tunnels.acquire("a") is None
    for _ in range(5):
        tunnels.release("b")
    assert tunnels.count("b") == 0  # never negative
    assert tunnels.acquire("b") is None and tunnels.acquire("b") is None
    assert tunnels.acquire("b") is not None


def test_counter_zero_means_unlimited() -> None:
    counter = Counter("c", 0)
    assert all(counter.acquire("k") is None for _ in range(1000))
    assert counter.count("k") == 1000


# --- Policy from settings ----------------------------------------------------------------


def policy(**overrides: Any) -> Policy:
    return Policy.from_settings(load_settings(overrides=overrides))


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


def test_request_rate_for_clients() -> None:
    p = policy(**{"rate_limits.client_rps": 1.0, "rate_limits.client_burst": 2})
    assert [p.request_rate("c", None, 0.0) for _ in range(2)] == [None, None]
    limited = p.request_rate("c", "alice", 0.0)
    assert limited is not None and (limited.limit, limited.key) == ("client_rps", "c")
    assert p.request_rate("d", None, 0.0) is None
    assert p.request_rate("c", None, 1.0) is None


def test_request_rate_for_users_and_default_burst() -> None:
    p = policy(**{"rate_limits.user_rps": 2.0})  # burst 0: twice the rate
    assert [p.request_rate(f"c{i}", "alice", 0.0) for i in range(4)] == [None] * 4
    limited = p.request_rate("c9", "alice", 0.0)
    assert limited is not None and (limited.limit, limited.key) == ("user_rps", "alice")
    assert all(p.request_rate("c", None, 0.0) is None for _ in range(10))  # no user, no limit
    assert policy().request_rate("c", "alice", 0.0) is None  # no limits configured


def test_policy_users_and_groups_from_settings() -> None:
    p = policy(**{"auth.users": {"alice": ALICE}, "auth.groups": {"staff": ["alice"]}})
    assert p.auth_required and p.groups("alice") == {"staff"} and p.groups(None) == frozenset()
    assert not policy().auth_required


def test_policy_errors_name_the_auth_setting() -> None:
    def unreadable(path: str) -> str:
        raise OSError(13, "Permission denied")

    settings = load_settings(overrides={"auth.htpasswd": "/etc/eyewall/htpasswd"})
    with pytest.raises(PolicyError, match=r"^auth\.htpasswd: cannot read /etc/eyewall/htpasswd"):
        Policy.from_settings(settings, read_text=unreadable)
    with pytest.raises(PolicyError, match=r"^auth\.htpasswd line 1: user 'bob'"):
        Policy.from_settings(settings, read_text=lambda p: "bob:{SHA}abc\n")
    assert Policy.from_settings(settings, read_text=lambda p: f"bob:{BOB}\n").auth_required
    inline = load_settings(overrides={"auth.users": {"carol": "$apr1$x$y"}})
    with pytest.raises(PolicyError, match=r"^auth\.users\.carol"):
        Policy.from_settings(inline)


# --- configuration checks ----------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "192.168.1.10:3128"])
def test_listening_beyond_loopback_requires_allow_clients(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^access\.allow_clients: required"):
        load_settings(overrides={"listen": [listen]})
    settings = load_settings(overrides={"listen": [listen], "access.allow_clients": "10.0.0.0/8"})
    assert settings.access.allow_clients == ("10.0.0.0/8",)


def test_loopback_listeners_need_no_allow_clients() -> None:
    assert load_settings(overrides={"listen": ["127.0.0.1:3128", "[::1]:3128", "localhost:1"]})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("access.allow_clients", ["not-a-network"]),
        ("access.allow_clients", ["10.0.0.0/33"]),
        ("access.allow_clients", [{"cidr": "10.0.0.0/8"}]),
        ("access.connect_ports", ["0"]),
        ("access.connect_ports", ["70000"]),
        ("access.connect_ports", ["9-1"]),
        ("access.connect_ports", ["x"]),
        ("access.default", "maybe"),
        ("access.default", True),
        ("access.allow_private", "yes"),
    ],
)
def test_invalid_access_settings_name_the_setting(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        load_settings(overrides={"access.allow_clients": ["10.0.0.0/8"], key: value})
