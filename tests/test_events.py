"""Finished flows reach their observers in small batches, all of them, in order."""

from __future__ import annotations

import asyncio
import time

from eyewall.flow import Flow
from eyewall.observe.events import BATCH, EventBus


def flow(i: int) -> Flow:
    return Flow(f"f-{i}", "http", ("127.0.0.1", 1), time.time())


def test_without_an_event_loop_a_flow_is_delivered_at_once() -> None:
    bus = EventBus()
    seen: list[str] = []
    bus.subscribe(lambda f: seen.append(f.id))
    bus.publish(flow(1))
    assert seen == ["f-1"]


def test_flows_wait_for_their_batch_and_every_one_arrives_in_order() -> None:
    async def main() -> None:
        bus = EventBus()
        first: list[str] = []
        second: list[str] = []
        arrived = asyncio.Event()
        bus.subscribe(lambda f: first.append(f.id))

        def last(f: Flow) -> None:
            second.append(f.id)
            arrived.set()

        bus.subscribe(last)
        bus.publish(flow(1))
        bus.publish(flow(2))
        assert first == second == []  # waiting for the batch
        await asyncio.wait_for(arrived.wait(), 10)  # the timer delivers them
        assert first == second == ["f-1", "f-2"]
        for i in range(BATCH):  # a full batch goes at once
            bus.publish(flow(10 + i))
        assert len(first) == 2 + BATCH
        bus.publish(flow(99))
        bus.flush()  # what a reader of the observers calls first
        assert first[-1] == second[-1] == "f-99"

    asyncio.run(main())


def test_a_failing_observer_costs_the_others_nothing(caplog) -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(f: Flow) -> None:
        raise RuntimeError("observer bug")

    bus.subscribe(broken)
    bus.subscribe(lambda f: seen.append(f.id))
    bus.publish(flow(1))
    bus.publish(flow(2))
    assert seen == ["f-1", "f-2"]
    assert sum("flow observer" in r.getMessage() for r in caplog.records) == 2
