"""The admission sequence: the one place that decides whether a request may go through.

`decide` is a pure function of the request (a `Ticket`), the policy, the admission
state and the time.  It runs the checks in this order, stopping at the first refusal:

1. client network (403);
2. client request rate (429) — before authentication, so a flood of guesses costs no
   bcrypt check;
3. authentication: no credentials (407), a source or user name locked out by the
   login throttle (429), a wrong password (407);
4. user request rate (429);
5. destination rules, first match wins (403), then the guards: CONNECT ports,
   private destinations (403), and the proxy's own listeners (403, a loop).

Two of those steps need I/O that a pure function cannot do.  Instead of a decision,
`decide` then returns what it needs — `Verify` (a bcrypt check) or `Resolve` (the
destination's addresses) — and the caller performs it, records the result in the
ticket and calls `decide` again.  The ticket remembers what was already done (tokens
spent, a failure counted), so asking again never counts twice.  The proxy
(`eyewall.proxy.admission`) and ``eyewall explain`` drive the same function; explain
passes a ``trace`` list and prints it.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

from eyewall.errors import ErrorKind
from eyewall.policy.auth import Credentials
from eyewall.policy.engine import LimitParameters, Policy
from eyewall.policy.rules import Action, Request
from eyewall.policy.state import AdmissionState

__all__ = ["Allow", "Refusal", "Resolve", "Step", "Ticket", "Trace", "Verify", "decide"]

Trace = list[tuple[str, str]]  # (step, what happened), for eyewall explain
Say = Callable[[tuple[str, str]], None]


@dataclass(slots=True)
class Ticket:
    """One request on its way through admission.

    The first fields are what the client asked for; ``scheme`` is "http", "https" or
    "connect".  The rest is filled in along the way: ``verified`` and ``addresses`` (or
    ``resolve_error``) by the caller after a `Verify` or `Resolve` step, the others by
    `decide`.
    """

    client: str
    method: str
    scheme: str
    host: str
    port: int
    credentials: Credentials | None = None
    verified: bool | None = None
    addresses: tuple[str, ...] | None = None
    resolve_error: str = ""
    user: str | None = None
    client_charged: bool = False
    login_done: bool = False
    user_charged: bool = False


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through to ``addresses`` (exactly these, already checked);
    ``action`` is ALLOW or INTERCEPT; ``rule`` is the rule id or "default"."""

    action: Action
    rule: str
    addresses: tuple[str, ...]
    user: str | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Refuse with the status of ``kind``.  ``rule`` names what refused (a rule id, a
    guard, a limit) and ``message`` says why (for a rule, its own message, maybe
    empty); ``retry_after`` (seconds) goes with 429; ``login`` is "missing", "wrong" or
    "throttled" for authentication failures."""

    kind: ErrorKind
    rule: str
    message: str
    retry_after: float | None = None
    login: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Verify:
    """Check these credentials (bcrypt, slow: off the event loop) and set
    ``ticket.verified``."""

    credentials: Credentials


@dataclass(frozen=True, slots=True)
class Resolve:
    """Resolve ``host`` and set ``ticket.addresses`` (or ``ticket.resolve_error``)."""

    host: str
    port: int


Step = Allow | Refusal | Verify | Resolve

_NOWHERE: frozenset[tuple[str, int]] = frozenset()


def decide(
    ticket: Ticket,
    policy: Policy,
    state: AdmissionState,
    now: float,
    own: Container[tuple[str, int]] = _NOWHERE,
    trace: Trace | None = None,
) -> Step:
    """The next step for ``ticket`` (see the module docstring).

    ``now`` is monotonic seconds; ``own`` holds the proxy's own listening (address,
    port) pairs (`eyewall.policy.networks.OwnListeners`).  Mutates ``ticket`` and
    ``state`` (tokens, login failures, verified logins); raises nothing.
    """
    t = ticket
    say: Say | None = trace.append if trace is not None else None
    limits = policy.limits
    if not policy.client_allowed(t.client):
        if say:
            say(("client", f"{t.client} is not in access.allow_clients"))
        return Refusal(
            ErrorKind.DENIED, "client-network", f"client address {t.client} may not use this proxy"
        )
    if say:
        nets = ", ".join(str(n) for n in policy.clients)
        say(("client", f"{t.client} allowed ({nets})"))
        say(("limits", _describe_limits(limits)))
    if limits.client_rps and not t.client_charged:
        t.client_charged = True
        burst = LimitParameters.burst_of(limits.client_rps, limits.client_burst)
        limited = state.client_rps.take(t.client, now, limits.client_rps, burst)
        if limited is not None:
            return Refusal(
                ErrorKind.RATE_LIMITED, limited.limit, limited.describe(), limited.retry_after
            )
    if policy.auth_required and not t.login_done:
        refused = _login(t, policy, state, now, say)
        if refused is not None:
            return refused
    elif say and not policy.auth_required:
        say(("auth", "not required (no users configured)"))
    if limits.user_rps and t.user is not None and not t.user_charged:
        t.user_charged = True
        burst = LimitParameters.burst_of(limits.user_rps, limits.user_burst)
        limited = state.user_rps.take(t.user, now, limits.user_rps, burst)
        if limited is not None:
            return Refusal(
                ErrorKind.RATE_LIMITED, limited.limit, limited.describe(), limited.retry_after
            )
    req = Request(t.client, t.method, t.scheme, t.host, t.port, t.user, policy.users.groups(t.user))
    addresses = () if t.resolve_error else t.addresses
    decision = policy.explain(req, addresses) if say else policy.decide(req, addresses)
    if decision.action is Action.RESOLVE:
        return Resolve(t.host, t.port)
    if say:
        for step in decision.trace:
            say(("rules" if step.startswith(("rule ", "no rule")) else "guards", step))
    if decision.action is Action.DENY:
        return Refusal(ErrorKind.DENIED, decision.rule, decision.message)
    if t.resolve_error:
        return Refusal(ErrorKind.DNS_ERROR, decision.rule, t.resolve_error)
    if t.addresses is None:
        return Resolve(t.host, t.port)  # allowed whatever the addresses: still needed
    chosen = decision.addresses if decision.addresses is not None else t.addresses
    for address in chosen:
        if (address, t.port) in own:
            if say:
                say(("guards", f"own-listener: {address}:{t.port} is this proxy"))
            return Refusal(
                ErrorKind.LOOP, "own-listener", f"request aimed at the proxy itself ({address})"
            )
    return Allow(decision.action, decision.rule, chosen, t.user)


def _login(
    t: Ticket, policy: Policy, state: AdmissionState, now: float, log: Say | None
) -> Refusal | Verify | None:
    """Step 3: authentication.  None when the user is established (``t.user`` set)."""
    credentials = t.credentials
    if credentials is None:
        if log:
            log(("auth", "required (Basic); no credentials"))
        return Refusal(
            ErrorKind.AUTH_REQUIRED, "auth", "proxy authentication required", login="missing"
        )
    user = credentials.user
    stored = policy.users.stored(user)
    if t.verified is None:
        if state.credentials.hit(credentials, stored, now):
            # A recent login: no bcrypt, and no throttle either (a guesser cannot lock
            # out a user who is already in).
            t.login_done = True
            t.user = user
            if log:
                log(("auth", f"required (Basic); {user} logged in recently"))
            return None
        else:
            wait = state.logins.locked(t.client, user, now)
            if wait is not None:
                t.login_done = True
                return Refusal(
                    ErrorKind.RATE_LIMITED,
                    "login-throttle",
                    "too many failed logins; try again later",
                    max(wait, 1.0),
                    login="throttled",
                    user=user,
                )
            return Verify(credentials)
    t.login_done = True
    if not t.verified or stored is None:
        state.logins.failed(t.client, user, now)
        if log:
            log(("auth", f"required (Basic); credentials for {user!r} are not valid"))
        return Refusal(
            ErrorKind.AUTH_REQUIRED, "auth", "proxy authentication failed", login="wrong", user=user
        )
    state.credentials.remember(credentials, stored, now + policy.login_ttl)
    t.user = user
    if log:
        groups = ", ".join(sorted(policy.users.groups(user))) or "none"
        log(("auth", f"required (Basic); {user} authenticated; groups: {groups}"))
    return None


def _describe_limits(limits: LimitParameters) -> str:
    configured = {
        "client_rps": limits.client_rps,
        "user_rps": limits.user_rps,
        "client_connections": limits.client_connections,
        "client_tunnels": limits.client_tunnels,
        "user_tunnels": limits.user_tunnels,
    }
    shown = [f"{name} {value:g}" for name, value in configured.items() if value]
    return ", ".join(shown) if shown else "none configured"
