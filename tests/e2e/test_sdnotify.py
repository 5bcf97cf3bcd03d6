"""sd_notify: the message format on a real datagram socket, and the proxy telling a
(pretend) service manager that it is ready, reloading and stopping."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eyewall import sdnotify
from tests.conftest import ROOT, read_response


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The service manager's end: a datagram socket bound to a path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(15)  # an upper bound on waiting, not a synchronisation
    yield sock
    sock.close()


def test_notify_sends_one_datagram_to_a_path(manager, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", manager.getsockname())
    assert sdnotify.notify("READY=1\nSTATUS=listening")
    assert manager.recv(4096) == b"READY=1\nSTATUS=listening"


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"eyewall-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(15)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_notify_is_a_no_op_without_a_usable_socket(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_notify_reports_an_absent_manager_without_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False


def test_reloading_carries_the_monotonic_clock():
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sdnotify.reloading().split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert first == "RELOADING=1"
    name, _, value = second.partition("=")
    assert name == "MONOTONIC_USEC" and before <= int(value) <= after


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def _next(manager: socket.socket, wanted: str) -> dict[str, str]:
    """The next message that sets ``wanted`` (others, such as STATUS alone, pass)."""
    while True:
        fields = _fields(manager.recv(4096))
        if wanted in fields:
            return fields


def test_proxy_is_accepting_when_it_says_ready(manager, tmp_path):
    config = tmp_path / "eyewall.toml"
    config.write_text('via = "first"\n')
    stderr_path = tmp_path / "stderr.log"
    env = {**os.environ, "NOTIFY_SOCKET": manager.getsockname()}
    cmd = [
        sys.executable,
        "-m",
        "eyewall",
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--access-log",
        "off",
        "--no-flows",
    ]
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(cmd, stderr=stderr, cwd=ROOT, env=env)
    try:
        # Only the datagram says when to go on: no polling of the log.
        ready = _next(manager, "READY")
        assert ready["READY"] == "1"
        port = int(ready["STATUS"].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /relative HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 400")
        admin = next(
            line.split(" on ", 1)[1]
            for line in stderr_path.read_text().splitlines()
            if line.startswith("eyewall admin on ")
        )
        host, admin_port = admin.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(admin_port)), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 200")

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        process.send_signal(signal.SIGHUP)
        reloading = _next(manager, "RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) >= before
        assert _next(manager, "READY")["READY"] == "1"

        config.write_text("via = \n")  # invalid: the reload is refused
        process.send_signal(signal.SIGHUP)
        _next(manager, "RELOADING")
        refused = _next(manager, "STATUS")
        assert refused["STATUS"].startswith("reload refused")
        assert _next(manager, "READY")["READY"] == "1"

        process.send_signal(signal.SIGTERM)
        assert _next(manager, "STOPPING")["STOPPING"] == "1"
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    log = stderr_path.read_text()
    assert "Traceback" not in log, log


def test_a_stop_right_after_ready_drains_instead_of_killing(manager, tmp_path):
    """READY=1 comes after the signal handlers: systemd may stop the service at once."""
    env = {**os.environ, "NOTIFY_SOCKET": manager.getsockname()}
    cmd = [
        sys.executable,
        "-m",
        "eyewall",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--access-log",
        "off",
        "--no-flows",
    ]
    with open(tmp_path / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(cmd, stderr=stderr, cwd=ROOT, env=env)
    try:
        assert _next(manager, "READY")["READY"] == "1"
        process.send_signal(signal.SIGTERM)
        assert _next(manager, "STOPPING")["STOPPING"] == "1"
        assert process.wait(30) == 0  # not -SIGTERM: the handler ran
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
