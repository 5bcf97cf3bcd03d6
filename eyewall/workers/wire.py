"""What the supervisor and its workers say to each other: frames, and finished flows
as compact records.  Pure functions; no event loop.

A frame is a 4-byte big-endian length, a 1-byte kind and a payload of that length
minus one.  Control messages (both ways) are pickled: the channel is a socket pair
between a supervisor and the workers it started, running the same installed code.
Flows go as `marshal`-ed lists of tuples (`pack`), a fraction of the cost of pickling
`Flow` objects, and the supervisor rebuilds `Flow` objects from them (`unpack`) for its
observers, which are the same as a single process's.

Supervisor to worker: ``INIT`` (`WorkerInit`), ``RELOAD`` (`Snapshot`), ``STOP``
(grace seconds), ``STOP_NOW``.  Worker to supervisor: ``READY`` (pid, version),
``FLOWS``, ``STATS`` (gauges and drop counters), ``RELOADED`` (None or the error).
"""

from __future__ import annotations

import marshal
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

from eyewall.config import Settings
from eyewall.errors import ErrorKind
from eyewall.flow import Flow
from eyewall.http1.parse import Headers, RequestHead, ResponseHead

__all__ = [
    "EXIT_INVALID_CONFIG",
    "FLOWS",
    "INIT",
    "READY",
    "RELOAD",
    "RELOADED",
    "STATS",
    "STOP",
    "STOP_NOW",
    "Snapshot",
    "WorkerInit",
    "decode",
    "encode",
    "frame",
    "pack",
    "read_frame",
    "unpack",
]

HEAD = struct.Struct(">IB")
MAX_FRAME = 256 << 20  # a sanity bound on a frame's length, not a buffer size

INIT, RELOAD, STOP, STOP_NOW = 1, 2, 3, 4  # supervisor -> worker
READY, FLOWS, STATS, RELOADED = 11, 12, 13, 14  # worker -> supervisor
# A worker's exit status when its addons do not load: the configuration is invalid,
# and the supervisor exits with it (2: not retried by a service manager).
EXIT_INVALID_CONFIG = 2


@dataclass(frozen=True)
class Snapshot:
    """A configuration validated once, by the supervisor, and applied as such by every
    worker: the settings, the htpasswd text that was checked (None without one) and the
    interception CA as PEM (key, certificate), or None."""

    settings: Settings
    htpasswd: str | None
    ca: tuple[bytes, bytes] | None


@dataclass(frozen=True)
class WorkerInit:
    """What a worker is told at start.  ``listeners`` maps (setting, endpoint text) to
    the inherited descriptors bound for it; ``protected`` are the admin listener's
    addresses (requests aimed at them are loops); ``slot`` is the worker's slot in the
    shared limits segment ``limits_fd``."""

    worker: int
    slot: int
    limits_fd: int
    listeners: tuple[tuple[str, str, tuple[int, ...]], ...]
    protected: tuple[tuple[str, int], ...]
    snapshot: Snapshot
    version: str


def frame(kind: int, payload: bytes) -> bytes:
    """A frame of ``kind`` around ``payload``."""
    return HEAD.pack(len(payload) + 1, kind) + payload


def encode(kind: int, message: Any) -> bytes:
    """A control frame (pickled)."""
    return frame(kind, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def decode(payload: bytes) -> Any:
    """The message of a control frame's payload (`encode`'s inverse)."""
    return pickle.loads(payload)


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One frame from a blocking socket; raises EOFError when it closes first."""
    head = _read_exactly(sock, HEAD.size)
    length, kind = HEAD.unpack(head)
    if not 1 <= length <= MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    return kind, _read_exactly(sock, length - 1)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("channel closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# -- flows ------------------------------------------------------------------------------


def pack(flows: list[Flow]) -> bytes:
    """Finished flows as one ``FLOWS`` frame."""
    return frame(FLOWS, marshal.dumps([_record(f) for f in flows]))


def _record(f: Flow) -> tuple[Any, ...]:
    request, response = f.request, f.response
    return (
        f.id,
        f.kind,
        f.client[0],
        f.client[1],
        f.started,
        f.method,
        f.url,
        f.host,
        f.port,
        f.status,
        f.upstream,
        f.reused,
        f.bytes_in,
        f.bytes_out,
        f.error.value if f.error is not None else None,
        f.error_detail,
        f.cause,
        f.t_connected,
        f.t_response,
        f.duration,
        f.user,
        f.rule,
        f.connect_time,
        bytes(f.request_body) if f.request_body is not None else None,
        bytes(f.response_body) if f.response_body is not None else None,
        f.intercepted,
        f.head_bytes,
        None
        if request is None
        else (request.method, request.target, request.version, request.headers.fields),
        None
        if response is None
        else (
            response.version,
            response.status,
            response.reason,
            response.headers.fields,
            response.repairs,
        ),
    )


def unpack(payload: bytes, worker: int) -> list[Flow]:
    """The flows of a ``FLOWS`` payload, marked as served by ``worker``.  Raises
    ValueError (or EOFError, TypeError) for a payload that is not one."""
    flows = []
    for r in marshal.loads(payload):
        flow = Flow(r[0], r[1], (r[2], r[3]), r[4])
        (
            flow.method,
            flow.url,
            flow.host,
            flow.port,
            flow.status,
            flow.upstream,
            flow.reused,
            flow.bytes_in,
            flow.bytes_out,
        ) = r[5:14]
        flow.error = ErrorKind(r[14]) if r[14] is not None else None
        (
            flow.error_detail,
            flow.cause,
            flow.t_connected,
            flow.t_response,
            flow.duration,
            flow.user,
            flow.rule,
            flow.connect_time,
        ) = r[15:23]
        flow.request_body = bytearray(r[23]) if r[23] is not None else None
        flow.response_body = bytearray(r[24]) if r[24] is not None else None
        flow.intercepted, flow.head_bytes = r[25], r[26]
        if r[27] is not None:
            method, target, version, fields = r[27]
            flow.request = RequestHead(method, target, version, Headers(fields))
        if r[28] is not None:
            version, status, reason, fields, repairs = r[28]
            flow.response = ResponseHead(version, status, reason, Headers(fields), repairs)
        flow.worker = worker
        flows.append(flow)
    return flows
