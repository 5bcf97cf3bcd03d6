"""Tell a service manager how start-up, reloads and shutdown are going (sd_notify).

When systemd starts a ``Type=notify`` service it sets ``$NOTIFY_SOCKET`` and waits for
``READY=1`` before it considers the service started (and starts the units ordered after
it).  The protocol, as sd_notify(3) describes it in its Notes section
(https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html), is one datagram
per message, sent to the ``AF_UNIX`` socket named by the variable; a name starting with
``@`` is in Linux's abstract namespace (the ``@`` stands for a leading NUL byte).  The
payload is newline-separated ``VARIABLE=value`` assignments:

    READY=1                          listeners are up
    RELOADING=1 + MONOTONIC_USEC=N   a reload began at CLOCK_MONOTONIC N microseconds;
                                     READY=1 again when it is over
    STOPPING=1                       shutdown began
    STATUS=text                      a line for ``systemctl status``

Without ``$NOTIFY_SOCKET`` (not started by systemd, or not as ``Type=notify``) every call
is a no-op.  Failures are reported by the return value, never raised: a proxy keeps
serving whether or not its manager hears about it.  Standard library only; no libsystemd.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["notify", "reloading"]


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms are not supported


def notify(state: str) -> bool:
    """Send ``state`` to ``$NOTIFY_SOCKET``; True when a datagram was sent."""
    value = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(value) if value else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def reloading() -> str:
    """The message that starts a reload: ``RELOADING=1`` with the monotonic clock, as
    ``Type=notify-reload`` (systemd 253 and newer) requires; older versions ignore the
    timestamp."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={usec}"
