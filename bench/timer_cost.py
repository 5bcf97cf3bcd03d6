#!/usr/bin/env python3
"""Cost per request of the two ways to bound waits: three asyncio.timeout() scopes
(head read, upstream head, body) versus three Watch.enter() calls, on uvloop."""

import asyncio
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eyewall.proxy.timeouts import Phase, Watch

N = 200_000


async def with_timeouts():
    loop = asyncio.get_running_loop()
    fut_done = loop.create_future()
    fut_done.set_result(None)
    start = time.perf_counter()
    for _ in range(N):
        for _ in range(3):
            async with asyncio.timeout(10):
                await fut_done
    return (time.perf_counter() - start) / N


async def with_watch():
    loop = asyncio.get_running_loop()
    fut_done = loop.create_future()
    fut_done.set_result(None)
    w = Watch(lambda p: None)
    start = time.perf_counter()
    for _ in range(N):
        for phase in (Phase.CLIENT_HEAD, Phase.WAITING, Phase.RESPONDING):
            w.enter(phase, 1.0, 10.0, None if not phase.idle else (lambda: 0))
            await fut_done
    return (time.perf_counter() - start) / N


async def bare():
    loop = asyncio.get_running_loop()
    fut_done = loop.create_future()
    fut_done.set_result(None)
    start = time.perf_counter()
    for _ in range(N):
        for _ in range(3):
            await fut_done
    return (time.perf_counter() - start) / N


async def sweep_cost():
    w = [Watch(lambda p: None) for _ in range(10_000)]
    for x in w:
        x.enter(Phase.IDLE, 0.0, 60.0)
    start = time.perf_counter()
    for _ in range(20):
        for x in w:
            x.check(1.0)
    return (time.perf_counter() - start) / 20


for name, fn in (("bare", bare), ("timeout", with_timeouts), ("watch", with_watch)):
    results = sorted(uvloop.run(fn()) for _ in range(5))
    print(f"{name}: {results[2] * 1e6:.2f} us per request (3 waits)")
print(f"sweep of 10,000 idle connections: {uvloop.run(sweep_cost()) * 1e3:.2f} ms")
