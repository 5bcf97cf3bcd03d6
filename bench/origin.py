"""Raw TCP origins for the Eyewall benchmarks (loopback only).

Run as a script; it binds four listeners on 127.0.0.1 (ephemeral ports),
prints their ports as one JSON line on stdout and serves until killed:

* ``bulk``       - blocking sockets, one thread per connection. The client
                   sends one command line: ``SEND <n>\\n`` makes the origin
                   send n bytes as fast as it can; ``RECV <n>\\n`` makes it
                   read n bytes and then answer ``OK\\n``.
* ``http_sink``  - minimal HTTP/1.1 server (threads) for the upload scenario:
                   reads the whole ``Content-Length`` body *before* it answers
                   ``200 ok``, so the upload time covers the full body.
* ``echo``       - asyncio; echoes everything, keeps the connection open.
* ``echo_close`` - asyncio; echoes the first chunk, then closes (the origin
                   is the active closer, so no TIME_WAIT piles up client-side).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import sys
import threading

BUFFER_SIZE = 1 << 20
ZEROS = memoryview(bytes(BUFFER_SIZE))
LISTEN_BACKLOG = 4096


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(LISTEN_BACKLOG)
    return sock


def read_line(conn: socket.socket, limit: int = 65536) -> tuple[bytes, bytes]:
    """Read until the first b"\\n"; return (line, bytes received after it)."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > limit:
            raise ConnectionError("connection closed before end of line")
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line, rest


def receive_exactly(conn: socket.socket, remaining: int) -> None:
    """Read and discard `remaining` bytes using one reusable buffer."""
    buffer = memoryview(bytearray(BUFFER_SIZE))
    while remaining > 0:
        received = conn.recv_into(buffer, min(remaining, BUFFER_SIZE))
        if received == 0:
            raise ConnectionError(f"peer closed with {remaining} bytes missing")
        remaining -= received


def send_zeros(conn: socket.socket, count: int) -> None:
    while count > 0:
        size = min(count, BUFFER_SIZE)
        conn.sendall(ZEROS[:size])
        count -= size


def wait_for_peer_close(conn: socket.socket) -> None:
    conn.settimeout(30)
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def handle_bulk(conn: socket.socket) -> None:
    with conn:
        line, rest = read_line(conn)
        command, _, size_text = line.decode("ascii").partition(" ")
        size = int(size_text)
        if command == "SEND":
            send_zeros(conn, size)
            conn.shutdown(socket.SHUT_WR)
        elif command == "RECV":
            receive_exactly(conn, size - len(rest))
            conn.sendall(b"OK\n")
        else:
            conn.sendall(b"ERR unknown command\n")
        wait_for_peer_close(conn)


def handle_http_sink(conn: socket.socket) -> None:
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        header_block, _, body_start = head.partition(b"\r\n\r\n")
        headers = {}
        for raw in header_block.split(b"\r\n")[1:]:
            name, _, value = raw.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        if headers.get(b"expect", b"").lower() == b"100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        receive_exactly(conn, length - len(body_start))
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
        )
        conn.shutdown(socket.SHUT_WR)
        wait_for_peer_close(conn)


def serve_threaded(listener: socket.socket, handler) -> None:
    def guarded(conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            handler(conn)

    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=guarded, args=(conn,), daemon=True).start()


class EchoProtocol(asyncio.Protocol):
    close_after_first_echo = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]
        if self.close_after_first_echo:
            self.transport.close()


class EchoOnceProtocol(EchoProtocol):
    close_after_first_echo = True


async def serve_forever(ports: dict[str, int], threaded: dict) -> None:
    loop = asyncio.get_running_loop()
    echo_sock, echo_close_sock = listening_socket(), listening_socket()
    await loop.create_server(EchoProtocol, sock=echo_sock, backlog=LISTEN_BACKLOG)
    await loop.create_server(EchoOnceProtocol, sock=echo_close_sock, backlog=LISTEN_BACKLOG)
    ports["echo"] = echo_sock.getsockname()[1]
    ports["echo_close"] = echo_close_sock.getsockname()[1]
    for name, (listener, handler) in threaded.items():
        threading.Thread(target=serve_threaded, args=(listener, handler), daemon=True).start()
        ports[name] = listener.getsockname()[1]
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


def main() -> None:
    raise_fd_limit()
    threaded = {
        "bulk": (listening_socket(), handle_bulk),
        "http_sink": (listening_socket(), handle_http_sink),
    }
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever({}, threaded))


if __name__ == "__main__":
    main()
