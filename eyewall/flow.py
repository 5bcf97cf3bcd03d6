"""Records of what passed through the proxy: one `Flow` per HTTP exchange or tunnel.

The data path fills a flow in as the exchange goes; subscribers (access log, and later
metrics and the flow store) receive it through the event bus.  Plain data, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eyewall.errors import ErrorKind
from eyewall.http1.parse import RequestHead, ResponseHead

__all__ = ["Flow"]


@dataclass(slots=True, eq=False)
class Flow:
    id: str
    kind: str  # "http", "tunnel" or "websocket"
    client: tuple[str, int]
    started: float  # wall-clock time (time.time()) of the request head
    method: str = ""
    url: str = ""
    host: str = ""
    port: int = 0
    request: RequestHead | None = None
    response: ResponseHead | None = None
    status: int = 0  # status sent to the client (0: none was sent)
    upstream: str = ""  # "ip:port" of the origin connection
    reused: bool = False  # upstream connection came from the pool
    bytes_in: int = 0  # body (or tunnel) bytes received from the client
    bytes_out: int = 0  # body (or tunnel) bytes sent to the client
    error: ErrorKind | None = None
    error_detail: str = ""
    # Monotonic seconds since the request head was read; None until reached.
    t_connected: float | None = None
    t_response: float | None = None
    duration: float = 0.0
    deferred: bool = False  # a tunnel took the flow over and reports its end
    user: str | None = None  # the authenticated user
    rule: str = ""  # id of the policy rule (or guard) that decided
    release: Callable[[], None] | None = None  # gives back what a tunnel held (limits)
    connect_time: float | None = None  # seconds to open a new upstream connection
    request_body: bytearray | None = None  # captured (up to flows.body_limit)
    response_body: bytearray | None = None
    intercepted: bool = False  # decrypted by TLS interception

    def fail(self, kind: ErrorKind, detail: str = "") -> None:
        """Record the first failure; later ones are consequences of it."""
        if self.error is None:
            self.error = kind
            self.error_detail = detail
