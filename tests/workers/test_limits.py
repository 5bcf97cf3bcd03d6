"""The shared-memory limits store: the same answers as the local store, one set of
limits for every worker slot, counts released when a worker is reaped, bounded memory,
and (with real processes) no lost update and no lock left behind by a dead holder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eyewall.policy.state import AdmissionState
from eyewall.workers.limits import EVICTIONS, OVERFLOWS, TABLES, SharedLimits, create_segment, reap
from eyewall.workers.shm import WAYS, Segment, process_start


@pytest.fixture
def segment() -> Iterator[Segment]:
    s = create_segment()
    yield s
    s.close()


COUNTERS = st.sampled_from(["client_connections", "user_tunnels"])
KEYS = st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1", "alice", "bob"])
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.sampled_from(["client_rps", "user_rps"]), KEYS),
        st.tuples(st.just("acquire"), COUNTERS, KEYS),
        st.tuples(st.just("release"), COUNTERS, KEYS),
        st.tuples(st.just("failed"), KEYS, st.one_of(st.none(), KEYS)),
        st.tuples(st.just("wait"), KEYS, st.one_of(st.none(), KEYS)),
    ),
    max_size=60,
)


@given(OPERATIONS, st.lists(st.floats(0, 5), min_size=60, max_size=60))
def test_answers_as_the_local_store_does(operations, steps) -> None:
    """Any sequence of limit operations gets the answers `AdmissionState` gives."""
    segment = create_segment()
    try:
        local, shared = AdmissionState(), SharedLimits(segment, 0)
        now = 1000.0
        for (op, a, b), step in zip(operations, steps, strict=False):
            now += step
            match op:
                case "take":
                    expected = local.take(a, b, now, 2.0, 3.0)
                    assert shared.take(a, b, now, 2.0, 3.0) == expected
                case "acquire":
                    assert shared.acquire(a, b, 2) == local.acquire(a, b, 2)
                case "release":
                    local.release(a, b)
                    shared.release(a, b)
                case "failed":
                    local.login_failed(a, b, now)
                    shared.login_failed(a, b, now)
                case "wait":
                    assert shared.login_wait(a, b, now) == local.login_wait(a, b, now)
    finally:
        segment.close()


def test_one_bucket_for_every_worker(segment) -> None:
    workers = [SharedLimits(segment, slot) for slot in range(3)]
    granted = [w.take("client_rps", "10.0.0.1", 50.0, 1.0, 10) is None for w in workers * 5]
    assert granted.count(True) == 10  # not 10 per worker
    assert workers[2].take("client_rps", "10.0.0.1", 51.0, 1.0, 10) is None  # one refilled


def test_one_count_for_every_worker(segment) -> None:
    a, b = SharedLimits(segment, 0), SharedLimits(segment, 1)
    assert a.acquire("client_connections", "10.0.0.1", 3)
    assert b.acquire("client_connections", "10.0.0.1", 3)
    assert b.acquire("client_connections", "10.0.0.1", 3)
    assert not a.acquire("client_connections", "10.0.0.1", 3)
    assert a.acquire("client_connections", "10.0.0.2", 3)  # another key
    b.release("client_connections", "10.0.0.1")
    assert a.count("client_connections", "10.0.0.1") == 2
    assert a.acquire("client_connections", "10.0.0.1", 3)


def test_a_worker_releases_only_what_it_holds(segment) -> None:
    a, b = SharedLimits(segment, 0), SharedLimits(segment, 1)
    assert a.acquire("client_tunnels", "k", 0)
    b.release("client_tunnels", "k")  # b holds none: nothing to release
    assert a.count("client_tunnels", "k") == 1


def test_one_login_throttle_for_every_worker(segment) -> None:
    workers = [SharedLimits(segment, slot) for slot in range(2)]
    for i in range(5):  # 5 failures per source, spread over both workers
        workers[i % 2].login_failed("192.0.2.7", f"user{i}", 100.0)
    assert workers[0].login_wait("192.0.2.7", None, 101.0) == pytest.approx(59.0)
    assert workers[1].login_wait("192.0.2.8", None, 101.0) is None
    assert workers[1].login_wait("192.0.2.7", None, 161.0) is None  # the window passed


def test_reaping_a_slot_releases_its_counts_and_frees_it(segment) -> None:
    dead, alive = SharedLimits(segment, 4), SharedLimits(segment, 5)
    with segment.locked():
        segment.set_slot(4, 12345, 678)
    for _ in range(3):
        assert dead.acquire("client_connections", "10.0.0.1", 4)
    assert dead.acquire("user_tunnels", "alice", 0)
    assert alive.acquire("client_connections", "10.0.0.1", 4)
    assert not alive.acquire("client_connections", "10.0.0.1", 4)
    assert reap(segment, 4) == 4
    assert alive.count("client_connections", "10.0.0.1") == 1
    assert alive.count("user_tunnels", "alice") == 0
    assert alive.acquire("client_connections", "10.0.0.1", 4)
    assert segment.slot(4) == (0, 0, 0)
    alive.release("client_connections", "10.0.0.1")
    alive.release("client_connections", "10.0.0.1")
    assert alive.count("client_connections", "10.0.0.1") == 0


def colliding_keys(segment: Segment, table: str, prefix: str, n: int) -> list[str]:
    """``n`` keys whose entries fall in one set of ``table`` (found by trying)."""
    store = SharedLimits(segment, 0)
    t = segment.tables[table]
    by_set: dict[int, list[str]] = {}
    i = 0
    while True:
        key = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        i += 1
        found = by_set.setdefault(store._tag(t, prefix + key)[1], [])
        found.append(key)
        if len(found) == n:
            return found


def test_a_full_set_forgets_the_bucket_updated_longest_ago(segment) -> None:
    store = SharedLimits(segment, 0)
    keys = colliding_keys(segment, "buckets", "b\0client_rps\0", WAYS + 1)
    for t, key in enumerate(keys[:WAYS]):
        assert store.take("client_rps", key, float(t), 0.001, 1) is None  # now empty
    assert store.take("client_rps", keys[1], 10.0, 0.001, 1) is not None
    assert store.take("client_rps", keys[WAYS], 10.0, 0.001, 1) is None  # evicts keys[0]
    assert store.statistics()["evictions"] == 1
    assert store.take("client_rps", keys[0], 10.0, 0.001, 1) is None  # forgotten: full again
    assert store.take("client_rps", keys[1], 10.0, 0.001, 1) is not None  # still remembered


def test_a_full_set_of_counts_lets_through_uncounted(segment) -> None:
    store = SharedLimits(segment, 0)
    keys = colliding_keys(segment, "totals", "t\0client_connections\0", WAYS + 1)
    for key in keys[:WAYS]:
        assert store.acquire("client_connections", key, 1)
    assert store.acquire("client_connections", keys[WAYS], 1)  # fail open ...
    assert store.acquire("client_connections", keys[WAYS], 1)  # ... every time
    assert store.statistics()["overflows"] == 2
    store.release("client_connections", keys[WAYS])  # nothing was counted
    assert not store.acquire("client_connections", keys[0], 1)  # the others still hold


def test_memory_is_fixed_at_creation(segment) -> None:
    size = os.fstat(segment.fd).st_size
    store = SharedLimits(segment, 0)
    for i in range(20_000):
        store.take("client_rps", f"k{i}", 0.0, 1.0, 1)
        store.login_failed(f"10.1.{i >> 8}.{i & 255}", f"u{i}", 0.0)
    assert os.fstat(segment.fd).st_size == size < 32 << 20


def test_another_layout_is_refused(segment) -> None:
    with pytest.raises(ValueError):
        Segment.attach(os.dup(segment.fd), TABLES[:2])


def test_process_start_names_a_live_process_only() -> None:
    assert process_start(os.getpid()) > 0
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert process_start(int(done.stdout)) == 0


def test_statistics_start_at_zero(segment) -> None:
    assert segment.stat(EVICTIONS) == segment.stat(OVERFLOWS) == 0


ATTACH = """
import os, sys
from eyewall.workers.limits import TABLES, SharedLimits
from eyewall.workers.shm import Segment
store = SharedLimits(Segment.attach(int(sys.argv[1]), TABLES), int(sys.argv[2]))
"""


def run_attached(segment: Segment, slot: int, body: str) -> subprocess.Popen[str]:
    code = ATTACH + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code, str(segment.fd), str(slot)],
        pass_fds=[segment.fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_no_token_is_lost_or_granted_twice_between_processes(segment) -> None:
    """Two processes spend one bucket as fast as they can: exactly its burst is
    granted, however their critical sections interleave."""
    body = """
        sys.stdin.readline()  # both start together
        granted = 0
        while store.take("client_rps", "k", 0.0, 1e-9, 100_000) is None:
            granted += 1
        print(granted)
    """
    processes = [run_attached(segment, slot, body) for slot in (0, 1)]
    for p in processes:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    granted = [int(p.communicate(timeout=60)[0]) for p in processes]
    assert sum(granted) == 100_000
    assert all(granted)  # both took part


@pytest.mark.slow
def test_a_holder_that_dies_leaves_no_lock_and_its_counts_are_reaped(segment) -> None:
    body = """
        assert store.acquire("client_connections", "10.0.0.9", 2)
        assert store.acquire("client_connections", "10.0.0.9", 2)
        store.segment.lock()
        print("locked", flush=True)
        os._exit(9)  # killed inside a critical section
    """
    process = run_attached(segment, 7, body)
    assert process.communicate(timeout=60)[0].strip() == "locked"
    store = SharedLimits(segment, 0)
    assert not store.acquire("client_connections", "10.0.0.9", 2)  # locks: no deadlock
    assert reap(segment, 7) == 2
    assert store.acquire("client_connections", "10.0.0.9", 2)
