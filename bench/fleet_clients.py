"""Per-call latency of the Redis and PostgreSQL asyncio clients on loopback, to choose
the fleet's client libraries and to measure what eyewall.shared.redis_limits adds.

    .venv/bin/python -m bench.fleet_clients [--calls 10000] [--json results.json]

Starts its own redis-server and PostgreSQL (tests/services.py), pins them to CPU 0 and
each measuring process to CPU 1, then runs every (client, operation, event loop) in a
fresh interpreter: ``calls`` round trips one after another (latency: median, p99) and
the same number spread over 64 concurrent tasks (calls a second for one worker).

Event loops: "uvloop" (Eyewall's default: uvloop.run, Tornado's IOLoop on top) and
"asyncio" (Tornado's IOLoop on the default asyncio loop).  Requires the optional
clients: redis, coredis, asyncpg, psycopg[binary].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 64  # tasks issuing calls at once in the throughput run
POOL = 16  # connections per Redis client: the tasks share them
PG_POOL = 8  # per PostgreSQL pool; four pools at once stay under max_connections
REDIS_OPS = ["redis-py:ping", "redis-py:evalsha", "coredis:ping", "coredis:evalsha", "eyewall:take"]
PG_OPS = ["asyncpg:select", "asyncpg:insert10", "psycopg:select", "psycopg:insert10"]
LOOPS = ["uvloop", "asyncio"]


# -- one measurement, in its own process ------------------------------------------------------


async def measure(ops: list[str], calls: int, redis_url: str, dsn: str) -> dict[str, Any]:
    """For each of ``ops``: ``calls`` sequential calls, interleaved with the other ops'
    (call 1 of each, call 2 of each, ...) so that a busy machine slows them alike, timed
    by the wall clock (latency) and by this thread's CPU clock (the client's own cost);
    then calls/s with CONCURRENCY tasks sharing the client, one op at a time."""
    from tornado.ioloop import IOLoop

    IOLoop.current()  # Tornado's IOLoop wraps the running loop, as in Eyewall
    clients = {op: await _client(op, redis_url, dsn) for op in ops}
    for call, _ in clients.values():
        for _ in range(200):  # warm up: connections, prepared statements, script cache
            await call()
    wall: dict[str, list[int]] = {op: [] for op in ops}
    cpu: dict[str, int] = dict.fromkeys(ops, 0)
    for _ in range(calls):
        for op, (call, _) in clients.items():
            began, began_cpu = time.perf_counter_ns(), time.thread_time_ns()
            await call()
            cpu[op] += time.thread_time_ns() - began_cpu
            wall[op].append(time.perf_counter_ns() - began)
    results = {}
    per_task = calls // CONCURRENCY
    for op, (call, _) in clients.items():

        async def worker(call: Call = call) -> None:
            for _ in range(per_task):
                await call()

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - began
        latencies = sorted(wall[op])
        results[op] = {
            "median_us": latencies[len(latencies) // 2] / 1000,
            "p99_us": latencies[int(len(latencies) * 0.99)] / 1000,
            "cpu_us": cpu[op] / calls / 1000,
            "concurrent_per_s": per_task * CONCURRENCY / elapsed,
        }
    # Last opened, first closed: coredis clients are nested anyio task groups.
    for _, close in reversed(clients.values()):
        await close()
    return results


Call = Callable[[], Awaitable[Any]]


async def _client(op: str, redis_url: str, dsn: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from eyewall.shared.redis_limits import TOKEN_BUCKETS

    library, operation = op.split(":")
    bucket_args = [1e9, 1e9, 1]  # a bucket that never runs dry: every call is allowed
    if library == "redis-py":
        from redis.asyncio import BlockingConnectionPool, Redis

        r = Redis.from_pool(BlockingConnectionPool.from_url(redis_url, max_connections=POOL))
        script = r.register_script(TOKEN_BUCKETS)
        if operation == "ping":
            return r.ping, r.aclose
        return (lambda: script(keys=["bench:tb:a"], args=bucket_args)), r.aclose
    if library == "coredis":
        import coredis

        c = coredis.Redis.from_url(redis_url, max_connections=POOL)
        await c.__aenter__()
        cscript = c.register_script(TOKEN_BUCKETS)

        async def cclose() -> None:
            await c.__aexit__(None, None, None)

        if operation == "ping":
            return (lambda: c.ping()), cclose  # type: ignore[return-value]
        return (lambda: cscript(keys=["bench:tb:b"], args=bucket_args)), cclose  # type: ignore[return-value]
    if library == "eyewall":
        from eyewall.shared.redis_limits import RedisLimits, RedisLimitsSettings

        limits = RedisLimits.from_settings(
            # Wide time bounds: this measures latency, not how failures are handled.
            RedisLimitsSettings(
                url=redis_url,
                max_connections=POOL,
                prefix="bench",
                connect_timeout=5,
                command_timeout=5,
                down_for=0,
            )
        )
        return (lambda: limits.take("rps", "c", rate=1e9, burst=1e9)), limits.close
    rows = [(f"host{i}.example", 200, 1234) for i in range(10)]
    select = "SELECT id, host, status, bytes FROM bench_flows WHERE id = $1"
    insert = "INSERT INTO bench_flows (host, status, bytes) VALUES ($1, $2, $3)"
    if library == "asyncpg":
        import asyncpg

        pool = await asyncpg.create_pool(dsn, min_size=PG_POOL, max_size=PG_POOL)

        async def a_select() -> Any:
            async with pool.acquire() as conn:
                return await conn.fetchrow(select, 1)

        async def a_insert() -> Any:
            async with pool.acquire() as conn:
                return await conn.executemany(insert, rows)

        return (a_select if operation == "select" else a_insert), pool.close
    import psycopg_pool

    ppool = psycopg_pool.AsyncConnectionPool(dsn, min_size=PG_POOL, max_size=PG_POOL, open=False)
    await ppool.open(wait=True)
    p_select = select.replace("$1", "%s")
    p_insert = insert.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")

    async def p_select_call() -> Any:
        async with ppool.connection() as conn:
            cur = await conn.execute(p_select, (1,), prepare=True)
            return await cur.fetchone()

    async def p_insert_call() -> Any:
        async with ppool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(p_insert, rows)

    return (p_select_call if operation == "select" else p_insert_call), ppool.close


def worker_main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {args.cpu})
    coro = measure(args.op.split(","), args.calls, args.redis_url, args.dsn)
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        from tornado.ioloop import IOLoop

        result = IOLoop(make_current=False).run_sync(lambda: coro)
    print(json.dumps(result))


# -- the orchestrator -------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", help="run only operations containing this text")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    sys.path.insert(0, str(ROOT))
    from tests.services import PostgresServer, RedisServer

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = cpus[0], cpus[-1]
    redis = RedisServer.start()
    postgres = PostgresServer.start()
    results: list[dict[str, Any]] = []
    try:
        os.sched_setaffinity(redis.process.pid, {server_cpu})
        os.sched_setaffinity(postgres.process.pid, {server_cpu})  # backends inherit it
        postgres.psql(
            "CREATE TABLE bench_flows (id bigserial PRIMARY KEY, host text, status int, "
            "bytes bigint)",
            f"ALTER TABLE bench_flows OWNER TO {postgres.user}",
            "INSERT INTO bench_flows (host, status, bytes) VALUES ('a.example', 200, 1)",
            database=postgres.database,
        )
        print(
            f"servers on CPU {server_cpu}, client on CPU {client_cpu}; "
            f"{args.calls} calls each, concurrency {CONCURRENCY}"
        )
        print(f"{'operation':20} {'loop':8} {'median µs':>10} {'p99 µs':>10} "
              f"{'client CPU µs':>14} {'conc/s':>9}")  # fmt: skip
        for group in (REDIS_OPS, PG_OPS):
            ops = [op for op in group if not args.only or args.only in op]
            for loop in LOOPS if ops else []:
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.fleet_clients",
                        "--worker",
                        "--op",
                        ",".join(ops),
                        "--loop",
                        loop,
                        "--calls",
                        str(args.calls),
                        "--redis-url",
                        redis.url,
                        "--dsn",
                        postgres.dsn,
                        "--cpu",
                        str(client_cpu),
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    print(f"{','.join(ops)} {loop} FAILED:\n{done.stderr[-2000:]}")
                    results.append({"ops": ops, "loop": loop, "error": done.stderr[-2000:]})
                    continue
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                for op, r in measured.items():
                    results.append({"op": op, "loop": loop, **r})
                    print(f"{op:20} {loop:8} {r['median_us']:10.1f} {r['p99_us']:10.1f} "
                          f"{r['cpu_us']:14.1f} {r['concurrent_per_s']:9.0f}")  # fmt: skip
    finally:
        redis.stop()
        postgres.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
