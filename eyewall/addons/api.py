"""What addons see: `HTTPFlow` with its `Request` and `Response`, views over the proxy's
own records that addons change in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from eyewall.flow import Flow
from eyewall.http1.parse import Headers, RequestHead, ResponseHead, check_field
from eyewall.http1.target import Target

_PHRASED = frozenset(s.value for s in HTTPStatus)  # codes with a standard reason phrase

__all__ = ["Client", "HTTPFlow", "Request", "Response", "final_status"]


@dataclass(frozen=True)
class Client:
    """The client side of a flow: ``address`` is its (IP, port) as the proxy saw it."""

    address: tuple[str, int]


class Request:
    """The request as the origin will receive it (hop-by-hop fields are managed by the
    proxy and re-derived after the hooks)."""

    def __init__(self, head: RequestHead, target: Target) -> None:
        self._head = head
        self._target = target
        self.body: bytes | None = None
        self.truncated = False
        self.buffer_limit = 0

    version = property(lambda self: self._head.version)
    headers: Headers = property(lambda self: self._head.headers)  # type: ignore[assignment]
    host = property(lambda self: self._target.host)
    port = property(lambda self: self._target.port)

    @property
    def method(self) -> str:
        """The request method (RFC 9110 §9), e.g. ``GET``; settable to another token."""
        return self._head.method

    @method.setter
    def method(self, value: str) -> None:
        check_field(value, "")  # a method is a token, like a field name
        self._head.method = value

    @property
    def path(self) -> str:
        """The path and query of the request-target, e.g. ``/a?b=1``; settable (must start with
        ``/``, no controls or spaces)."""
        return self._target.path

    @path.setter
    def path(self, value: str) -> None:
        if not value.startswith("/") or any(c <= " " or c == "\x7f" for c in value):
            raise ValueError(f"invalid path {value!r}")
        t = self._target
        self._target = Target(t.scheme, t.host, t.port, t.authority, value)

    @property
    def url(self) -> str:
        """The absolute URL the request goes to (scheme, authority, path and query)."""
        return self._target.url()

    @property
    def target(self) -> Target:
        """The parsed request-target (`eyewall.http1.fields.Target`); read-only."""
        return self._target

    def buffer(self, max_bytes: int) -> None:
        """Ask for the whole body (up to ``max_bytes``) in the ``request`` hook."""
        self.buffer_limit = max(0, int(max_bytes))


class Response:
    """The response as the client will receive it; hooks may change status, reason, fields and
    (when buffered) the body."""

    def __init__(self, head: ResponseHead) -> None:
        self._head = head
        self.body: bytes | None = None
        self.truncated = False
        self.buffer_limit = 0

    headers: Headers = property(lambda self: self._head.headers)  # type: ignore[assignment]
    version = property(lambda self: self._head.version)

    @property
    def status(self) -> int:
        """The status code (RFC 9110 §15); settable to a final status, 200..599, else
        ValueError (see `final_status`).  Setting a different status sets the reason
        phrase to that status's own ("" for a code without one): set `reason` after it
        for another."""
        return self._head.status

    @status.setter
    def status(self, value: int) -> None:
        status = final_status(value)
        if status != self._head.status:
            self._head.reason = HTTPStatus(status).phrase if status in _PHRASED else ""
        self._head.status = status

    @property
    def reason(self) -> str:
        """The reason phrase; settable (no CR or LF, else ValueError)."""
        return self._head.reason

    @reason.setter
    def reason(self, value: str) -> None:
        if "\r" in value or "\n" in value:
            raise ValueError("invalid reason phrase")
        self._head.reason = value

    def buffer(self, max_bytes: int) -> None:
        """Ask for the whole body (up to ``max_bytes``) in the ``response`` hook."""
        self.buffer_limit = max(0, int(max_bytes))


def final_status(value: int) -> int:
    """``value`` as a status an addon may give a response: 200..599.  A 1xx is an
    interim response, which cannot end an exchange (RFC 9110 §15.2; a 101 needs an
    upgrade the proxy makes itself): ValueError, as for anything outside 100..599."""
    status = int(value)
    if 100 <= status <= 199:
        raise ValueError(
            f"status {status} is interim (1xx) and cannot be a final response (RFC 9110 §15.2)"
        )
    if not 200 <= status <= 599:
        raise ValueError(f"invalid status {value!r}")
    return status


@dataclass
class Answer:
    """A response an addon gives instead of the origin's: status, field lines (name, value) and
    a whole body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(eq=False)
class HTTPFlow:
    """What hooks see of one exchange: the ``request``, the ``response`` once there is one, a
    ``metadata`` dict for the addon's own use, and the recorded ``record``."""

    record: Flow
    request: Request | None = None
    response: Response | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    answer: Answer | None = None
    killed: bool = False

    id = property(lambda self: self.record.id)
    kind = property(lambda self: self.record.kind)
    client = property(lambda self: self.record.client)
    user = property(lambda self: self.record.user)
    intercepted = property(lambda self: self.record.intercepted)
    bytes_in = property(lambda self: self.record.bytes_in)
    bytes_out = property(lambda self: self.record.bytes_out)

    @property
    def error(self) -> str | None:
        """The error kind (RFC 9209 names, e.g. ``connection_refused``), or None."""
        return self.record.error.value if self.record.error is not None else None

    @property
    def error_detail(self) -> str:
        """A short human-readable account of the error; empty without one."""
        return self.record.error_detail

    def respond(self, status: int, headers: Any = (), body: bytes | str = b"") -> None:
        """Answer with this response instead of the origin's (or replace the origin's).
        ``status`` must be final, 200..599 (ValueError otherwise, see `final_status`)."""
        status = final_status(status)
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
        for name, value in pairs:
            check_field(name, value)
        data = body.encode() if isinstance(body, str) else bytes(body)
        self.answer = Answer(int(status), pairs, data)

    def kill(self) -> None:
        """Close the client connection without an answer."""
        self.killed = True
