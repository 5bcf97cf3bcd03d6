"""Service manager notifications (systemd's ``sd_notify`` protocol): readiness, reloads
and stopping, sent as one datagram to the socket named by ``$NOTIFY_SOCKET``.

Follows systemd's sd_notify(3) and the "Notify socket" section of systemd.exec(5):
a path, or ``@name`` for the abstract namespace.  Without ``$NOTIFY_SOCKET`` (not run
by systemd with ``Type=notify``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify"]


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``, ``STOPPING=1``); True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
