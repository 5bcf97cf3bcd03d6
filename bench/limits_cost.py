"""What the shared limits cost per request: `AdmissionState` (one process's dicts)
against `SharedLimits` (shared memory, one lock), in-process, in µs per operation.

    .venv/bin/python bench/limits_cost.py [--rounds N] [--json FILE]

Operations, each timed over many calls with `time.perf_counter` (median of 7 rounds,
and the range):

* ``take``: one token of ``client_rps`` (what every request costs when a rate limit is
  set);
* ``acquire+release``: one connection counted and released (``client_connections``,
  on by default: once per connection, not per request);
* ``login_wait``: the login throttle's lookup (only for a login not in the cache);
* ``take, 2 processes``: two processes spending the same bucket as fast as they can,
  the lock contended all the time (the per-call cost each sees).

Keys vary over 1,000 client addresses, as traffic from many clients does.  The numbers
are single-thread CPU costs; divide by nothing.  Standard library plus Eyewall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eyewall.policy.state import AdmissionState  # noqa: E402
from eyewall.workers.limits import SharedLimits, create_segment  # noqa: E402
from eyewall.workers.shm import Segment  # noqa: E402

CALLS = 100_000
KEYS = [f"10.0.{i >> 8}.{i & 255}" for i in range(1000)]


def per_call(work: Any, calls: int) -> float:
    start = time.perf_counter()
    work(calls)
    return (time.perf_counter() - start) / calls * 1e6


def operations(store: Any) -> dict[str, Any]:
    keys = KEYS

    def take(calls: int) -> None:
        t = 0.0
        for i in range(calls):
            t += 1e-5
            store.take("client_rps", keys[i % 1000], t, 1e6, 1e6)

    def acquire_release(calls: int) -> None:
        for i in range(calls):
            key = keys[i % 1000]
            store.acquire("client_connections", key, 256)
            store.release("client_connections", key)

    def login_wait(calls: int) -> None:
        for i in range(calls):
            store.login_wait(keys[i % 1000], "alice", 1.0)

    return {"take": take, "acquire+release": acquire_release, "login_wait": login_wait}


CONTENDER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from eyewall.workers.limits import TABLES, SharedLimits
from eyewall.workers.shm import Segment
store = SharedLimits(Segment.attach(int(sys.argv[1]), TABLES), int(sys.argv[2]))
sys.stdin.readline()
start = time.perf_counter()
for i in range(100_000):
    store.take("client_rps", "10.9.9.9", float(i), 1e6, 1e6)
print((time.perf_counter() - start) / 100_000 * 1e6)
"""


def contended(segment: Segment) -> float:
    """µs per take when two processes hammer one bucket at once (the mean of both)."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(segment.fd), str(slot), str(REPO)],
            pass_fds=[segment.fd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for slot in (1, 2)
    ]
    for p in processes:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    return statistics.mean(float(p.communicate(timeout=120)[0]) for p in processes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    segment = create_segment()
    stores = {"local": AdmissionState(), "shared": SharedLimits(segment, 0)}
    results: dict[str, dict[str, list[float]]] = {}
    for name, store in stores.items():
        for op, work in operations(store).items():
            work(10_000)  # warm: caches, pages of the segment
            runs = [per_call(work, CALLS) for _ in range(args.rounds)]
            results.setdefault(op, {})[name] = runs
    results["take, 2 processes"] = {"shared": [contended(segment) for _ in range(3)]}
    print(f"{'operation':<22} {'local µs':>16} {'shared µs':>16} {'shared - local':>15}")
    summary: dict[str, Any] = {}
    for op, by_store in results.items():
        row = {}
        cells = []
        for name in ("local", "shared"):
            runs = by_store.get(name)
            if runs is None:
                cells.append(f"{'—':>16}")
                continue
            median = statistics.median(runs)
            row[name] = {"median": median, "min": min(runs), "max": max(runs)}
            cells.append(f"{median:6.2f} ({min(runs):.2f}-{max(runs):.2f})".rjust(16))
        extra = row["shared"]["median"] - row["local"]["median"] if "local" in row else None
        print(f"{op:<22} {cells[0]} {cells[1]} {'' if extra is None else f'{extra:+.2f}':>15}")
        summary[op] = row
    if args.json:
        meta = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "calls": CALLS}
        args.json.write_text(json.dumps({"meta": meta, "results": summary}, indent=2) + "\n")
    segment.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
