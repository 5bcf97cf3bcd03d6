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
        flood = [
            asyncio.ensure_future(verifier.verify(users, Credentials("alice", f"g{i}"), left))
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
                verifier.verify(users, Credentials("alice", f"p{i}"), lambda: True)
            )
            for i in range(3)
        ]
        await asyncio.sleep(0)
        assert await verifier.verify(users, Credentials("alice", "late"), lambda: True) is None
        assert verifier.checks["refused"] == 1
        users.gate.set()
        assert await asyncio.gather(*waiting) == [False, False, False]
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
