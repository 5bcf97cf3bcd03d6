"""Shared fixtures: real origin servers on port 0, a throwaway CA, and the proxy itself
running as a subprocess (so tests see exactly what users see, and can read its RSS and
send it signals)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trustme
from hypothesis import HealthCheck, settings

from tests.origins import OriginServer, RawOrigin

# Property tests must not fail because a busy CI machine ran them slowly.
settings.register_profile(
    "eyewall", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("eyewall")

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def poll(
    condition: Callable[[], T], timeout: float = 10.0, what: str = "", interval: float = 0.02
) -> T:
    """Call ``condition`` until it returns something true, and return that.

    Tests wait for another process or thread this way, never by sleeping a guessed
    time: on a busy machine the guess is too short, on an idle one needlessly long.
    Fails after ``timeout`` seconds, naming ``what`` (or the condition)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s in vain for {what or condition}")
        time.sleep(interval)
    return value


def refuses_connections(address: tuple[str, int]) -> bool:
    """Whether nothing accepts connections at ``address`` any more."""
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class ProxyProcess:
    """``python -m eyewall`` on 127.0.0.1:0 with its access log in a file."""

    def __init__(self, tmp: Path, *args: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.access_path = tmp / "access.log"
        self.expected_errors: list[str] = []  # log lines a test provokes on purpose
        self.admin_url: str | None = None
        self.stderr_path = tmp / "stderr.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "eyewall",
            "--listen",
            "127.0.0.1:0",
            "--access-log",
            str(self.access_path),
            "--log-format",
            "text",
            "--admin-listen",
            "127.0.0.1:0",
            "--flows",
            str(tmp / "flows.sqlite3"),
            *args,
        ]
        self.process = subprocess.Popen(cmd, stderr=self._stderr, cwd=ROOT)
        self.port = self._wait_ready()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = ("127.0.0.1", self.port)

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = self.stderr_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("eyewall admin on "):
                    self.admin_url = line.split(" on ", 1)[1].strip()
                if " listening on " in line:
                    self.listening = line.split(" listening on ", 1)[1].split(", ")
                    return int(self.listening[0].rsplit(":", 1)[1])
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited at start:\n{text}")
            time.sleep(0.02)
        raise RuntimeError("proxy did not start")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_with(self, needle: str, timeout: float = 5.0) -> str:
        """The proxy's log once it contains ``needle`` (log lines are written by a
        thread, so they may trail the event by a moment)."""
        deadline = time.monotonic() + timeout
        while needle not in (text := self.stderr()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {needle!r}:\n{text[-3000:]}")
            time.sleep(0.02)
        return text

    def access_lines(self, wait_for: int = 0, timeout: float = 5.0) -> list[str]:
        """Access lines written so far; waits until at least ``wait_for`` are there."""
        deadline = time.monotonic() + timeout
        while True:
            lines = []
            if self.access_path.exists():
                lines = self.access_path.read_text().splitlines()
            if len(lines) >= wait_for or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def access_entry(self, needle: str, timeout: float = 5.0) -> str:
        """The last access line containing ``needle`` (waiting for it to appear)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = [line for line in self.access_lines() if needle in line]
            if matches:
                return matches[-1]
            time.sleep(0.02)
        raise AssertionError(f"no access line with {needle!r}:\n" + "\n".join(self.access_lines()))

    def rss(self) -> int:
        """Resident set size in bytes, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metrics(self) -> dict[str, float]:
        """The admin listener's Prometheus samples without labels, by name (gauges such
        as ``eyewall_client_connections``, ``eyewall_tunnels``)."""
        from prometheus_client.parser import text_string_to_metric_families

        assert self.admin_url, "the admin listener is off"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.admin_url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.labels
        }

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int | None:
        """Stop the proxy the clean way.  SIGINT rather than SIGTERM: the same orderly
        shutdown without SIGTERM's drain grace (timeouts.drain_grace, 3 s by default),
        which would add seconds to every test's teardown.  Tests of SIGTERM send it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._stderr.close()
        return self.process.returncode

    def check_clean(self) -> None:
        """Fail on tracebacks or unexpected errors in the proxy's own log."""
        text = self.stderr()
        bad = []
        expected = False  # inside the traceback of an expected error
        for line in text.splitlines():
            if " ERROR " in line or " CRITICAL " in line:
                expected = any(e in line for e in self.expected_errors)
                if not expected:
                    bad.append(line)
            elif "Traceback" in line and not expected:
                bad.append(line)
        assert not bad, "proxy logged errors:\n" + text[-5000:]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def origin() -> Iterator[OriginServer]:
    server = OriginServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_origin(ca: trustme.CA) -> Iterator[OriginServer]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = OriginServer(tls_cert=cert)
    yield server
    server.stop()


@pytest.fixture
def raw_origin() -> Iterator[Callable[..., RawOrigin]]:
    """Factory for scripted TCP origins: ``raw_origin(handler)``."""
    servers: list[RawOrigin] = []

    def make(handler: Callable[[socket.socket], None]) -> RawOrigin:
        server = RawOrigin(handler)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# Loopback origins are private destinations; tests run with them allowed.
PROXY_ARGS: tuple[str, ...] = ("--allow-private", "--connect-port", "1-65535")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    p = ProxyProcess(tmp_path_factory.mktemp("proxy"), *PROXY_ARGS)
    yield p
    p.stop()
    p.check_clean()


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory for a proxy with its own settings: ``make_proxy("--flag", "value")``."""
    started: list[ProxyProcess] = []

    def make(*args: str) -> ProxyProcess:
        p = ProxyProcess(tmp_path / f"p{len(started)}", *PROXY_ARGS, *args)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
        p.check_clean()


def read_response(sock: socket.socket, head_only: bool = False) -> bytes:
    """Read one response (head plus a Content-Length or chunked body, or else until
    the connection closes) and return its bytes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = {
        line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if b":" in line
    }
    status = int(head.split(b" ", 2)[1])
    if head_only or status in (204, 304) or 100 <= status < 200:
        return head + b"\r\n\r\n"
    if b"content-length" in fields:
        length = int(fields[b"content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    if fields.get(b"transfer-encoding") == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    while chunk := sock.recv(65536):
        body += chunk
    return head + b"\r\n\r\n" + body


def raw_request(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on a new connection; return the first response."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def raw_exchange(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on a new connection; return everything until the proxy closes it."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
