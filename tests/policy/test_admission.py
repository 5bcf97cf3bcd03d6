"""The admission sequence (`eyewall.policy.admission.decide`): the order of the checks,
the I/O steps it asks for, state kept across reloads, the login throttle as a
brute-force defence, and the own-listener guard in every spelling.  Pure: no sockets,
time passed in."""

from __future__ import annotations

from typing import Any

import bcrypt
import pytest

from eyewall.app import build_policy
from eyewall.config import load_settings
from eyewall.errors import ErrorKind
from eyewall.policy.admission import (
    Allow,
    CheckLogin,
    Refusal,
    Resolve,
    Ticket,
    Verify,
    decide,
    perform,
)
from eyewall.policy.auth import Credentials
from eyewall.policy.engine import Policy
from eyewall.policy.networks import OwnListeners
from eyewall.policy.rules import Action
from eyewall.policy.state import AdmissionState

ALICE = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=4)).decode()
PUBLIC = ("93.184.216.34",)


def policy(**overrides: Any) -> Policy:
    return build_policy(load_settings(overrides=overrides))


def ticket(
    client: str = "127.0.0.1",
    host: str = "example.com",
    port: int = 80,
    credentials: Credentials | None = None,
    method: str = "GET",
    scheme: str = "http",
) -> Ticket:
    return Ticket(client, method, scheme, host, port, credentials)


def run(
    t: Ticket,
    p: Policy,
    state: AdmissionState,
    now: float = 0.0,
    addresses: tuple[str, ...] = PUBLIC,
    password_ok: bool = True,
    own: Any = frozenset(),
) -> tuple[Allow | Refusal, list[str]]:
    """Drive decide as the proxy does; returns the decision and the steps asked for."""
    asked = []
    while True:
        step = decide(t, p, state, now, own)
        if perform(step, t, state, now):
            continue
        match step:
            case Verify():
                asked.append("verify")
                t.verified = password_ok
            case Resolve():
                asked.append("resolve")
                if addresses:
                    t.addresses = addresses
                else:
                    t.resolve_error = "cannot resolve example.com: Name or service not known"
            case _:
                return step, asked


def test_an_open_policy_allows_after_one_resolution() -> None:
    decision, asked = run(ticket(), policy(), AdmissionState())
    assert isinstance(decision, Allow)
    assert (decision.action, decision.rule, decision.addresses) == (Action.ALLOW, "default", PUBLIC)
    assert asked == ["resolve"]


def test_client_network_is_checked_first() -> None:
    p = policy(**{"auth.users": {"alice": ALICE}, "rate_limits.client_rps": 1})
    decision, asked = run(ticket(client="10.0.0.1"), p, AdmissionState())
    assert isinstance(decision, Refusal)
    assert (decision.kind, decision.rule) == (ErrorKind.DENIED, "client-network")
    assert asked == []


def test_client_rate_is_charged_before_authentication() -> None:
    """A flood of guesses is stopped by the client's rate limit before any bcrypt."""
    p = policy(
        **{
            "auth.users": {"alice": ALICE},
            "rate_limits.client_rps": 1,
            "rate_limits.client_burst": 1,
        }
    )
    state = AdmissionState()
    guess = Credentials("alice", "guess")
    first, asked = run(ticket(credentials=guess), p, state, password_ok=False)
    assert isinstance(first, Refusal) and first.login == "wrong" and asked == ["verify"]
    second, asked = run(ticket(credentials=guess), p, state, password_ok=False)
    assert isinstance(second, Refusal) and second.kind is ErrorKind.RATE_LIMITED
    assert second.rule == "client_rps" and asked == []


def test_missing_and_wrong_credentials_are_told_apart() -> None:
    p = policy(**{"auth.users": {"alice": ALICE}})
    missing, _ = run(ticket(), p, AdmissionState())
    wrong, _ = run(
        ticket(credentials=Credentials("alice", "x")), p, AdmissionState(), password_ok=False
    )
    assert isinstance(missing, Refusal) and isinstance(wrong, Refusal)
    assert (missing.kind, missing.login) == (ErrorKind.AUTH_REQUIRED, "missing")
    assert (wrong.kind, wrong.login, wrong.user) == (ErrorKind.AUTH_REQUIRED, "wrong", "alice")


def test_a_verified_login_is_remembered_and_not_checked_again() -> None:
    p = policy(**{"auth.users": {"alice": ALICE}})
    state = AdmissionState()
    good = Credentials("alice", "alice-pw")
    decision, asked = run(ticket(credentials=good), p, state)
    assert (
        isinstance(decision, Allow) and decision.user == "alice" and asked == ["verify", "resolve"]
    )
    again, asked = run(ticket(credentials=good), p, state, now=10.0)
    assert isinstance(again, Allow) and asked == ["resolve"]
    later, asked = run(ticket(credentials=good), p, state, now=301.0)  # auth.cache_ttl
    assert isinstance(later, Allow) and asked == ["verify", "resolve"]


