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
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeGuard, cast

from eyewall.errors import ErrorKind, ProxyError
from eyewall.policy.admission import (
    Allow,
    Charge,
    CheckLogin,
    RecordFailure,
    Refusal,
    Resolve,
    Step,
    Ticket,
    Verify,
    decide,
    perform,
)
from eyewall.policy.auth import source_key
from eyewall.policy.state import LimitsUnavailable, SynchronousLimits
from eyewall.proxy.context import ProxyContext
from eyewall.proxy.timeouts import Phase, Watch

__all__ = ["admit", "admit_now", "pending", "settled"]

_DECIDED = (Allow, Refusal)
_VALUES = frozenset({bool, int, float, type(None)})


def pending(result: object) -> TypeGuard[Awaitable[Any]]:
    """Whether a limits store's answer is a coroutine still to await (a shared store,
    `eyewall.shared`) rather than the value itself (this process's own store, or the
    workers' shared memory).  Cheap for values: no abstract-class check."""
    return type(result) not in _VALUES and inspect.isawaitable(result)


async def settled(result: Any) -> Any:
    """``result``, awaited if a shared limits store returned a coroutine."""
    return await result if pending(result) else result


def admit_now(ctx: ProxyContext, ticket: Ticket) -> Step:
    """The next step for ``ticket`` that needs waiting, or the decision: limit steps
    on a synchronous store (this process's own limits, or shared memory), cached
    resolutions and IP literals are done here."""
    state = ctx.state
    local = None if state.asynchronous else cast(SynchronousLimits, state)
    if ticket.addresses is None and not ticket.resolve_error:
        # addresses at hand (an IP literal, a cached name) spare the decide call
        # that would only ask for them
        known = ctx.pool.resolver.known(ticket.host, ticket.port)
        if known is not None:
            ticket.addresses = tuple(ip for _, (ip, *_) in known)
    while True:
        step = decide(ticket, ctx.policy, state, ctx.clock(), ctx.own)
        if isinstance(step, Resolve):
            known = ctx.pool.resolver.known(step.host, step.port)
            if known is None:
                return step
            ticket.addresses = tuple(ip for _, (ip, *_) in known)
        elif (
            local is None
            or isinstance(step, _DECIDED)
            or not perform(step, ticket, local, ctx.clock())
        ):
            return step


async def admit(
    ctx: ProxyContext, ticket: Ticket, step: Step, watch: Watch, alive: Callable[[], bool]
) -> Allow | Refusal:
    """Perform the steps admission asks for until it decides.  The policy in force is
    read afresh at each step (a reload meanwhile applies at once).  A limits store that
    cannot be reached refuses with 503 or lets the request through, as the store says."""
    state = ctx.state
    while True:
        match step:
            case Allow() | Refusal():
                return step
            case Charge() | CheckLogin() | RecordFailure():
                try:
                    await _perform(step, ticket, state, ctx.clock())
                except LimitsUnavailable as e:
                    if not e.fail_open:
                        return Refusal(ErrorKind.OVERLOADED, "limits-store", str(e), 1.0)
                    _allow_without(step, ticket)
            case Verify(credentials):
                watch.enter(Phase.AUTHENTICATING, ctx.clock(), None)  # bounded by its queue
                source = source_key(ticket.client)
                ok = await ctx.verifier.verify(ctx.policy.users, credentials, alive, source)
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
                        ErrorKind.CONNECTION_TIMEOUT,
                        "",
                        f"resolving {host} took too long (timeouts.upstream_connect)",
                    )
                except ProxyError as e:
                    ticket.resolve_error = e.detail
                else:
                    ticket.addresses = tuple(ip for _, (ip, *_) in addrs)
        step = decide(ticket, ctx.policy, state, ctx.clock(), ctx.own)


async def _perform(step: Step, ticket: Ticket, state: Any, now: float) -> None:
    """A limit step on ``state``, whose methods may be coroutines (a shared store)."""

    done = settled
    match step:
        case Charge(limit, key, rate, burst):
            ticket.charges[limit] = await done(state.take(limit, key, now, rate, burst))
        case CheckLogin(client, user):
            ticket.login_wait = await done(state.login_wait(client, user, now))
            ticket.login_checked = True
        case RecordFailure(client, user):
            await done(state.login_failed(client, user, now))
            ticket.failure_recorded = True


def _allow_without(step: Step, ticket: Ticket) -> None:
    """Fail open: record the step as done with nothing against the request."""
    match step:
        case Charge(limit):
            ticket.charges[limit] = None
        case CheckLogin():
            ticket.login_wait = None
            ticket.login_checked = True
        case RecordFailure():
            ticket.failure_recorded = True
