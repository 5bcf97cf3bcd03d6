"""Admission of each request: authentication, rate limits and destination rules.

The decisions are the policy's (pure, in `eyewall.policy`); this module does the I/O
they need — the bcrypt check in a thread, the name resolution — and answers refusals:
407 with a challenge, 429 with Retry-After, 403 naming the rule.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

from eyewall.errors import ErrorKind, ProxyError
from eyewall.flow import Flow
from eyewall.http1.parse import RequestHead
from eyewall.http1.target import Target
from eyewall.policy.auth import Credentials, parse_basic
from eyewall.policy.engine import Policy
from eyewall.policy.rules import Action, Decision, Request

if TYPE_CHECKING:
    from eyewall.proxy.client import ClientConnection

__all__ = ["admit", "admit_now"]

log = logging.getLogger("eyewall.access")


def admit_now(
    conn: ClientConnection, head: RequestHead, target: Target, flow: Flow
) -> Decision | None:
    """The decision to let the request through when it needs no waiting (no
    authentication, no rate limit, addresses known); None sends the caller to `admit`."""
    proxy = conn.proxy
    policy = proxy.policy
    limits = policy.limits
    if policy.auth_required or limits.client_rps is not None or limits.user_rps is not None:
        return None
    scheme = "connect" if head.method == "CONNECT" else target.scheme
    req = Request(conn.address[0], head.method, scheme, target.host, target.port)
    decision = policy.decide(req, None)
    if decision.action is Action.RESOLVE:
        addrs = proxy.pool.resolver.known(target.host, target.port)
        if addrs is None:
            return None
        decision = policy.decide(req, tuple([a[1][0] for a in addrs]))
    if decision.action is Action.DENY:
        return None
    flow.rule = decision.rule
    proxy.bus.emit("decision", flow)
    return decision


async def admit(
    conn: ClientConnection, head: RequestHead, target: Target, flow: Flow, close: bool
) -> Decision | None:
    """The policy's decision to let the request through, or None once a refusal was
    sent.  ``close`` says the connection cannot carry another request afterwards."""
    proxy = conn.proxy
    policy = proxy.policy
    client = conn.address[0]
    loop = conn.loop
    user = None
    if policy.auth_required:
        credentials = parse_basic(head.headers.get("proxy-authorization"))
        ok = False
        if credentials is not None:
            now = loop.time()
            ok = policy.credentials_cached(credentials, now)
            if not ok:
                ok = await _verify(policy, credentials)
                if ok:
                    policy.users.remember(credentials, now)
        if not ok:
            await _challenge(conn, flow, credentials.user if credentials else None, close)
            return None
        assert credentials is not None
        user = flow.user = credentials.user
        policy.failures.clear(client)
    limited = policy.request_rate(client, user, loop.time())
    if limited is not None:
        retry = str(max(1, math.ceil(limited.retry_after)))
        await conn.answer_error(
            flow, ErrorKind.RATE_LIMITED, limited.describe(), close, (("Retry-After", retry),)
        )
        return None
    scheme = "connect" if head.method == "CONNECT" else target.scheme
    req = Request(client, head.method, scheme, target.host, target.port, user,
                  policy.groups(user))  # fmt: skip
    decision = policy.decide(req, None)
    if decision.action is Action.RESOLVE:
        try:
            async with asyncio.timeout(proxy.settings.timeouts.upstream_connect):
                addrs = await proxy.pool.resolver.resolve(target.host, target.port)
        except TimeoutError:
            detail = f"resolving {target.host} took too long"
            await conn.answer_error(flow, ErrorKind.CONNECT_TIMEOUT, detail, close)
            return None
        except ProxyError as e:
            await conn.answer_error(flow, e.kind, e.detail, close)
            return None
        decision = policy.decide(req, tuple(ip for _, (ip, *_) in addrs))
    flow.rule = decision.rule
    proxy.bus.emit("decision", flow)
    if decision.action is Action.DENY:
        detail = f"denied by rule {decision.rule}"
        if decision.message:
            detail += f": {decision.message}"
        await conn.answer_error(flow, ErrorKind.DENIED, detail, close)
        return None
    return decision


async def _verify(policy: Policy, credentials: Credentials) -> bool:
    """The bcrypt check, in the policy's own small thread pool; concurrent requests
    with the same credentials share one check."""
    key = credentials.fingerprint()
    pending = policy.verifying.get(key)
    if pending is None:
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(policy.verifier, policy.users.verify, credentials)
        policy.verifying[key] = pending
        pending.add_done_callback(lambda _: policy.verifying.pop(key, None))
    return bool(await asyncio.shield(pending))


async def _challenge(conn: ClientConnection, flow: Flow, user: str | None, close: bool) -> None:
    """Answer 407; failed attempts are logged (fail2ban-friendly) and slowed down."""
    policy = conn.proxy.policy
    client = conn.address[0]
    detail = "proxy authentication required"
    if user is not None:
        failures = policy.failures.record(client, conn.loop.time())
        log.warning(
            "authentication failed for user %r from %s (%d in the last minute)",
            user, client, failures,
        )  # fmt: skip
        detail = "proxy authentication failed"
        flow.user = user
        delay = policy.failures.delay(failures)
        if delay:
            await asyncio.sleep(delay)
    realm = conn.proxy.settings.auth.realm.replace('"', "'")
    challenge = ("Proxy-Authenticate", f'Basic realm="{realm}", charset="UTF-8"')
    await conn.answer_error(flow, ErrorKind.AUTH_REQUIRED, detail, close, (challenge,))
