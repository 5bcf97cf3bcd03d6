"""Zero-downtime restart (SIGUSR2, ``eyewall restart``): a new generation starts beside
the running one on the same sockets and the old one drains.  Under load nothing fails:
new connections are accepted by whichever generation holds the socket, keep-alive
clients see their idle connection closed between requests (and open another, as
HTTP/1.1 clients do), and a tunnel open before the restart keeps working until it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PROXY_ARGS, ROOT, ProxyProcess, read_response


def poll(condition: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def pid_in(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


class Load:
    """Clients sending GETs until stopped: some on a new connection each time, some on
    keep-alive connections.  A keep-alive request whose connection was closed before
    any byte of an answer came back is sent again on a new connection (RFC 9112 §9.3.1:
    the proxy never saw it); anything else that is not a whole 200 is a failure."""

    def __init__(self, address: tuple[str, int], url: str) -> None:
        self.address = address
        self.url = url
        self.ok = 0
        self.retried = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.fresh) for _ in range(3)]
        self.threads += [threading.Thread(target=self.keep_alive) for _ in range(2)]
        for t in self.threads:
            t.start()

    def head(self, close: bool) -> bytes:
        extra = "Connection: close\r\n" if close else ""
        return f"GET {self.url} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()

    def count(self, response: bytes) -> None:
        with self.lock:
            if response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"}"):
                self.ok += 1
            else:
                self.failures.append(repr(response[:200]))

    def fresh(self) -> None:
        while not self.stopping.is_set():
            try:
                with socket.create_connection(self.address, timeout=10) as s:
                    s.sendall(self.head(close=True))
                    self.count(read_response(s))
            except OSError as e:
                with self.lock:
                    self.failures.append(f"new connection: {e!r}")

    def keep_alive(self) -> None:
        s: socket.socket | None = None
        while not self.stopping.is_set():
            for attempt in range(2):
                try:
                    if s is None:
                        s = socket.create_connection(self.address, timeout=10)
                    s.sendall(self.head(close=False))
                    response = read_response(s)
                except OSError:
                    response = b""
                if response or attempt:
                    break
                s.close()  # closed while idle: the request never reached the proxy
                s = None
                with self.lock:
                    self.retried += 1
            self.count(response)
            if s is not None and (not response or b"Connection: close" in response):
                s.close()
                s = None
        if s is not None:
            s.close()

    def wait_for(self, more: int) -> None:
        target = self.ok + more
        poll(lambda: self.ok >= target or self.failures, f"{more} more answers")

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)


def tunnel_to(p: ProxyProcess, authority: str) -> socket.socket:
    s = socket.create_connection(p.address, timeout=10)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert read_response(s, head_only=True).startswith(b"HTTP/1.1 200 ")
    return s


def echoes(s: socket.socket, data: bytes) -> bool:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == data


@pytest.mark.parametrize(("workers", "how"), [("1", "signal"), ("2", "signal"), ("2", "command")])
def test_a_restart_under_load_fails_no_request(tmp_path, origin, raw_origin, workers, how):
    def echo(sock: socket.socket) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    upstream = raw_origin(echo)
    pid_file = tmp_path / "eyewall.pid"
    p = ProxyProcess(
        tmp_path / "p", *PROXY_ARGS, "--workers", workers, "--log-format", "json",
        "--pid-file", str(pid_file), "--drain-grace", "0", "--drain-timeout", "60",
    )  # fmt: skip
    new = 0
    try:
        tunnel = tunnel_to(p, upstream.authority)
        assert echoes(tunnel, b"before")
        load = Load(p.address, f"{origin.url}/echo/load")
        try:
            load.wait_for(50)
            assert pid_in(pid_file) == p.pid
            if how == "signal":
                p.signal(signal.SIGUSR2)
            else:
                done = subprocess.run(
                    [sys.executable, "-m", "eyewall", "restart", "--pid-file", str(pid_file)],
                    capture_output=True, text=True, timeout=90, cwd=ROOT,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                assert f"; {p.pid} drains" in done.stdout
            new = int(poll(lambda: (n := pid_in(pid_file)) not in (0, p.pid) and n, "a new pid"))
            p.log_with("restart: this generation serves")
            load.wait_for(200)  # served by the new generation, the old one draining
            assert running(p.pid)  # the tunnel keeps the old generation ...
            assert echoes(tunnel, b"during")  # ... and works
            tunnel.close()
            assert p.process.wait(30) == 0  # the old generation is done
            load.wait_for(100)
        finally:
            load.stop()
        assert not load.failures, load.failures[:5]
        os.kill(new, signal.SIGTERM)
        poll(lambda: not running(new), "the new generation to stop")
        assert not pid_file.exists()
        records = [json.loads(line) for line in p.access_lines()]  # both generations' lines
        assert sum(r["status"] == 200 and r["method"] == "GET" for r in records) == load.ok
        assert [r["kind"] for r in records if r["method"] == "CONNECT"] == ["tunnel"]
    finally:
        if new and running(new):
            os.kill(new, signal.SIGKILL)
        p.stop()
    p.check_clean()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_restart_that_cannot_start_keeps_the_running_generation(tmp_path, origin, workers):
    """The running generation keeps serving, and ``eyewall restart`` says the new one
    failed as soon as it has (not after ``--wait``): the running process writes its pid
    file again."""
    config = tmp_path / "eyewall.toml"
    pid_file = tmp_path / "eyewall.pid"
    config.write_text(f"workers = {workers}\npid_file = {str(pid_file)!r}\n")
    p = ProxyProcess(tmp_path / "p", *PROXY_ARGS, "--config", str(config), "--drain-grace", "0")
    p.expected_errors.append("restart: the new generation")
    config.write_text("workers = 'lots'\n")  # the successor refuses this file
    done = subprocess.run(
        [sys.executable, "-m", "eyewall", "restart", "--pid-file", str(pid_file), "--wait", "3600"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"the new generation failed to start; {p.pid} keeps serving" in done.stderr
    p.log_with("exited (status 2) before serving")
    assert pid_in(pid_file) == p.pid
    with socket.create_connection(p.address, timeout=10) as s:
        s.sendall(f"GET {origin.url}/echo/still HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
    assert p.process.poll() is None
    assert p.stop() == 0
    p.check_clean()


def test_children_never_run_an_eyewall_package_from_the_working_directory(tmp_path, origin):
    """Workers and a restart's new generation run the proxy's own code, even when it was
    started from a directory holding another ``eyewall`` (``python -m`` would put the
    working directory first on the import path)."""
    script = Path(sys.executable).with_name("eyewall")
    if not script.exists():
        pytest.skip("the eyewall console script is not installed beside this Python")
    planted = tmp_path / "cwd" / "eyewall"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('ran\\n')\nraise SystemExit('planted')\n"
    )
    pid_file = tmp_path / "eyewall.pid"
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(script), "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-flows",
             "--access-log", "off", "--allow-private", "--workers", "2", "--drain-grace", "0",
             "--pid-file", str(pid_file)],
            stderr=err, cwd=planted.parent,
        )  # fmt: skip
    new = 0
    try:
        text = str(poll(lambda: " listening on " in (t := log.read_text()) and t, "listening"))
        port = int(text.split(" listening on ", 1)[1].split(",")[0].split()[0].rsplit(":", 1)[1])
        url = f"{origin.url}/echo/x"
        get = f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()

        def served() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(get)
                return read_response(s).startswith(b"HTTP/1.1 200")

        poll(served, "a request served by a worker")
        proc.send_signal(signal.SIGUSR2)
        new = int(poll(lambda: (n := pid_in(pid_file)) not in (0, proc.pid) and n, "a new pid"))
        poll(lambda: "restart: this generation serves" in log.read_text(), "the handover")
        poll(served, "a request served by the new generation")
        assert proc.wait(30) == 0
        assert not marker.exists(), log.read_text()[-2000:]
    finally:
        for pid in (new, proc.pid):
            if pid and running(pid):
                os.kill(pid, signal.SIGTERM)
        if new:
            poll(lambda: not running(new), "the new generation to stop")
