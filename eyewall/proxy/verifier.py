"""bcrypt checks off the event loop, bounded and fair: `Verifier`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from eyewall.policy.auth import Credentials, Users

__all__ = ["Verifier"]

_Shared = tuple["asyncio.Future[bool | None]", list[Callable[[], bool]]]


class Verifier:
    """bcrypt checks off the event loop, bounded and fair.

    At most ``threads`` checks run at once (bcrypt is CPU-bound: the proxy keeps the
    rest of the machine), at most ``max_queued`` wait, first come first served; a
    queued check whose clients all left is dropped before it costs anything, and
    concurrent checks of the same credentials share one run.
    """

    def __init__(self, threads: int = 2, max_queued: int = 64) -> None:
        self.max_queued = max_queued
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bcrypt")
        self._slots = asyncio.Semaphore(threads)
        self._pending: dict[
            tuple[int, bytes], tuple[asyncio.Future[bool | None], list[Callable[[], bool]]]
        ] = {}
        self.queued = 0
        self.checks = {"run": 0, "skipped": 0, "refused": 0}  # refused: the queue was full

    async def verify(
        self, users: Users, credentials: Credentials, alive: Callable[[], bool]
    ) -> bool | None:
        """Whether ``credentials`` are right; None when the queue is full or every
        client waiting for this check left before it ran.  ``alive`` says whether the
        asking client is still connected."""
        key = (id(users), credentials.fingerprint(users.stored(credentials.user) or b""))
        shared = self._pending.get(key)
        if shared is not None:
            shared[1].append(alive)
            return await asyncio.shield(shared[0])
        if self.queued >= self.max_queued:
            self.checks["refused"] += 1
            return None
        result: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        waiters = [alive]
        self._pending[key] = (result, waiters)
        self.queued += 1
        try:
            async with self._slots:
                if not any(still() for still in waiters):
                    self.checks["skipped"] += 1
                    result.set_result(None)
                else:
                    self.checks["run"] += 1
                    loop = asyncio.get_running_loop()
                    result.set_result(
                        await loop.run_in_executor(self._pool, users.verify, credentials)
                    )
        except BaseException as e:
            if not result.done():
                result.set_exception(e)
            raise
        finally:
            self.queued -= 1
            del self._pending[key]
        return result.result()

    def close(self) -> None:
        """Stop the checking threads; queued checks are cancelled."""
        self._pool.shutdown(wait=False, cancel_futures=True)
