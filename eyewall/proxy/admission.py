"""Admission's I/O: performs what `eyewall.policy.admission.decide` asks for — a bcrypt
check (`eyewall.proxy.verifier`), a name resolution — and asks again until it has a
decision.

`admit_now` answers without waiting whenever it can (no credentials to check, the
addresses already known): the common case costs one `decide` call and no coroutine.
`admit` finishes the rest.  Nothing here writes to the client: the refusal goes back to
the client loop, which answers it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from eyewall.errors import ErrorKind, ProxyError
from eyewall.policy.admission import Allow, Refusal, Resolve, Step, Ticket, Verify, decide
from eyewall.proxy.context import ProxyContext
from eyewall.proxy.timeouts import Phase, Watch

__all__ = ["admit", "admit_now"]


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
