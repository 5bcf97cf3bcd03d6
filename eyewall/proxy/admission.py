"""Admission's I/O: performs what `eyewall.policy.admission.decide` asks for — a bcrypt
check, a name resolution — and asks again until it has a decision.

`admit_now` answers without waiting whenever it can (no credentials to check, the
addresses already known): the common case costs one `decide` call and no coroutine.
`admit` finishes the rest.  Nothing here writes to the client: the refusal goes back to
the client loop, which answers it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from eyewall.errors import ErrorKind, ProxyError
from eyewall.policy.admission import Allow, Refusal, Resolve, Step, Ticket, Verify, decide
from eyewall.policy.auth import Credentials, Users
from eyewall.proxy.context import ProxyContext
from eyewall.proxy.timeouts import Phase, Watch

__all__ = ["Verifier", "admit", "admit_now"]

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
        self.skipped = 0  # checks dropped because their clients left

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
            return None
        result: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        waiters = [alive]
        self._pending[key] = (result, waiters)
        self.queued += 1
        try:
            async with self._slots:
                if not any(still() for still in waiters):
                    self.skipped += 1
                    result.set_result(None)
                else:
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
        self._pool.shutdown(wait=False, cancel_futures=True)


def admit_now(ctx: ProxyContext, ticket: Ticket) -> Step:
    """The next step for ``ticket``, resolving from cache and IP literals without
    waiting; a `Verify` or `Resolve` left over needs `admit`."""
    step = decide(ticket, ctx.policy, ctx.state, ctx.clock(), ctx.own)
    while isinstance(step, Resolve):
        known = ctx.pool.resolver.known(step.host, step.port)
        if known is None:
            return step
        ticket.addresses = tuple(ip for _, (ip, *_) in known)
        step = decide(ticket, ctx.policy, ctx.state, ctx.clock(), ctx.own)
    return step


async def admit(
    ctx: ProxyContext, ticket: Ticket, step: Step, watch: Watch, alive: Callable[[], bool]
) -> Allow | Refusal:
    """Perform the checks ``step`` asks for until admission decides.  The policy in
    force is read afresh at each step (a reload meanwhile applies at once)."""
    while True:
        match step:
            case Allow() | Refusal():
                return step
            case Verify(credentials):
                watch.enter(Phase.HOOK, ctx.clock(), None)  # a queue wait, bounded by size
                ok = await ctx.verifier.verify(ctx.policy.users, credentials, alive)
                if ok is None:
                    return Refusal(
                        ErrorKind.OVERLOADED,
                        "login-queue",
                        "too many logins are being checked; try again",
                        1.0,
                    )
                ticket.verified = ok
            case Resolve(host, port):
                limit = ctx.settings.timeouts.upstream_connect
                watch.enter(Phase.RESOLVING, ctx.clock(), None)  # bounded right here
                try:
                    async with asyncio.timeout(limit):
                        addrs = await ctx.pool.resolver.resolve(host, port)
                except TimeoutError:
                    return Refusal(
                        ErrorKind.CONNECTION_TIMEOUT, "", f"resolving {host} took too long"
                    )
                except ProxyError as e:
                    ticket.resolve_error = e.detail
                else:
                    ticket.addresses = tuple(ip for _, (ip, *_) in addrs)
        step = decide(ticket, ctx.policy, ctx.state, ctx.clock(), ctx.own)
