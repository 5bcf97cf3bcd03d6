"""Origin servers for tests, each on 127.0.0.1 port 0 in its own thread.

`OriginServer` is a Tornado application with endpoints for the behaviours the proxy must
relay; `RawOrigin` runs a test's own function on each accepted socket, for responses no
well-behaved server would send.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

BLOCK = bytes(range(256)) * 256  # 64 KiB of a recognisable pattern


def pattern(n: int) -> bytes:
    """The first ``n`` bytes of the endless pattern the origin serves."""
    return (BLOCK * (n // len(BLOCK) + 1))[:n]


class Base(tornado.web.RequestHandler):
    SUPPORTED_METHODS = (
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "DELETE",
        "PATCH",
        "OPTIONS",
        "PROPFIND",
        "BREW",
    )

    def compute_etag(self) -> None:
        return None

    def prepare(self) -> None:
        self.application.settings["seen"].add(id(self.request.connection.stream))


class Echo(Base):
    """Describes the request it received, as JSON."""

    def _echo(self) -> None:
        body = self.request.body
        self.set_header("Content-Type", "application/json")
        self.finish(
            json.dumps(
                {
                    "method": self.request.method,
                    "uri": self.request.uri,
                    "version": self.request.version,
                    "headers": list(self.request.headers.get_all()),
                    "body_len": len(body),
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                }
            )
        )

    get = post = put = delete = patch = options = propfind = brew = _echo  # type: ignore[assignment]

    def head(self) -> None:
        self.set_header("Content-Length", "123")


@tornado.web.stream_request_body
class Upload(Base):
    """Consumes a streamed body, optionally slowly; answers with its size and hash."""

    def prepare(self) -> None:
        super().prepare()
        self.request.connection.set_max_body_size(1 << 40)
        self.hash = hashlib.sha256()
        self.size = 0
        self.delay = float(self.get_query_argument("delay", "0"))
        self.stall = float(self.get_query_argument("stall", "0"))

    async def data_received(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)
        # The pauses are the input: a slow or stalling reader, as the test asked.
        if self.stall:  # stop reading for a while after the first chunk
            await asyncio.sleep(self.stall)
            self.stall = 0
        if self.delay:
            await asyncio.sleep(self.delay)

    def _done(self) -> None:
        self.finish({"size": self.size, "sha256": self.hash.hexdigest()})

    post = put = _done  # type: ignore[assignment]


class Bytes(Base):
    """``/bytes?n=N[&chunked=1][&delay=S]``: N bytes of the pattern, streamed."""

    async def get(self) -> None:
        n = int(self.get_query_argument("n"))
        delay = float(self.get_query_argument("delay", "0"))
        if not self.get_query_argument("chunked", ""):
            self.set_header("Content-Length", str(n))
        self.set_header("Content-Type", "application/octet-stream")
        sent = 0
        piece = int(self.get_query_argument("piece", str(len(BLOCK))))
        while sent < n:
            size = min(piece, n - sent)
            start = sent % len(BLOCK)
            chunk = (BLOCK * 2)[start : start + size] if size <= len(BLOCK) else pattern(size)
            self.write(chunk)
            sent += size
            await self.flush()
            if delay:  # the input's pace: a slow origin, as the test asked
                await asyncio.sleep(delay)
        self.finish()


class Status(Base):
    def get(self) -> None:
        code = int(self.get_query_argument("code"))
        self.set_status(code)
        if code not in (204, 304):
            self.write(f"status {code}\n")
        self.finish()

    post = get


class Cookies(Base):
    def get(self) -> None:
        self.add_header("Set-Cookie", "a=1; Path=/")
        self.add_header("Set-Cookie", "b=2; Path=/; HttpOnly")
        self.write("cookies\n")


class Gzip(Base):
    def get(self) -> None:
        self.set_header("Content-Encoding", "gzip")
        self.set_header("Content-Type", "text/plain")
        self.write(gzip.compress(b"hello gzip\n" * 100))


class Sleep(Base):
    """``/sleep?seconds=S``: answers after S seconds (a slow origin, on purpose)."""

    async def get(self) -> None:
        await asyncio.sleep(float(self.get_query_argument("seconds")))
        self.write("slept\n")


class Echo_WS(tornado.websocket.WebSocketHandler):
    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


class OriginServer:
    """A Tornado origin in a background thread; ``url`` is its base URL."""

    def __init__(self, tls_cert: Any = None) -> None:
        self.seen_connections: set[int] = set()
        self._ready = threading.Event()
        self._tls_cert = tls_cert
        self._thread = threading.Thread(target=self._run, name="origin", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        scheme = "https" if tls_cert else "http"
        host = "localhost" if tls_cert else "127.0.0.1"
        self.url = f"{scheme}://{host}:{self.port}"
        self.authority = f"{host}:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        app = tornado.web.Application(
            [
                (r"/echo.*", Echo),
                (r"/upload", Upload),
                (r"/bytes", Bytes),
                (r"/status", Status),
                (r"/cookies", Cookies),
                (r"/gzip", Gzip),
                (r"/sleep", Sleep),
                (r"/ws", Echo_WS),
            ],
            seen=self.seen_connections,
        )
        ssl_ctx = None
        if self._tls_cert is not None:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls_cert.configure_cert(ssl_ctx)
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]

        async def start() -> None:
            self.server = HTTPServer(app, ssl_options=ssl_ctx, max_body_size=1 << 40)
            self.server.add_sockets(sockets)

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class RawOrigin:
    """Accepts connections and runs ``handler(sock)`` on each, in its own thread."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.authority = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.authority}"
        self.accepted = 0
        self.finished = 0  # handlers that returned normally (not by a socket error)
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._stopping = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            sock.settimeout(10)
            try:
                self.handler(sock)
            except OSError:
                return
        with self._lock:
            self.finished += 1

    def read_head(self, sock: socket.socket) -> bytes:
        """Read one request head (through the empty line); records it."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.requests.append(data)
        return data

    def stop(self) -> None:
        self._stopping = True
        self.listener.close()
