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

Several steps need what a pure function cannot do: I/O (a bcrypt check, a name
resolution) and the limits kept between requests, which may live in this process, in
memory shared by worker processes, or in Redis for a fleet.  Instead of a decision,
`decide` then returns what it needs — `Charge` (spend a token), `CheckLogin` (is this
source or user locked out), `Verify` (a bcrypt check), `RecordFailure` (count a failed
login), `Resolve` (the destination's addresses) — and the caller performs it, records
the result in the ticket and calls `decide` again.  The ticket remembers what was done,
so asking again never counts twice.  `perform` does the limit steps on a store that
answers at once (`AdmissionState` in this process, or memory shared by workers); the
proxy (`eyewall.proxy.admission`) does them on whichever store holds its limits, and
``eyewall explain`` drives the same function with a ``trace`` list it prints.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field

from eyewall.errors import ErrorKind
from eyewall.policy.auth import Credentials
from eyewall.policy.engine import LimitParameters, Policy
from eyewall.policy.rules import Action, Request
from eyewall.policy.state import LimitsStore, SynchronousLimits

__all__ = [
    "Allow",
    "Charge",
    "CheckLogin",
    "RecordFailure",
    "Refusal",
    "Resolve",
    "Step",
    "Ticket",
    "Trace",
    "Verify",
    "decide",
    "perform",
]

Trace = list[tuple[str, str]]  # (step, what happened), for eyewall explain
Say = Callable[[tuple[str, str]], None]


@dataclass(slots=True)
class Ticket:
    """One request on its way through admission.

    The first fields are what the client asked for; ``scheme`` is "http", "https" or
    "connect".  The rest is filled in along the way, by the caller performing a step
    (``charges``, ``login_wait``, ``verified``, ``failure_recorded``, ``addresses`` or
    ``resolve_error``) or by `decide` (``user``, ``login_done``).
    """

    client: str
    method: str
    scheme: str
    host: str
    port: int
    credentials: Credentials | None = None
    charges: dict[str, float | None] = field(default_factory=dict)  # limit -> wait or None
    login_checked: bool = False
    login_wait: float | None = None  # seconds the source or user is locked out for
    verified: bool | None = None
    failure_recorded: bool = False
    addresses: tuple[str, ...] | None = None
    resolve_error: str = ""
    user: str | None = None
    login_done: bool = False


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
    empty); ``retry_after`` (seconds) goes with 429; ``login`` is "missing", "wrong",
    "throttled" or "revoked" (the user was removed while their tunnel was open) for
    authentication failures."""

    kind: ErrorKind
    rule: str
    message: str
    retry_after: float | None = None
    login: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Charge:
    """Spend one token of ``limit`` (``client_rps``, ``user_rps``) for ``key``, at
    ``rate`` per second with ``burst``; set ``ticket.charges[limit]`` to None (granted)
    or the seconds to wait."""

    limit: str
    key: str
    rate: float
    burst: float


@dataclass(frozen=True, slots=True)
class CheckLogin:
    """Look up whether ``client``'s source or ``user`` is locked out by failed logins;
    set ``ticket.login_wait`` (seconds, or None) and ``ticket.login_checked``."""

    client: str
    user: str


@dataclass(frozen=True, slots=True)
class Verify:
    """Check these credentials (bcrypt, slow: off the event loop) and set
    ``ticket.verified``."""

    credentials: Credentials


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """Count a failed login of ``user`` from ``client``; set
    ``ticket.failure_recorded``."""

    client: str
    user: str


@dataclass(frozen=True, slots=True)
class Resolve:
    """Resolve ``host`` and set ``ticket.addresses`` (or ``ticket.resolve_error``)."""

    host: str
    port: int


Step = Allow | Refusal | Charge | CheckLogin | Verify | RecordFailure | Resolve

_NOWHERE: frozenset[tuple[str, int]] = frozenset()


def decide(
    ticket: Ticket,
    policy: Policy,
    state: LimitsStore,
    now: float,
    own: Container[tuple[str, int]] = _NOWHERE,
    trace: Trace | None = None,
) -> Step:
    """The next step for ``ticket`` (see the module docstring).

    ``now`` is monotonic seconds; ``own`` holds the proxy's own listening (address,
    port) pairs (`eyewall.policy.networks.OwnListeners`).  Of ``state`` it uses the
    verified-login cache only (the limits are steps).  Mutates ``ticket``; raises
    nothing.
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
    if limits.client_rps:
        charged = _charge(t, "client_rps", t.client, limits.client_rps, limits.client_burst)
        if charged is not None:
            return charged
    if policy.auth_required and not t.login_done:
        refused = _login(t, policy, state, now, say)
        if refused is not None:
            return refused
    elif say and not policy.auth_required:
        say(("auth", "not required (no users configured)"))
    if limits.user_rps and t.user is not None:
        charged = _charge(t, "user_rps", t.user, limits.user_rps, limits.user_burst)
        if charged is not None:
            return charged
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


def _charge(t: Ticket, limit: str, key: str, rate: float, burst: float) -> Charge | Refusal | None:
    if limit not in t.charges:
        return Charge(limit, key, rate, LimitParameters.burst_of(rate, burst))
    wait = t.charges[limit]
    if wait is None:
        return None
    return Refusal(ErrorKind.RATE_LIMITED, limit, f"rate limit {limit} reached for {key}", wait)


def _login(
    t: Ticket, policy: Policy, state: LimitsStore, now: float, log: Say | None
) -> Refusal | CheckLogin | Verify | RecordFailure | None:
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
        if not t.login_checked:
            return CheckLogin(t.client, user)
        if t.login_wait is not None:
            t.login_done = True
            return Refusal(
                ErrorKind.RATE_LIMITED,
                "login-throttle",
                "too many failed logins; try again later",
                max(t.login_wait, 1.0),
                login="throttled",
                user=user,
            )
        return Verify(credentials)
    if not t.verified or stored is None:
        if not t.failure_recorded:
            return RecordFailure(t.client, user)
        t.login_done = True
        if log:
            log(("auth", f"required (Basic); credentials for {user!r} are not valid"))
        return Refusal(
            ErrorKind.AUTH_REQUIRED, "auth", "proxy authentication failed", login="wrong", user=user
        )
    t.login_done = True
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


def perform(step: Step, ticket: Ticket, state: SynchronousLimits, now: float) -> bool:
    """Do a limit step (`Charge`, `CheckLogin`, `RecordFailure`) on ``state``, a store
    that answers at once (this process's limits, or memory shared by workers), and
    record its result in ``ticket``; False for any other step (the caller's I/O)."""
    match step:
        case Charge(limit, key, rate, burst):
            ticket.charges[limit] = state.take(limit, key, now, rate, burst)
        case CheckLogin(client, user):
            ticket.login_wait = state.login_wait(client, user, now)
            ticket.login_checked = True
        case RecordFailure(client, user):
            state.login_failed(client, user, now)
            ticket.failure_recorded = True
        case _:
            return False
    return True
