"""Proxy authentication (Basic, bcrypt) and the login throttle, with injected time."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import bcrypt
import pytest

from eyewall.policy.auth import (
    MAX_USER,
    Credentials,
    HtpasswdError,
    LoginThrottle,
    Users,
    parse_basic,
    parse_htpasswd,
    source_key,
)
from eyewall.policy.state import CredentialCache


def hashed(password: str, rounds: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


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
        ("bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "where:3: user 'bob' has an unsupported"),
        ("bob:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/", "where:3: user 'bob' has an unsupp"),
        ("bob:plaintext", "where:3: user 'bob'"),
        ("bob", "where:3: expected user:hash"),
        (":" + BOB, "where:3: expected user:hash"),
        ("bob:$2b$04$truncated", "where:3: user 'bob'"),  # bcrypt prefix, not a hash
    ],
)
def test_parse_htpasswd_rejects_bad_lines_naming_line_and_user(line: str, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_htpasswd(f"alice:{ALICE}\n# comment\n{line}\n", "where")


def test_parse_htpasswd_names_every_bad_line() -> None:
    with pytest.raises(HtpasswdError) as caught:
        parse_htpasswd(f"bob\nalice:{ALICE}\ncarol:plain\n", "/etc/eyewall/htpasswd")
    assert caught.value.errors == [
        "/etc/eyewall/htpasswd:1: expected user:hash",
        "/etc/eyewall/htpasswd:3: user 'carol' has an unsupported hash (only bcrypt)",
    ]


def test_users_from_inline_and_file_are_merged_with_groups() -> None:
    users = Users.from_entries(
        {"bob": BOB}, f"alice:{ALICE}\n", {"staff": ["alice", "bob"], "ops": ["alice"]}
    )
    assert set(users.hashes) == {"alice", "bob"} and users.enabled
    assert users.groups("alice") == {"staff", "ops"}
    assert users.groups("bob") == {"staff"}
    assert users.groups("nobody") == frozenset()
    assert users.groups(None) == frozenset()


@pytest.mark.parametrize(
    ("inline", "text", "groups", "expected"),
    [
        ({"carol": "{SHA}abc"}, None, {}, "auth.users.carol:"),
        ({}, "carol:$apr1$x$y", {}, "auth.htpasswd:1: user 'carol'"),
    ],
)
def test_users_from_entries_errors(inline: dict, text: Any, groups: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        Users.from_entries(inline, text, groups)


def test_users_enabled_only_with_users() -> None:
    assert not Users.from_entries({}, None, {}).enabled
    assert not Users.from_entries({}, "# nobody yet\n", {}).enabled


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


def test_unknown_users_cost_what_known_users_cost() -> None:
    """No user enumeration by timing: the dummy hash has the users' (most common) cost.
    Compared as a ratio, not against a clock: the fastest of runs taken in turns, so
    that a busy machine slows both alike (load only ever adds time)."""
    users = Users({"alice": hashed("pw", rounds=8).encode(), "bob": hashed("pw", 8).encode()})
    assert users.dummy_cost == 8
    users.verify(Credentials("warm", "up"))  # makes the dummy hash
    known, unknown = Credentials("alice", "wrong"), Credentials("zed", "x")
    times: dict[Credentials, list[float]] = {known: [], unknown: []}
    for _ in range(9):
        for creds in (known, unknown):
            start = time.perf_counter()
            users.verify(creds)
            times[creds].append(time.perf_counter() - start)
    assert 0.5 < min(times[unknown]) / min(times[known]) < 2.0
    assert Users({"a": hashed("pw", 5).encode()}).dummy_cost == 5
    assert Users().dummy_cost == 10


# --- the verified-credentials cache --------------------------------------------------------


def test_cache_remembers_until_expiry_and_only_for_the_stored_hash() -> None:
    cache = CredentialCache()
    good = Credentials("alice", "alice-pw")
    stored = ALICE.encode()
    assert not cache.hit(good, stored, 100.0)
    cache.remember(good, stored, 400.0)
    assert cache.hit(good, stored, 100.0) and cache.hit(good, stored, 400.0)
    assert not cache.hit(Credentials("alice", "other"), stored, 200.0)
    assert not cache.hit(good, BOB.encode(), 200.0)  # the password changed on file
    assert not cache.hit(good, None, 200.0)  # the user was removed
    assert not cache.hit(good, stored, 400.5)
    assert not cache.hit(good, stored, 100.0)  # the expired entry was dropped


def test_cache_size_is_bounded_least_recently_used_first() -> None:
    cache = CredentialCache(size=2)
    a, b, c = (Credentials(u, "pw") for u in "abc")
    cache.remember(a, b"h", 10.0)
    cache.remember(b, b"h", 10.0)
    assert cache.hit(a, b"h", 1.0)  # a is now the most recent
    cache.remember(c, b"h", 10.0)
    assert [cache.hit(x, b"h", 1.0) for x in (a, b, c)] == [True, False, True]


def test_cache_key_does_not_hold_the_password() -> None:
    creds = Credentials("alice", "hunter2-secret")
    key = creds.fingerprint()
    assert len(key) == 32 and key == Credentials("alice", "hunter2-secret").fingerprint()
    assert b"hunter2" not in key and "hunter2".encode("utf-16-le") not in key
    assert key != Credentials("alice", "hunter2-secreT").fingerprint()
    assert key != Credentials("alicE", "hunter2-secret").fingerprint()
    assert key != creds.fingerprint(b"salt")


def test_cache_key_tells_user_and_password_apart() -> None:
    assert Credentials("a", "b\0c").fingerprint() != Credentials("a\0b", "c").fingerprint()


# --- the login throttle ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_sources_are_counted_per_ipv4_address_and_ipv6_slash_64(client: str, key: str) -> None:
    assert source_key(client) == key


def test_a_source_is_locked_out_after_its_allowance_until_the_window_frees_a_slot() -> None:
    throttle = LoginThrottle(window=60.0, per_source=3, per_user=100)
    for t in (0.0, 10.0, 20.0):
        assert throttle.locked("192.0.2.1", "eve", t) is None
        throttle.failed("192.0.2.1", "eve", t)
    assert throttle.locked("192.0.2.1", "anyone", 20.0) == pytest.approx(40.0)
    assert throttle.locked("192.0.2.1", None, 59.0) == pytest.approx(1.0)
    assert throttle.locked("192.0.2.1", None, 60.5) is None  # the first failure aged out
    assert throttle.locked("192.0.2.2", "eve", 20.0) is None  # another source


def test_rotating_addresses_within_an_ipv6_slash_64_does_not_escape() -> None:
    throttle = LoginThrottle(window=60.0, per_source=5, per_user=100)
    for i in range(5):
        throttle.failed(f"2001:db8::{i + 1:x}", f"user{i}", float(i))
    assert throttle.locked("2001:db8::ffff", "fresh", 5.0) is not None
    assert throttle.locked("2001:db8:0:1::1", "fresh", 5.0) is None


def test_guessing_one_user_from_many_sources_locks_the_user_name() -> None:
    throttle = LoginThrottle(window=60.0, per_source=5, per_user=4)
    for i in range(4):
        throttle.failed(f"198.51.100.{i}", "alice", float(i))
    assert throttle.locked("203.0.113.9", "alice", 4.0) is not None
    assert throttle.locked("203.0.113.9", "bob", 4.0) is None


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(window=60.0, per_source=3, max_keys=100)
    for i in range(10_000):
        throttle.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", None, float(i) / 1000)
    assert len(throttle._sources._events) <= 100


def test_over_long_user_names_are_malformed_credentials() -> None:
    longest = "u" * MAX_USER
    assert parse_basic(basic_value(longest, "pw")) == Credentials(longest, "pw")
    assert parse_basic(basic_value(longest + "u", "pw")) is None
    with pytest.raises(HtpasswdError, match=f"where:1: user name longer than {MAX_USER}"):
        parse_htpasswd(f"{longest}u:{ALICE}\n", "where")


def basic_value(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
