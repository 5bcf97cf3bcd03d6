"""Flows of several nodes in one PostgreSQL database (eyewall/shared/flow_db.py), against
a real server: batches, the bound on what waits, a database that is away, retention,
and reading back what every node recorded.  Each test has a database of its own."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from eyewall.errors import ErrorKind
from eyewall.flow import Flow
from eyewall.http1.parse import parse_request_head
from eyewall.observe.har import har
from eyewall.observe.records import COLUMNS
from eyewall.shared.flow_db import FlowDatabase
from eyewall.shared.flow_schema import COLUMN_TYPES, SCHEMA, TABLE
from tests.services import PostgresServer

pytestmark = pytest.mark.fleet


@pytest.fixture
def dsn(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"flows_{secrets.token_hex(4)}"
    postgres_server.psql(f"CREATE DATABASE {name} OWNER {postgres_server.user}")
    yield postgres_server.dsn.rsplit("/", 1)[0] + "/" + name
    postgres_server.psql(f"DROP DATABASE {name} WITH (FORCE)")


NOW = time.time()  # flows start now-ish: older ones would fall to retention at once


def flow(n: int, host: str = "example.test", started: float = NOW, **kw: Any) -> Flow:
    head = parse_request_head(
        f"GET http://{host}/item/{n} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()
    )
    f = Flow(f"f{n}", "http", ("203.0.113.7", 40000 + n), started + n, method="GET")
    f.url, f.host, f.port, f.request, f.status = head.target, host, 80, head, 200
    f.head_bytes = 100
    for key, value in kw.items():
        setattr(f, key, value)
    return f


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


async def rows(dsn: str, query: str = f"SELECT count(*) FROM {TABLE}") -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def test_the_schema_covers_every_record_column() -> None:
    assert set(COLUMN_TYPES) == set(COLUMNS)
    assert all(f'"{c}"' in SCHEMA for c in COLUMNS)


def test_two_nodes_record_and_either_reads_both(dsn: str) -> None:
    async def body() -> None:
        a, b = FlowDatabase(dsn, "node-a"), FlowDatabase(dsn, "node-b")
        a.start()
        b.start()
        for n in range(3):
            a(flow(n))
            b(flow(10 + n, host="other.test", status=404))
        a(flow(20, status=502, error=ErrorKind.DNS_ERROR, error_detail="no such host"))
        await a.close()
        await b.close()
        assert (a.written, b.written, a.dropped, b.dropped) == (4, 3, 0, 0)

        reader = FlowDatabase(dsn, "node-c")
        try:
            records = await reader.records()
            assert [r["id"] for r in records] == ["f0", "f1", "f2", "f10", "f11", "f12", "f20"]
            assert {r["node"] for r in records} == {"node-a", "node-b"}
            assert [r["id"] for r in await reader.records(host="other.test")] == [
                "f10",
                "f11",
                "f12",
            ]
            assert [r["id"] for r in await reader.records(since=NOW + 11, limit=2)] == [
                "f12",
                "f20",
            ]
            found = await reader.find("f11")
            assert found is not None and found["node"] == "node-b" and found["status"] == 404
            assert "Accept: */*" in found["request_headers"]
            assert await reader.find("nope") is None
            entries = har(records)["log"]["entries"]
            assert len(entries) == 7 and entries[0]["request"]["url"].endswith("/item/0")

            def ids(summaries: list[dict[str, Any]]) -> list[str]:
                return [s["id"] for s in summaries]

            assert ids(await reader.summaries({}, limit=3)) == ["f20", "f12", "f11"]
            assert ids(await reader.summaries({"host": "OTHER"})) == ["f12", "f11", "f10"]
            assert ids(await reader.summaries({"status": "5xx"})) == ["f20"]
            assert ids(await reader.summaries({"status": "404"}, limit=1)) == ["f12"]
            assert ids(await reader.summaries({"q": "no such"})) == ["f20"]
            assert ids(await reader.summaries({"method": "post"})) == []
            assert ids(await reader.summaries({"status": "teapot"})) == []
            assert (await reader.summaries({"q": "item/1"}))[0]["node"] == "node-b"
        finally:
            await reader.close()

    run(body)


def test_batches_go_at_a_thousand_flows_without_waiting_for_the_timer(dsn: str) -> None:
    async def body() -> None:
        db = FlowDatabase(dsn, "n")
        db.start()
        try:
            for n in range(1000):
                db(flow(n))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while db.written < 1000:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            assert len(db.batch_seconds) == 1  # one COPY
            assert await rows(dsn) == 1000
        finally:
            await db.close()

    run(body)


def test_what_waits_is_bounded_and_drops_are_counted(dsn: str) -> None:
    async def body() -> None:
        db = FlowDatabase(dsn, "n", max_pending=1 << 20)
        db.start()
        big = bytearray(200_000)
        for n in range(10):
            db(flow(n, request_body=big))
        assert (db.pending, db.dropped) == (5, 5)  # the data path never waited
        await db.close()
        assert db.written == 5 and await rows(dsn) == 5

    run(body)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_database_away_costs_dropped_flows_not_errors(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        dsn = f"postgresql://nobody@127.0.0.1:{closed_port()}/x"
        db = FlowDatabase(dsn, "n", connect_timeout=1.0, command_timeout=1.0, max_pending=1 << 20)
        db.start()
        for n in range(3):
            db(flow(n))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not db.failures:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert db.pending == 3  # kept for the next try
        await db.close()
        assert (db.written, db.dropped) == (0, 3)

    with caplog.at_level(logging.WARNING, "eyewall.flows"):
        run(body)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "recording flows to PostgreSQL failed" in messages[0]
    assert "3 flows were not recorded" in messages[1]


def test_retention_by_age_count_and_bytes(dsn: str) -> None:
    async def body() -> None:
        now = [NOW + 60]
        db = FlowDatabase(dsn, "n", max_age=50.0, max_count=30, clock=lambda: now[0])
        db.start()
        for n in range(60):
            db(flow(n))  # started NOW + n
        await db._flush()
        await db._prune()  # 10 flows are older than 50 s; 30 of the 50 left
        records = await db.records()
        assert [r["id"] for r in records] == [f"f{n}" for n in range(30, 60)]
        db.max_bytes = 10 * (1024 + 100)  # ten flows' estimated size
        await db._prune()
        assert [r["id"] for r in await db.records()] == [f"f{n}" for n in range(50, 60)]
        await db.close()

    run(body)


def test_text_postgres_refuses_is_repaired_not_lost(dsn: str) -> None:
    async def body() -> None:
        db = FlowDatabase(dsn, "n")
        db.start()
        odd = flow(1, error=ErrorKind.BAD_REQUEST, error_detail="nul \x00 and \udcff here")
        db(odd)
        await db.close()
        assert db.written == 1
        reader = FlowDatabase(dsn, "n")
        (record,) = await reader.records()
        await reader.close()
        assert record["error_detail"] == "nul \ufffd and ? here"

    run(body)


def test_a_follower_sees_the_other_nodes_batches_as_they_commit(dsn: str) -> None:
    async def body() -> None:
        a, b = FlowDatabase(dsn, "node-a"), FlowDatabase(dsn, "node-b")
        shown: list[dict[str, Any]] = []
        wanted = [True]
        asked: list[bool] = []  # what the follower was told, notification by notification

        def watching() -> bool:
            asked.append(wanted[0])
            return wanted[0]

        a.follow(shown.append, watching)
        try:
            await a.records()  # the table exists before the follower listens
            loop = asyncio.get_running_loop()

            async def until(condition: Callable[[], bool]) -> None:
                deadline = loop.time() + 30
                while not condition():
                    assert loop.time() < deadline
                    await asyncio.sleep(0.01)

            # the follower's LISTEN is in place once a notification comes back
            while not shown:
                b(flow(0))
                await b._flush()
                await asyncio.sleep(0.05)
            shown.clear()
            for n in range(1, 4):
                b(flow(n, host="b.test"))
            a(flow(9, host="a.test"))  # its own: not shown
            await a._flush()
            await b._flush()
            await until(lambda: len(shown) == 3)
            assert [(s["id"], s["node"]) for s in shown] == [(f"f{n}", "node-b") for n in (1, 2, 3)]
            wanted[0] = False  # nobody watching: batches are not even read
            b(flow(5))
            await b._flush()
            await until(lambda: asked[-1] is False)
            wanted[0] = True
            b(flow(6))
            await b._flush()
            await until(lambda: len(shown) == 4)  # notifications come in commit order
            assert shown[3]["id"] == "f6"
        finally:
            await a.close()
            await b.close()

    run(body)


@pytest.mark.slow
def test_a_node_stopped_right_after_its_last_requests_records_every_flow(
    dsn: str, tmp_path: Any, origin: Any
) -> None:
    """Observers take flows in batches: shutdown delivers the waiting ones before the
    shared flow writer closes (the last ones were lost, "not recorded", before)."""
    from tests.conftest import PROXY_ARGS, ProxyProcess, read_response

    p = ProxyProcess(tmp_path / "p", *PROXY_ARGS, "--shared-flows-postgresql", dsn)
    try:
        with socket.create_connection(p.address, timeout=10) as s:
            for i in range(5):
                s.sendall(f"GET {origin.url}/echo/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert b" 200 " in read_response(s)[:20]
    finally:
        p.stop()  # at once: the last flows are still waiting for their batch
    assert asyncio.run(rows(dsn)) == 5
    assert "not recorded" not in p.stderr()
