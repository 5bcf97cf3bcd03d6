"""bcrypt checks off the event loop, bounded and fair: `Verifier`."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from eyewall.policy.auth import Credentials, Users

__all__ = ["Verifier"]

_Shared = tuple["asyncio.Future[bool | None]", list[Callable[[], bool]]]


class Verifier:
    """bcrypt checks off the event loop, bounded and fair.

    At most ``threads`` checks run at once (bcrypt is CPU-bound: the proxy keeps the
    rest of the machine), at most ``max_queued`` wait, first come first served, and at
    most ``per_key`` of them for one user name or one client source: guesses aimed at
    one account, or sent from one network, cannot fill the queue in front of everyone
    else's first login.  Concurrent checks of the same credentials share one run.  A
    queued check whose clients all left (EOF) is dropped before it costs anything
    while others wait behind it; with no one waiting it runs (the client may only have
    half-closed, RFC 9112 §9.6).
    """

    def __init__(self, threads: int = 2, max_queued: int = 64, per_key: int = 2) -> None:
        self.max_queued = max_queued
        self.per_key = per_key
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bcrypt")
        self._slots = asyncio.Semaphore(threads)
        self._pending: dict[
            tuple[int, bytes], tuple[asyncio.Future[bool | None], list[Callable[[], bool]]]
        ] = {}
        self._per_key: Counter[str] = Counter()  # "user:NAME" / "source:KEY" -> queued
        self.queued = 0  # checks queued or running
        self.running = 0
        self.checks = {"run": 0, "skipped": 0, "refused": 0}  # refused: no room to queue

    async def verify(
        self,
        users: Users,
        credentials: Credentials,
        alive: Callable[[], bool],
        source: str = "",
    ) -> bool | None:
        """Whether ``credentials`` are right; None when there is no room to queue the
        check (the queue, or this user's or ``source``'s share of it, is full) or every
        client waiting for it left while others waited.  ``alive`` says whether the
        asking client is still connected; ``source`` is its throttle key
        (`eyewall.policy.auth.source_key`)."""
        key = (id(users), credentials.fingerprint(users.stored(credentials.user) or b""))
        shared = self._pending.get(key)
        if shared is not None:
            shared[1].append(alive)
            return await asyncio.shield(shared[0])
        shares = [f"user:{credentials.user}"] + ([f"source:{source}"] if source else [])
        if self.queued >= self.max_queued or any(self._per_key[k] >= self.per_key for k in shares):
            self.checks["refused"] += 1
            return None
        result: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        waiters = [alive]
        self._pending[key] = (result, waiters)
        self.queued += 1
        self._per_key.update(shares)
        try:
            async with self._slots:
                waiting = self.queued - self.running - 1  # others still without a thread
                if waiting > 0 and not any(still() for still in waiters):
                    self.checks["skipped"] += 1
                    result.set_result(None)
                else:
                    self.checks["run"] += 1
                    self.running += 1
                    try:
                        loop = asyncio.get_running_loop()
                        result.set_result(
                            await loop.run_in_executor(self._pool, users.verify, credentials)
                        )
                    finally:
                        self.running -= 1
        except BaseException as e:
            if not result.done():
                result.set_exception(e)
            raise
        finally:
            self.queued -= 1
            self._per_key.subtract(shares)
            for k in shares:
                if self._per_key[k] <= 0:
                    del self._per_key[k]
            del self._pending[key]
        return result.result()

    def close(self) -> None:
        """Stop the checking threads; queued checks are cancelled."""
        self._pool.shutdown(wait=False, cancel_futures=True)
