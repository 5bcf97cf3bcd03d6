"""What the request lifecycle needs from the proxy around it: `ProxyContext`.

`eyewall.proxy.server.Proxy` implements it; the client loop, the exchange, admission
and interception depend on this protocol only — never on `Proxy` or on each other's
classes — so each can be tested in-process with a small fake context and an injected
clock.  Everything here is read at use: a reload replaces ``settings`` and ``policy``,
and the next request sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from eyewall.config import Settings
from eyewall.flow import Flow
from eyewall.policy.engine import Policy
from eyewall.policy.networks import OwnListeners
from eyewall.policy.state import LimitsStore

if TYPE_CHECKING:
    from eyewall.addons.runner import Addons
    from eyewall.proxy.intercept import Interception
    from eyewall.proxy.timeouts import Watchdog
    from eyewall.proxy.tunnel import PipePool, Relay
    from eyewall.proxy.upstream import UpstreamPool
    from eyewall.proxy.verifier import Verifier

__all__ = ["ProxyContext"]


class ProxyContext(Protocol):
    """The proxy as the request lifecycle sees it."""

    settings: Settings  # in force now
    policy: Policy  # in force now
    state: LimitsStore  # the limits, kept across reloads
    own: OwnListeners  # this proxy's own listening addresses (loop guard)
    pool: UpstreamPool
    pipes: PipePool
    addons: Addons
    watchdog: Watchdog
    verifier: Verifier
    interception: Interception

    @property
    def draining(self) -> bool:
        """Shutting down: finish the current exchange, keep nothing alive."""

    def clock(self) -> float:
        """Monotonic seconds (the event loop's time; tests inject their own)."""

    def new_flow(self, client: tuple[str, int]) -> Flow:
        """A record for one exchange or tunnel, with a fresh request id."""

    def end_flow(self, flow: Flow) -> None:
        """The exchange is over: compute its duration and hand it to the observers."""

    def open_tunnel(self, relay: Relay, flow: Flow, release: Callable[[], None]) -> None:
        """Track ``relay`` until it closes; then call ``release`` (limits it held) and
        end ``flow``.  The relay is started here."""

    def connection_closed(self, conn: object) -> None:
        """A client connection ended."""
