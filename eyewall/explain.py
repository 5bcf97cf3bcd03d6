"""``eyewall explain``: what the configured policy decides for a request, and why.

Nothing is sent: the command resolves the name (as the proxy would) and walks the same
checks the proxy makes — client network, authentication, rate limits, rules in order,
guards — printing each step.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from eyewall.config import ConfigError, Settings
from eyewall.http1.target import TargetError, parse_authority, parse_target
from eyewall.policy.engine import Policy
from eyewall.policy.networks import protected_range
from eyewall.policy.rules import Action, Request

__all__ = ["explain_command", "render_explanation"]


def _resolve(host: str, port: int) -> tuple[tuple[str, ...] | None, str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return None, f"{host} does not resolve: {getattr(e, 'strerror', e)}"
    addresses = tuple(dict.fromkeys(str(i[4][0]) for i in infos))
    return addresses, f"{host} resolves to {', '.join(addresses)}"


def render_explanation(
    settings: Settings, policy: Policy, target_text: str, method: str, client: str,
    user: str | None,
) -> tuple[str, bool]:  # fmt: skip
    """The report, and whether the request would be let through."""
    lines: list[str] = []

    def say(label: str, text: str) -> None:
        lines.append(f"{label:<10}{text}")

    connect = "://" not in target_text
    method = "CONNECT" if connect else method.upper()
    try:
        target = (
            parse_authority(target_text, require_port=True)
            if connect
            else parse_target(method, target_text)
        )
    except TargetError as e:
        return f"target    invalid: {e}\ndecision  400 Bad Request", False
    scheme = "connect" if connect else target.scheme
    who = f" as user {user}" if user else ""
    say("request", f"{method} {target.url()} from {client}{who}")
    if not policy.client_allowed(client):
        say("client", f"{client} is not in access.allow_clients")
        say("decision", "403 Forbidden (client address not allowed)")
        return "\n".join(lines), False
    nets = ", ".join(str(n) for n in policy.clients)
    say("client", f"{client} allowed ({nets})")
    if policy.auth_required:
        if user is None:
            say("auth", "required (Basic); no --user given")
            say("decision", "407 Proxy Authentication Required")
            return "\n".join(lines), False
        known = "a known user" if user in policy.users.hashes else "NOT a known user"
        groups = ", ".join(sorted(policy.groups(user))) or "none"
        say("auth", f"required (Basic); {user} is {known}; groups: {groups}")
        if user not in policy.users.hashes:
            say("decision", "407 Proxy Authentication Required")
            return "\n".join(lines), False
    else:
        say("auth", "not required (no users configured)")
    r = settings.rate_limits
    configured = {
        "client_rps": r.client_rps,
        "user_rps": r.user_rps,
        "client_connections": r.client_connections,
        "client_tunnels": r.client_tunnels,
        "user_tunnels": r.user_tunnels,
    }
    limits = [f"{name} {value:g}" for name, value in configured.items() if value]
    say("limits", ", ".join(limits) if limits else "none configured")
    for endpoint in settings.listen:
        if endpoint.port == target.port and endpoint.host in (target.host, "0.0.0.0", "::"):
            say("decision", f"403 Forbidden: aimed at the proxy's own listener {endpoint}")
            return "\n".join(lines), False
    req = Request(client, method, scheme, target.host, target.port, user, policy.groups(user))
    decision = policy.explain(req, None)
    addresses = None
    if decision.action is Action.RESOLVE:
        addresses, text = _resolve(target.host, target.port)
        say("resolve", text)
        if addresses is None:
            say("decision", "502 Bad Gateway (name does not resolve)")
            return "\n".join(lines), False
        for address in addresses:
            say("", f"{address}: {protected_range(address) or 'public'}")
        decision = policy.explain(req, addresses)
    for step in decision.trace:
        say("rules" if step.startswith(("rule ", "no rule")) else "guards", step)
    if decision.action is Action.DENY:
        message = f": {decision.message}" if decision.message else ""
        say("decision", f"403 Forbidden by {decision.rule}{message}")
        return "\n".join(lines), False
    where = ", ".join(decision.addresses) if decision.addresses else "what the name resolves to"
    say("decision", f"{decision.action.value.upper()} by {decision.rule}; connect to {where}")
    return "\n".join(lines), True


def explain_command(argv: Sequence[str]) -> int:
    from eyewall.cli import Loader, _overrides, add_setting_flags

    parser = argparse.ArgumentParser(
        prog="eyewall explain",
        description="Show what the policy decides for a request, and why; sends nothing.",
    )
    parser.add_argument("target", help="a URL (http://host/path) or HOST:PORT for CONNECT")
    parser.add_argument("--method", default="GET", help="request method (default GET)")
    parser.add_argument("--client", default="127.0.0.1", help="client address")
    parser.add_argument("--user", help="authenticated user name")
    add_setting_flags(parser)
    args = parser.parse_args(argv)
    try:
        settings, policy = Loader(args.config, _overrides(args, parser)).load()
    except ConfigError as e:
        parser.exit(2, f"eyewall explain: invalid setting: {e}\n")
    text, allowed = render_explanation(
        settings, policy, args.target, args.method, args.client, args.user
    )
    print(text)
    sys.stdout.flush()
    return 0 if allowed else 3