def test_nothing_is_charged_twice_across_io_steps() -> None:
    p = policy(
        **{
            "auth.users": {"alice": ALICE},
            "rate_limits.client_rps": 1,
            "rate_limits.client_burst": 1,
            "rate_limits.user_rps": 1,
            "rate_limits.user_burst": 1,
        }
    )
    state = AdmissionState()
    decision, asked = run(ticket(credentials=Credentials("alice", "alice-pw")), p, state)
    assert isinstance(decision, Allow) and asked == ["verify", "resolve"]
    # Each limit was charged once although decide ran three times.
    assert state.client_rps.take("127.0.0.1", 0.0, 1.0, 1) is not None
    assert state.user_rps.take("alice", 0.0, 1.0, 1) is not None
    assert state.client_rps.take("127.0.0.1", 1.0, 1.0, 1) is None


def test_a_reload_keeps_rate_limits_counters_and_failed_logins() -> None:
    """The state belongs to the application, not to the policy a reload replaces."""
    old = policy(
        **{
            "auth.users": {"alice": ALICE},
            "rate_limits.client_rps": 1,
            "rate_limits.client_burst": 1,
        }
    )
    state = AdmissionState()
    assert isinstance(
        run(ticket(credentials=Credentials("alice", "alice-pw")), old, state)[0], Allow
    )
    assert state.client_connections.acquire("127.0.0.1", 1) is None
    for i in range(5):
        run(
            ticket(client=f"192.0.2.{i}", credentials=Credentials("x", "y")),
            old,
            state,
            now=float(i),
            password_ok=False,
        )
    new = policy(
        **{
            "auth.users": {"alice": ALICE},
            "rate_limits.client_rps": 1,
            "rate_limits.client_burst": 1,
            "access.allow_clients": ["0.0.0.0/0"],
        }
    )
    limited, _ = run(ticket(credentials=Credentials("alice", "alice-pw")), new, state)
    assert isinstance(limited, Refusal) and limited.rule == "client_rps"
    assert state.client_connections.acquire("127.0.0.1", 1) is not None  # still at its cap
    locked, _ = run(
        ticket(client="203.0.113.1", credentials=Credentials("x", "z")), new, state, now=6.0
    )
    assert isinstance(locked, Refusal)  # the per-user lock on "x"...
    assert locked.login == "wrong" or locked.login == "throttled"


def test_the_login_throttle_locks_a_source_out_without_checking_passwords() -> None:
    p = policy(**{"auth.users": {"alice": ALICE}})
    state = AdmissionState()
    for i in range(5):
        decision, asked = run(
            ticket(credentials=Credentials("alice", f"guess{i}")),
            p,
            state,
            now=float(i),
            password_ok=False,
        )
        assert isinstance(decision, Refusal) and decision.login == "wrong" and asked == ["verify"]
    decision, asked = run(ticket(credentials=Credentials("alice", "alice-pw")), p, state, now=5.0)
    assert isinstance(decision, Refusal)
    assert (decision.kind, decision.login, asked) == (ErrorKind.RATE_LIMITED, "throttled", [])
    assert decision.retry_after == pytest.approx(55.0)
    ok, asked = run(ticket(credentials=Credentials("alice", "alice-pw")), p, state, now=61.0)
    assert isinstance(ok, Allow) and asked == ["verify", "resolve"]


def test_a_success_does_not_reset_the_count() -> None:
    """A guesser who owns an account cannot wipe its failures by logging in."""
    p = policy(**{"auth.users": {"alice": ALICE, "mallory": ALICE}})
    state = AdmissionState()
    for i in range(4):
        run(
            ticket(credentials=Credentials("alice", f"g{i}")),
            p,
            state,
            now=float(i),
            password_ok=False,
        )
    ok, _ = run(ticket(credentials=Credentials("mallory", "alice-pw")), p, state, now=4.0)
    assert isinstance(ok, Allow)
    run(ticket(credentials=Credentials("alice", "g4")), p, state, now=5.0, password_ok=False)
    locked, asked = run(ticket(credentials=Credentials("alice", "g5")), p, state, now=6.0)
    assert isinstance(locked, Refusal) and locked.login == "throttled" and asked == []


