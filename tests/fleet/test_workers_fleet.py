"""A node with workers in a fleet: its workers take the limits from Redis (so a client
rate limit holds across the workers and the fleet), and its supervisor records every
worker's flows in PostgreSQL."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PROXY_ARGS, ProxyProcess, read_response
from tests.origins import OriginServer
from tests.services import PostgresServer, RedisServer

pytestmark = pytest.mark.slow  # a supervisor and two workers


def test_a_node_with_workers_takes_its_limits_from_redis(
    tmp_path: Path,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    origin: OriginServer,
) -> None:
    p = ProxyProcess(
        tmp_path / "p", *PROXY_ARGS, "--workers", "2", "--log-format", "json",
        "--drain-grace", "0", "--shared-limits-redis", redis_server.url,
        "--shared-limits-prefix", f"workers{int(time.time() * 1000)}",
        "--shared-limits-connect-timeout", "5", "--shared-limits-command-timeout", "5",
        "--shared-flows-postgresql", postgres_server.dsn,
        "--client-rps", "0.001", "--client-burst", "4",
    )  # fmt: skip
    try:
        statuses = []
        for i in range(40):
            with socket.create_connection(p.address, timeout=10) as s:
                s.sendall(f"GET {origin.url}/echo/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                statuses.append(int(read_response(s).split(b" ", 2)[1]))
            served = {json.loads(line)["worker"] for line in p.access_lines(i + 1)}
            if i >= 11 and served == {1, 2}:
                break
        assert served == {1, 2}
        assert statuses == [200] * 4 + [429] * (len(statuses) - 4)  # 4 in all, not per worker
        assert p.admin_url is not None
        with httpx.Client(trust_env=False, timeout=10) as c:
            deadline = time.monotonic() + 15
            while True:  # the flows reach PostgreSQL in batches
                har = c.get(p.admin_url + "/api/har").json()
                if len(har["log"]["entries"]) >= len(statuses):
                    break
                assert time.monotonic() < deadline, har["log"]["entries"]
                time.sleep(0.1)
    finally:
        p.stop()
    p.check_clean()
