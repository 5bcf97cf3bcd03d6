"""The floor under Eyewall's request path: a bare protocol-level forwarder built on the
same HTTP/1.1 functions, measured side by side with Eyewall.

    .venv/bin/python bench/protocol_floor.py [--seconds 4] [--rounds 3]

A question for the design, not a product: how much of Eyewall's CPU per small
keep-alive request is the work any proxy must do (parse the request head and its
target, render the origin's request, parse the response head, render the client's
response; the system calls), and how much is the way the request path is built
(IOStream reads and a coroutine per step, phases, admission, the flow record,
observers)?  The forwarder here does only the first part, with `eyewall.http1`'s own
functions, as asyncio protocols on uvloop: ``data_received`` parses and writes, no
coroutine runs per request, one upstream connection per client connection.  It
handles exactly the benchmark's traffic (absolute-form GETs answered with a
Content-Length body) and nothing else: no admission, no limits, no timeouts, no
errors answered.  With ``--observe`` it also builds each request's access line and
flow row (`format_json`, `row_of`) and drops them: the per-flow work of the default
observers without the writer thread.  With ``--streams`` it does the same forwarding
on Eyewall's own streams instead of protocols: a coroutine per client connection
reads heads with `eyewall.proxy.streams.read_head` from `BoundedStream`s (Tornado
IOStreams) and writes to them, so the difference to the protocol floor is what
Tornado's streams and a coroutine cost, and the difference to Eyewall is what
Eyewall's own layers cost.  The garbage collector is set as Eyewall sets it.

The runner starts nginx (bench/origins.py), the forwarder (twice: bare and with
--observe) and Eyewall with the bench's defaults, each pinned to core 0, and runs
``wrk -t1`` on core 1 against each in turn, ``--rounds`` times interleaved; it prints
requests/s and the process's CPU per request (user + system, all threads).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eyewall.flow import Flow
from eyewall.http1 import fields as wire
from eyewall.http1 import framing as rules
from eyewall.http1.parse import RequestHead, parse_request_head
from eyewall.http1.response import parse_response_head
from eyewall.http1.target import parse_target
from eyewall.observe.logformats import format_json
from eyewall.observe.records import row_of
from eyewall.proxy.streams import BoundedStream, read_buffered, read_head

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class _Upstream(asyncio.Protocol):
    """The origin side: parse the response head, relay the head and the body."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.buffer = b""
        self.in_head = True
        self.left = 0

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.in_head:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            raw, body = self.buffer[: end + 4], self.buffer[end + 4 :]
            self.buffer = b""
            response = parse_response_head(raw)
            framing = rules.body_framing(response, "GET")
            out = rules.downstream_framing(framing, "HTTP/1.1")
            fields = wire.response_fields(response, out, "HTTP/1.1", True, "eyewall")
            client.response = response
            self.in_head = False
            self.left = framing.length - len(body)
            client.transport.write(
                wire.render_response(response.status, response.reason, fields) + body
            )
        else:
            self.left -= len(data)
            client.transport.write(data)
        if self.left <= 0:
            self.in_head = True
            client.done()


