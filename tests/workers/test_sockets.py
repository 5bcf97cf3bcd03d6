"""Why workers and restarts share listening sockets instead of opening their own with
SO_REUSEPORT: the kernel's behaviour the design rests on, checked on this kernel.

With SO_REUSEPORT every socket has its own accept queue; closing one resets the
connections queued on it (unless net.ipv4.tcp_migrate_req is on, Linux 5.14+).  With
one socket held by several processes (inherited descriptors) there is one queue, and
closing a copy loses nothing: whoever still holds it accepts them.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

CLIENTS = 32  # a connection lands on the closed socket with probability 1 - 2^-32


def connect_all(port: int) -> list[socket.socket]:
    """Connections completed by the kernel (queued), none accepted yet."""
    clients = []
    for _ in range(CLIENTS):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"ping")
        clients.append(c)
    return clients


def reset(client: socket.socket) -> bool:
    """Whether the kernel reset ``client``'s connection (without waiting)."""
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def resets(clients: list[socket.socket], expected: int) -> int:
    """How many of ``clients`` were reset, once ``expected`` are (or at a deadline)."""
    deadline = time.monotonic() + 10
    while True:
        count = sum(reset(c) for c in clients)
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.01)


def migrate_requests() -> bool:
    path = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    return path.exists() and path.read_text().strip() == "1"


def test_closing_one_of_two_reuseport_sockets_resets_its_queued_connections() -> None:
    if migrate_requests():
        pytest.skip("net.ipv4.tcp_migrate_req = 1 moves queued connections on this host")
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen(128)
    second = socket.socket()
    second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    second.bind(first.getsockname())
    second.listen(128)
    clients = connect_all(first.getsockname()[1])
    second.close()  # the old generation stops listening
    first.setblocking(False)
    accepted = []
    while True:
        try:
            accepted.append(first.accept()[0])
        except BlockingIOError:
            break
    assert 0 < len(accepted) < CLIENTS  # the ones queued on the closed socket are gone
    assert resets(clients, CLIENTS - len(accepted)) == CLIENTS - len(accepted)
    for s in [first, *clients, *accepted]:
        s.close()


def test_closing_one_copy_of_a_shared_socket_loses_nothing() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    inherited = socket.socket(fileno=os.dup(listener.fileno()))  # the successor's copy
    clients = connect_all(listener.getsockname()[1])
    listener.close()  # the old generation stops listening
    inherited.setblocking(False)
    accepted = []
    while True:
        try:
            accepted.append(inherited.accept()[0])
        except BlockingIOError:
            break
    assert len(accepted) == CLIENTS
    assert resets(clients, 0) == 0
    for conn in accepted:
        conn.setblocking(True)
        assert conn.recv(4) == b"ping"
    for s in [inherited, *clients, *accepted]:
        s.close()
