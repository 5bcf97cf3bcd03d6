"""CPU per flow of the observers, where they run: in the one process (``workers = 1``)
or in the supervisor, fed by workers (``workers > 1``).

    .venv/bin/python bench/observer_cost.py [--flows 50000] [--rounds 5]

Builds flows like the benchmark's small requests (bench/flow_store_cost.py), then
times, with the process's CPU clock (all its threads: the writer thread too), in an
event loop with the default observers (JSON access log to a file, flow store in
SQLite, metrics, live feed):

* ``worker: pack`` — what a worker spends per flow instead of observing it: the record
  and its share of a marshalled batch of 50 (`eyewall.workers.wire.pack`);
* ``supervisor: unpack`` — the supervisor rebuilding flows from batches;
* ``observers`` — publishing flows to the observers, their writer included (the same
  code in a single process and in a supervisor), paced so that the writer never falls
  behind far enough to drop anything;
* ``supervisor: unpack + observers`` — the supervisor's whole cost per flow;
* the observers again with the flow store off (``--no-flows``), the access log off, and
  both (metrics and the live feed remain: the admin listener's).

Median of the rounds, and the range.  The writer's work is finished (``close``) before
the clock stops.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flow_store_cost import flows as make_flows

from eyewall.config import load_settings
from eyewall.workers.wire import HEAD, pack, unpack

BATCH = 50


VARIANTS = {
    "observers": {},
    "observers, --no-flows": {"flows.enabled": False},
    "observers, --access-log off": {"access_log": "off"},
    "observers, both off (metrics, live)": {"flows.enabled": False, "access_log": "off"},
}


async def observe(flows: list, directory: Path, overrides: dict[str, object]) -> float:
    """CPU seconds to publish ``flows`` to the observers ``overrides`` leave on (all by
    default) and write everything."""
    from eyewall.app import Observers

    class Stats:
        def gauges(self) -> dict[str, float]:
            return {"connections": 0.0, "tunnels": 0.0, "pool_idle": 0.0}

        def healthy(self) -> bool:
            return True

    settings = load_settings(
        None,
        {
            "access_log": str(directory / "access.log"),
            "log_format": "json",
            "flows.path": str(directory / "flows.sqlite3"),
            "admin.listen": "127.0.0.1:0",
            **overrides,
        },
    )
    observers = Observers(settings, Stats(), lambda: None)
    start = time.process_time()
    writer = observers.writer
    for i in range(0, len(flows), BATCH):
        for flow in flows[i : i + BATCH]:
            observers.bus.publish(flow)
        await asyncio.sleep(0)  # the loop turns, timers flush as in the proxy
        while writer._pending > writer.max_pending // 4:  # never so far behind it drops
            await asyncio.sleep(0.001)  # waiting costs no CPU time
    await observers.stop()  # flushes, and joins the writer thread
    return time.process_time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n = args.flows
    gc.set_threshold(50_000, 50, 100)  # as the proxy's processes run
    gc.freeze()
    results: dict[str, list[float]] = {}
    for r in range(args.rounds):
        flows = make_flows(n, f"r{r}")
        start = time.process_time()
        frames = [pack(flows[i : i + BATCH]) for i in range(0, n, BATCH)]
        results.setdefault("worker: pack", []).append((time.process_time() - start) / n)
        start = time.process_time()
        rebuilt = [f for frame in frames for f in unpack(frame[HEAD.size :], 1)]
        unpacking = (time.process_time() - start) / n
        results.setdefault("supervisor: unpack", []).append(unpacking)
        for name, overrides in VARIANTS.items():
            with tempfile.TemporaryDirectory() as tmp:
                observing = asyncio.run(observe(rebuilt, Path(tmp), overrides)) / n
            results.setdefault(name, []).append(observing)
            if not overrides:
                total = unpacking + observing
                results.setdefault("supervisor: unpack + observers", []).append(total)
    print(f"{'per flow':<32} {'µs (median)':>12} {'range':>16}")
    for name, values in results.items():
        us = [v * 1e6 for v in values]
        print(f"{name:<32} {statistics.median(us):12.1f} {min(us):7.1f} - {max(us):6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