def test_a_user_already_logged_in_is_not_locked_out_by_a_guesser() -> None:
    p = policy(**{"auth.users": {"alice": ALICE}})
    state = AdmissionState()
    good = Credentials("alice", "alice-pw")
    assert isinstance(run(ticket(credentials=good), p, state)[0], Allow)
    for i in range(30):  # the guesser shares the source and targets alice
        run(
            ticket(credentials=Credentials("alice", f"g{i}")),
            p,
            state,
            now=1.0 + i / 10,
            password_ok=False,
        )
    decision, asked = run(ticket(credentials=good), p, state, now=5.0)
    assert isinstance(decision, Allow) and asked == ["resolve"]


def test_dns_failure_still_applies_deny_rules() -> None:
    """A host denied by name is a 403 even when its name does not resolve."""
    p = policy(
        rules=[
            {"id": "lan", "action": "allow", "networks": ["10.0.0.0/8"]},
            {"id": "no-x", "action": "deny", "hosts": ["example.com"]},
        ]
    )
    denied, _ = run(ticket(), p, AdmissionState(), addresses=())
    assert isinstance(denied, Refusal) and (denied.kind, denied.rule) == (ErrorKind.DENIED, "no-x")
    failed, _ = run(ticket(host="other.example"), p, AdmissionState(), addresses=())
    assert isinstance(failed, Refusal) and failed.kind is ErrorKind.DNS_ERROR


def test_an_allowed_private_destination_still_needs_its_addresses() -> None:
    p = policy(**{"access.allow_private": True})
    decision, asked = run(ticket(), p, AdmissionState(), addresses=("127.0.0.1",))
    assert isinstance(decision, Allow) and decision.addresses == ("127.0.0.1",)
    assert asked == ["resolve"]


OWN = OwnListeners(
    [("127.0.0.1", 8080), ("::1", 8480), ("0.0.0.0", 3128)],
    is_local=lambda address: address in ("192.0.2.10", "10.1.2.3"),
)


@pytest.mark.parametrize(
    ("address", "port", "own"),
    [
        ("127.0.0.1", 8080, True),
        ("::ffff:127.0.0.1", 8080, True),
        ("0.0.0.0", 8080, True),  # unspecified reaches loopback
        ("::", 8480, True),
        ("::ffff:0.0.0.0", 8080, True),
        ("::1", 8480, True),
        ("127.0.0.1", 8480, False),  # the admin listens on ::1 only
        ("127.0.0.2", 8080, False),
        ("127.0.0.1", 8081, False),
        ("192.0.2.10", 3128, True),  # a wildcard listener: every local address
        ("10.1.2.3", 3128, True),
        ("127.5.5.5", 3128, True),
        ("198.51.100.1", 3128, False),
        ("0.0.0.0", 1, False),
    ],
)
def test_own_listeners_in_every_spelling(address: str, port: int, own: bool) -> None:
    assert ((address, port) in OWN) is own


def test_requests_aimed_at_the_proxy_are_refused_after_resolution() -> None:
    p = policy(**{"access.allow_private": True, "access.connect_ports": ["1-65535"]})
    decision, _ = run(
        ticket(host="localhost", port=8080),
        p,
        AdmissionState(),
        addresses=("::1", "127.0.0.1"),
        own=OWN,
    )
    assert isinstance(decision, Refusal)
    assert (decision.kind, decision.rule) == (ErrorKind.LOOP, "own-listener")
    connect, _ = run(
        ticket(host="0.0.0.0", port=3128, method="CONNECT", scheme="connect"),
        p,
        AdmissionState(),
        addresses=("0.0.0.0",),
        own=OWN,
    )
    assert isinstance(connect, Refusal) and connect.kind is ErrorKind.LOOP


def test_the_trace_names_every_step() -> None:
    p = policy(
        **{"auth.users": {"alice": ALICE}},
        rules=[{"id": "no-x", "action": "deny", "hosts": ["x.example"]}],
    )
    t = ticket(credentials=Credentials("alice", "alice-pw"))
    trace: list[tuple[str, str]] = []
    state = AdmissionState()
    step = decide(t, p, state, 0.0, frozenset(), trace)
    assert isinstance(step, CheckLogin)
    assert perform(step, t, state, 0.0)
    step = decide(t, p, state, 0.0, frozenset(), trace)
    assert isinstance(step, Verify)
    t.verified = True
    step = decide(t, p, state, 0.0, frozenset(), trace)
    assert isinstance(step, Resolve)
    t.addresses = PUBLIC
    assert isinstance(decide(t, p, state, 0.0, frozenset(), trace), Allow)
    labels = [label for label, _ in trace]
    assert labels[:2] == ["client", "limits"]
    assert "auth" in labels and "rules" in labels
