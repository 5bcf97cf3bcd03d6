"""The real-server fixtures work as they promise: each server answers where it says,
PostgreSQL checks the test role's password, HAProxy's health checks see a backend
come and go."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.services import (
    Backend,
    HAProxy,
    PostgresServer,
    RedisServer,
    find_tool,
    free_port,
    haproxy_config,
)

pytestmark = pytest.mark.fleet


def redis_roundtrip(family: int, address: object, command: bytes) -> bytes:
    with socket.socket(family) as s:
        s.settimeout(5)
        s.connect(address)
        s.sendall(command)
        return s.recv(1024)


def test_redis_answers_on_tcp_and_unix_socket(redis_server: RedisServer) -> None:
    tcp = ("127.0.0.1", redis_server.port)
    assert redis_roundtrip(socket.AF_INET, tcp, b"PING\r\n") == b"+PONG\r\n"
    unix = str(redis_server.unix_socket)
    assert redis_roundtrip(socket.AF_UNIX, unix, b"PING\r\n") == b"+PONG\r\n"
    # No persistence: nothing would be written at shutdown.
    reply = redis_roundtrip(socket.AF_INET, tcp, b"CONFIG GET save\r\n")
    assert reply == b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"


def psql_as_test_role(server: PostgresServer, password: str) -> subprocess.CompletedProcess[str]:
    """``SELECT current_user`` over TCP as the test role, with ``password``."""
    where = ["-h", "127.0.0.1", "-p", str(server.port), "-U", server.user, "-d", server.database]
    return subprocess.run(
        [server.psql_binary, "-X", "-A", "-t", *where, "-c", "SELECT current_user"],
        env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_postgres_checks_the_test_role_password(postgres_server: PostgresServer) -> None:
    good = psql_as_test_role(postgres_server, postgres_server.password)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == postgres_server.user
    bad = psql_as_test_role(postgres_server, "wrong")
    assert bad.returncode != 0
    assert "password authentication failed" in bad.stderr


def test_postgres_runs_without_durability(postgres_server: PostgresServer) -> None:
    assert postgres_server.psql("SHOW fsync", "SHOW synchronous_commit").split() == [
        "off",
        "off",
    ]


def test_haproxy_health_checks_follow_a_backend(haproxy) -> None:  # type: ignore[no-untyped-def]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    lb: HAProxy = haproxy(
        lambda d: haproxy_config(d, f"127.0.0.1:{free_port()}", [Backend("node1", port)])
    )
    lb.wait_status("nodes", "node1", "UP")
    listener.close()
    lb.wait_status("nodes", "node1", "DOWN")
    listener = socket.create_server(("127.0.0.1", port))
    lb.wait_status("nodes", "node1", "UP")
    listener.close()


def test_a_missing_tool_skips_unless_tools_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EYEWALL_REQUIRE_TOOLS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-server is not installed"):
        find_tool("no-such-server", "no-such-package")
    monkeypatch.setenv("EYEWALL_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="forbids skipping"):
        find_tool("no-such-server", "no-such-package")
