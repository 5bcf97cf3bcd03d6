"""The record of what passed through the proxy: one `Flow` per HTTP exchange or tunnel.

The data path fills a flow in as the exchange goes; when it ends, the flow is handed to
the observers (access log, metrics, flow store, live feed).  Plain data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from eyewall.errors import ErrorKind
from eyewall.http1.parse import RequestHead, ResponseHead

__all__ = ["Flow"]


@dataclass(slots=True, eq=False)
class Flow:
    """One HTTP exchange or tunnel.  Times are seconds: ``started`` is wall-clock
    (``time.time()``) at the request head; ``t_connected`` and ``t_response`` are
    monotonic offsets from it (None until reached); byte counts are body (or tunnel)
    bytes."""

    id: str
    kind: str  # "http", "tunnel" or "websocket"
    client: tuple[str, int]
    started: float
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
    bytes_out: int = 0  # body (or tunnel) bytes sent to the client, proxy pages included
    error: ErrorKind | None = None
    error_detail: str = ""
    cause: str = ""  # within the error kind: the limit that fired, why a login failed...
    t_connected: float | None = None
    t_response: float | None = None
    duration: float = 0.0
    user: str | None = None  # the authenticated user
    rule: str = ""  # id of the policy rule (or guard) that decided
    connect_time: float | None = None  # seconds to open a new upstream connection
    request_body: bytearray | None = None  # captured (up to flows.body_limit)
    response_body: bytearray | None = None
    intercepted: bool = False  # decrypted by TLS interception
    t_start: float = 0.0  # monotonic time of the request head (for the duration)
    head_bytes: int = 0  # request and response heads as received (memory accounting)
    worker: int = 0  # the worker process that served it, 1..N (0: a single process)

    def fail(self, kind: ErrorKind, detail: str = "") -> None:
        """Record the first failure; later ones are consequences of it."""
        if self.error is None:
            self.error = kind
            self.error_detail = detail