class _Client(asyncio.Protocol):
    """The client side: parse a request head, send the origin's request."""

    observe = False
    lines: list[str] = []
    rows: list[tuple[object, ...]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.busy = False
        self.upstream: asyncio.Transport | None = None
        self.head: RequestHead | None = None
        self.response = None
        self.started = 0.0

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.next()

    def next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        raw, self.buffer = self.buffer[: end + 4], self.buffer[end + 4 :]
        head = self.head = parse_request_head(raw)
        target = parse_target(head.method, head.target)
        framing = rules.body_framing(head)
        fields = wire.upstream_fields(head, target, framing, "eyewall")
        request = wire.render_request(head.method, target.path, fields)
        self.busy = True
        self.started = time.monotonic()
        if self.upstream is None:
            self.connecting = asyncio.ensure_future(
                self._connect(target.host, target.port, request)
            )
        else:
            self.upstream.write(request)

    async def _connect(self, host: str, port: int, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.upstream, _ = await loop.create_connection(lambda: _Upstream(self), host, port)
        self.upstream.write(request)

    def done(self) -> None:
        self.busy = False
        if self.observe:
            head = self.head
            assert head is not None
            flow = Flow("f-1", "http", ("127.0.0.1", 1), time.time())
            flow.method, flow.url, flow.request = head.method, head.target, head
            flow.response, flow.status = self.response, 200
            flow.duration = time.monotonic() - self.started
            self.lines.append(format_json(flow))
            self.rows.append(row_of(flow))
            if len(self.lines) >= 1000:
                self.lines.clear()
                self.rows.clear()
        if self.buffer:
            self.next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


_HEAD_LIMIT = 65536
_BUFFER = 1 << 20


async def _serve_streams(client: BoundedStream) -> None:
    """The ``--streams`` forwarder for one client connection: one coroutine, Eyewall's
    streams, the same `eyewall.http1` work as `_Client` and `_Upstream`."""
    upstream: BoundedStream | None = None
    try:
        while True:
            head = parse_request_head(await read_head(client, _HEAD_LIMIT))
            target = parse_target(head.method, head.target)
            fields = wire.upstream_fields(head, target, rules.body_framing(head), "eyewall")
            request = wire.render_request(head.method, target.path, fields)
            if upstream is None:
                sock = socket.socket()
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await asyncio.get_running_loop().sock_connect(sock, (target.host, target.port))
                upstream = BoundedStream(sock, max_buffer_size=_BUFFER)
            upstream.write(request)
            response = parse_response_head(await read_head(upstream, _HEAD_LIMIT))
            framing = rules.body_framing(response, "GET")
            out = rules.downstream_framing(framing, "HTTP/1.1")
            fields = wire.response_fields(response, out, "HTTP/1.1", True, "eyewall")
            body = read_buffered(upstream, framing.length)
            if body is None:
                body = await upstream.read_bytes(framing.length)
            client.write(wire.render_response(response.status, response.reason, fields) + body)
    except Exception:  # the client or the origin went away: the benchmark's end
        client.close()
        if upstream is not None:
            upstream.close()


def serve(port: int, observe: bool, streams: bool) -> None:
    import uvloop
    from tornado.netutil import add_accept_handler, bind_sockets

    _Client.observe = observe
    gc.set_threshold(50_000, 50, 100)  # as eyewall.app.run
    gc.freeze()

    def accept(sock: socket.socket, _address: object) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.ensure_future(_serve_streams(BoundedStream(sock, _BUFFER)))
        tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(tasks.discard)

    tasks: set[asyncio.Future[None]] = set()

    async def main() -> None:
        if streams:
            for listener in bind_sockets(port, "127.0.0.1", backlog=1024):
                add_accept_handler(listener, accept)
        else:
            loop = asyncio.get_running_loop()
            await loop.create_server(_Client, "127.0.0.1", port, backlog=1024)
        await asyncio.Event().wait()

    uvloop.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(seconds: int, rounds: int) -> None:
    sys.path.insert(0, str(HERE))
    import origins

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "www").mkdir()
        origins.write_files(work / "www")
        origin_port = _free_port()
        nginx, _ = origins.start_nginx(work, origin_port, 1)
        python = sys.executable
        commands = {
            "floor": [python, __file__, "--serve", "PORT"],
            "floor --observe": [python, __file__, "--serve", "PORT", "--observe"],
            "floor --streams": [python, __file__, "--serve", "PORT", "--streams"],
            "eyewall (defaults on)": [
                python, "-m", "eyewall", "--config", str(HERE / "eyewall-bench.toml"),
                "--listen", "127.0.0.1:PORT", "--access-log", str(work / "access.log"),
                "--admin-listen", "127.0.0.1:0", "--flows", str(work / "flows.sqlite3"),
            ],
        }  # fmt: skip
        procs = {}
        try:
            for name, command in commands.items():
                port = _free_port()
                argv = [a.replace("PORT", str(port)) for a in command]
                procs[name] = (
                    subprocess.Popen(
                        ["taskset", "-c", "0", *argv],
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                    port,
                )
                _wait_for(port)
            env = dict(os.environ, BENCH_ORIGIN=f"127.0.0.1:{origin_port}", BENCH_PATH="/1k")
            results: dict[tuple[int, str], list[tuple[float, float]]] = {}
            for conns in (10, 100):
                for _ in range(rounds):
                    for name, (proc, port) in procs.items():
                        before = _cpu(proc.pid)
                        out = subprocess.run(
                            ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}",
                             f"-d{seconds}s", f"http://127.0.0.1:{port}/",
                             "-s", str(HERE / "wrk_stats.lua")],
                            capture_output=True, text=True, env=env, check=True,
                        ).stdout  # fmt: skip
                        spent = _cpu(proc.pid) - before
                        found = re.search(r"(\d+) requests in", out)
                        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
                        assert found is not None and rate is not None, out
                        count = int(found.group(1))
                        results.setdefault((conns, name), []).append(
                            (float(rate.group(1)), spent / count * 1e6)
                        )
            print("| conns | system | req/s (median) | CPU µs per request (median) |")
            print("|---|---|---|---|")
            for (conns, name), values in results.items():
                rate_median = statistics.median(v[0] for v in values)
                cpu_median = statistics.median(v[1] for v in values)
                print(f"| {conns} | {name} | {rate_median:,.0f} | {cpu_median:.0f} |")
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(10)
            nginx.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--observe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--streams", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.observe, args.streams)
    else:
        run(args.seconds, args.rounds)


if __name__ == "__main__":
    main()
