"""The bcrypt verifier: bounded, fair, coalescing, and it drops checks whose clients
left — so a flood of made-up credentials from clients that hang up at once cannot delay
a real user's login."""

from __future__ import annotations

import asyncio
import threading

import bcrypt

from eyewall.policy.auth import Credentials, Users
from eyewall.proxy.verifier import Verifier

HASH = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4))


class GatedUsers(Users):
    """Users whose checks wait for the test to open a gate (counted)."""

    def __init__(self) -> None:
        super().__init__({"alice": HASH})
        self.gate = threading.Event()
        self.started = 0

    def verify(self, credentials: Credentials) -> bool:
        self.started += 1
        self.gate.wait(10)
        return super().verify(credentials)


def test_checks_of_clients_that_left_are_skipped_and_a_real_login_goes_first() -> None:
    async def main() -> None:
        users = GatedUsers()
        verifier = Verifier(threads=1, max_queued=100)
        left = lambda: False  # noqa: E731 - the flood hung up at once
        blocker = asyncio.ensure_future(
            verifier.verify(users, Credentials("alice", "x0"), lambda: True)
        )
        while users.started < 1:
            await asyncio.sleep(0)
        flood = [  # made-up users from as many addresses, each hanging up at once
            asyncio.ensure_future(
                verifier.verify(users, Credentials(f"u{i}", "g"), left, f"192.0.2.{i}")
            )
            for i in range(60)
        ]
        real = asyncio.ensure_future(
            verifier.verify(users, Credentials("alice", "right"), lambda: True)
        )
        users.gate.set()
        assert await real is True
        assert await blocker is False
        assert set(await asyncio.gather(*flood)) == {None}
        assert users.started == 2  # the blocker and the real user; no bcrypt for the flood
        assert verifier.checks == {"run": 2, "skipped": 60, "refused": 0}
        verifier.close()

    asyncio.run(main())


def test_the_queue_is_bounded() -> None:
    async def main() -> None:
        users = GatedUsers()
        verifier = Verifier(threads=1, max_queued=3)
        waiting = [
            asyncio.ensure_future(
                verifier.verify(users, Credentials(f"u{i}", "p"), lambda: True, f"s{i}")
            )
            for i in range(3)
        ]
        await asyncio.sleep(0)
        late = Credentials("alice", "late")
        assert await verifier.verify(users, late, lambda: True, "s9") is None
        assert verifier.checks["refused"] == 1
        users.gate.set()
        assert await asyncio.gather(*waiting) == [False, False, False]
        verifier.close()

    asyncio.run(main())


def test_guesses_at_one_account_cannot_delay_another_users_login() -> None:
    """Attackers who wait for their answers, from many addresses, all at bob: beyond
    `per_key` queued checks for one user name they are refused at once, so alice's
    first login runs next."""

    async def main() -> None:
        users = GatedUsers()
        verifier = Verifier(threads=1, max_queued=100, per_key=2)
        guesses = [
            asyncio.ensure_future(
                verifier.verify(users, Credentials("bob", f"g{i}"), lambda: True, f"10.0.0.{i}")
            )
            for i in range(60)
        ]
        while users.started < 1:
            await asyncio.sleep(0)
        real = asyncio.ensure_future(
            verifier.verify(users, Credentials("alice", "right"), lambda: True, "10.9.9.9")
        )
        users.gate.set()
        assert await real is True
        outcomes = await asyncio.gather(*guesses)
        assert outcomes.count(None) == 58 and outcomes.count(False) == 2
        assert users.started == 3  # two guesses and alice
        assert verifier.checks["refused"] == 58
        verifier.close()

    asyncio.run(main())


def test_one_source_gets_its_share_of_the_queue() -> None:
    async def main() -> None:
        users = GatedUsers()
        verifier = Verifier(threads=1, max_queued=100, per_key=2)
        first = [
            asyncio.ensure_future(
                verifier.verify(users, Credentials(f"u{i}", "x"), lambda: True, "203.0.113.7")
            )
            for i in range(2)
        ]
        await asyncio.sleep(0)
        third = Credentials("u9", "x")
        assert await verifier.verify(users, third, lambda: True, "203.0.113.7") is None
        users.gate.set()
        assert await asyncio.gather(*first) == [False, False]
        verifier.close()

    asyncio.run(main())


def test_a_half_closed_client_is_still_checked_when_no_one_else_waits() -> None:
    """EOF may be a half-close (RFC 9112 §9.6): with nobody queued behind, the check
    runs and the client gets its answer."""

    async def main() -> None:
        users = GatedUsers()
        users.gate.set()
        verifier = Verifier(threads=1)
        gone = lambda: False  # noqa: E731
        assert await verifier.verify(users, Credentials("alice", "right"), gone, "s") is True
        assert verifier.checks == {"run": 1, "skipped": 0, "refused": 0}
        verifier.close()

    asyncio.run(main())


def test_concurrent_checks_of_the_same_credentials_share_one_run() -> None:
    async def main() -> None:
        users = GatedUsers()
        verifier = Verifier(threads=2)
        same = [
            asyncio.ensure_future(
                verifier.verify(users, Credentials("alice", "right"), lambda: True)
            )
            for _ in range(6)
        ]
        while users.started < 1:
            await asyncio.sleep(0)
        users.gate.set()
        assert await asyncio.gather(*same) == [True] * 6
        assert users.started == 1
        verifier.close()

    asyncio.run(main())
