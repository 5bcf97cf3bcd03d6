"""``eyewall explain``: what the configured policy decides for a request, and why.

Nothing is sent.  The request goes through the proxy's own admission sequence
(`eyewall.policy.admission.decide`) with a fresh admission state and a trace, resolving
the name as the proxy would; this module only performs those resolutions and renders
the trace.  A test holds explain and the running proxy to the same decisions.
"""

from __future__ import annotations

import socket
import time
from http import HTTPStatus

from eyewall.config import Settings, parse_endpoint
from eyewall.errors import ErrorKind, status_of
from eyewall.http1.target import TargetError, parse_authority, parse_target
from eyewall.policy.admission import (
    Allow,
    Refusal,
    Resolve,
    Ticket,
    Trace,
    Verify,
    decide,
    perform,
)
from eyewall.policy.auth import Credentials
from eyewall.policy.engine import Policy
from eyewall.policy.networks import OwnListeners, protected_range
from eyewall.policy.state import AdmissionState
from eyewall.proxy.upstream import is_local_address

__all__ = ["own_listeners", "render_explanation"]


def _resolve(host: str, port: int) -> tuple[tuple[str, ...] | None, str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return None, f"cannot resolve {host}: {getattr(e, 'strerror', e)}"
    addresses = tuple(dict.fromkeys(str(i[4][0]) for i in infos))
    return addresses, f"{host} resolves to {', '.join(addresses)}"


def own_listeners(settings: Settings) -> OwnListeners:
    """The proxy's listening addresses as configured (explain does not bind them)."""
    endpoints = [(e.host, e.port) for e in (*settings.listen, *settings.tls.listen)]
    if settings.admin.listen != "off":
        admin = parse_endpoint(settings.admin.listen)
        endpoints.append((admin.host, admin.port))
    return OwnListeners(endpoints, is_local_address)


def render_explanation(
    settings: Settings,
    policy: Policy,
    target_text: str,
    method: str | None,
    client: str,
    user: str | None,
) -> tuple[str, bool]:
    """The report, and whether the request would be let through.  ``method`` None: the
    request a client sends for ``target_text`` — CONNECT for an authority or an
    ``https://`` URL (its authority, port 443 by default), GET for an ``http://`` one."""
    lines: list[str] = []

    def say(label: str, text: str) -> None:
        lines.append(f"{label:<10}{text}")

    connect = "://" not in target_text
    note = ""
    if method is None and target_text[:8].lower() == "https://":
        # What a client sends for an https:// URL: a CONNECT to its authority.
        try:
            target_text = parse_target("GET", target_text).authority
        except TargetError as e:
            return f"target    invalid: {e}\ndecision  400 Bad Request", False
        if ":" not in target_text.rpartition("]")[2]:
            target_text += ":443"
        connect = True
        note = (
            "a client sends CONNECT for an https:// URL; the request inside is admitted"
            " too when the tunnel is intercepted (--method GET explains it)"
        )
    method = "CONNECT" if connect else method or "GET"
    try:
        target = (
            parse_authority(target_text, require_port=True)
            if connect
            else parse_target(method, target_text)
        )
    except TargetError as e:
        return f"target    invalid: {e}\ndecision  400 Bad Request", False
    who = f" as user {user}" if user else ""
    say("request", f"{method} {target.url()} from {client}{who}")
    if note:
        say("note", note)
    ticket = Ticket(
        client,
        method,
        "connect" if connect else target.scheme,
        target.host,
        target.port,
        Credentials(user, "") if user else None,
    )
    trace: Trace = []
    state = AdmissionState()
    own = own_listeners(settings)
    shown = 0
    while True:
        # Each call decides from the start, tracing every step again: show what is new.
        trace.clear()
        now = time.monotonic()
        step = decide(ticket, policy, state, now, own, trace)
        if perform(step, ticket, state, now):
            continue
        for label, text in trace[shown:]:
            say(label, text)
        shown = len(trace)
        match step:
            case Verify(credentials):
                known = credentials.user in policy.users.hashes
                ticket.verified = known
                say(
                    "auth",
                    f"{credentials.user} is a known user (explain assumes the right password)"
                    if known
                    else f"{credentials.user} is not a known user",
                )
            case Resolve(host, port):
                addresses, text = _resolve(host, port)
                say("resolve", text)
                if addresses is None:
                    ticket.resolve_error = text
                else:
                    ticket.addresses = addresses
                    for address in addresses:
                        say("", f"{address}: {protected_range(address) or 'public'}")
            case Refusal(kind, rule, message):
                status = status_of(kind)
                by = f" by {rule}" if rule else ""
                said = f": {message}" if message else ""
                say("decision", f"{status} {_reason(kind)}{by}{said}")
                if rule == "private-destination":
                    say(
                        "",
                        "to allow private destinations: access.allow_private, or a rule"
                        " with private = true or networks naming them",
                    )
                return "\n".join(lines), False
            case Allow(action, rule, addresses):
                where = ", ".join(addresses)
                say("decision", f"{action.value.upper()} by {rule}; connect to {where}")
                return "\n".join(lines), True


def _reason(kind: ErrorKind) -> str:
    return HTTPStatus(status_of(kind)).phrase
