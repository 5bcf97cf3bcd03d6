"""The in-memory flow window is bounded by what its flows really hold (class 10): the
window keeps each flow's row (heads as text, capped), and its byte bound holds for
what those rows allocate."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc

from eyewall.errors import ErrorKind
from eyewall.flow import Flow
from eyewall.http1.parse import parse_request_head
from eyewall.observe.records import parse_heads
from eyewall.observe.store import (
    KEPT_FIELDS,
    REFUSED_FIELDS,
    FlowStore,
    read_records,
    summarise,
)
from eyewall.observe.writer import BatchWriter

SHORT_FIELDS = b"".join(b"X%d: v\r\n" % i for i in range(6300))  # ~62 KB on the wire
HEAD = b"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n" + SHORT_FIELDS + b"\r\n"


def flow(i: int, refused: bool) -> Flow:
    f = Flow(f"t-{i}", "http", ("127.0.0.1", 1), time.time())
    f.request = parse_request_head(HEAD)
    f.head_bytes = len(HEAD)
    if refused:
        f.fail(ErrorKind.AUTH_REQUIRED, "proxy authentication required")
    else:
        f.upstream = "192.0.2.1:80"
    return f


def retained(store: FlowStore, count: int, refused: bool) -> int:
    """Bytes still allocated after feeding ``count`` flows to ``store``."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            store(flow(i, refused))
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_the_window_bounds_what_admitted_flows_really_hold() -> None:
    bound = 256 << 10
    store = FlowStore(None, 0, 0, memory=10_000, memory_bytes=bound)
    held = retained(store, 300, refused=False)  # ~3 KiB each once capped (62 KiB whole)
    assert 0 < len(store.recent) < 300
    assert held <= bound * 1.25, f"{held / 2**10:.0f} KiB held for a {bound >> 10} KiB bound"
    assert held >= bound * 0.5, f"{held / 2**10:.0f} KiB held: the estimate is far too high"


def stored_fields(store: FlowStore) -> list[list[str]]:
    return parse_heads(next(store.recent_records())["request_headers"])


def test_admitted_flows_keep_their_first_fields_and_a_note() -> None:
    store = FlowStore(None, 0, 0, memory=100, memory_bytes=64 << 20)
    store(flow(1, refused=False))
    fields = stored_fields(store)
    assert len(fields) == KEPT_FIELDS + 1
    assert fields[-1] == ["X-Eyewall-Omitted", f"6045 more fields ({len(HEAD)} byte head)"]


def test_a_writer_that_is_behind_keeps_the_small_flows_of_a_batch(tmp_path) -> None:
    """A burst of big heads must not cost other clients their records: when the batch
    does not fit the writer's bound, the small flows are recorded, the big ones
    dropped (and counted)."""

    async def main() -> tuple[list[str], int]:
        writer = BatchWriter(max_pending=48 << 10)
        store = FlowStore(tmp_path / "f.sqlite3", 10_000, 3600, 100, writer=writer)
        for i in range(30):  # interleaved: big ones (~3 KiB each capped), small ones (~1 KiB)
            store(flow(i, refused=False))
            small = Flow(f"small-{i}", "http", ("127.0.0.2", 1), time.time())
            small.request = parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
            small.upstream = "192.0.2.1:80"
            store(small)
        store.flush()
        store.close()
        writer.close()
        return [r["id"] for r in read_records(tmp_path / "f.sqlite3", limit=100)], store.dropped

    recorded, dropped = asyncio.run(main())
    assert 0 < dropped < 30  # only big ones were dropped
    assert {f"small-{i}" for i in range(30)} <= set(recorded)
    assert len(recorded) == 60 - dropped  # every flow kept was written
    assert any(r.startswith("t-") for r in recorded)  # big ones too, as far as room went


def test_refused_flows_keep_a_capped_summary() -> None:
    store = FlowStore(None, 0, 0, memory=2_000, memory_bytes=64 << 20)
    held = retained(store, 300, refused=True)
    assert len(store.recent) == 300
    assert held / 300 < 24 << 10, f"{held / 300 / 1024:.0f} KiB per refused flow"
    fields = stored_fields(store)
    assert len(fields) == REFUSED_FIELDS + 1
    assert fields[-1] == ["X-Eyewall-Omitted", f"6269 more fields ({len(HEAD)} byte head)"]


def test_a_small_refused_head_is_kept_whole() -> None:
    f = Flow("t-1", "http", ("127.0.0.1", 1), time.time())
    f.request = parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n")
    f.fail(ErrorKind.AUTH_REQUIRED, "proxy authentication required")
    summarise(f)
    assert f.request.headers.fields == [("Host", "a"), ("X", "1")]


def small_flow(i: int, cookie: str = "") -> Flow:
    f = Flow(f"s-{i}", "http", ("127.0.0.1", 1), time.time())
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    f.request = parse_request_head(f"GET http://a/ HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode())
    f.upstream = "192.0.2.1:80"
    return f


def test_a_new_store_starts_with_the_most_recent_recorded_flows(tmp_path) -> None:
    async def record() -> None:
        writer = BatchWriter()
        store = FlowStore(tmp_path / "f.sqlite3", 10_000, 3600, 100, writer=writer)
        for i in range(5):
            store(small_flow(i))
        store.close()
        writer.close()

    asyncio.run(record())

    async def reopen() -> list[str]:
        writer = BatchWriter()
        store = FlowStore(tmp_path / "f.sqlite3", 10_000, 3600, 3, writer=writer)
        ids = [r["id"] for r in store.recent_records()]
        store.close()
        writer.close()
        return ids

    assert asyncio.run(reopen()) == ["s-4", "s-3", "s-2"]  # newest first, within the bound


def test_configure_changes_redaction_for_the_next_flows_and_trims_the_window() -> None:
    store = FlowStore(None, 0, 0, memory=10, memory_bytes=64 << 20)
    store(small_flow(1, "session=one"))
    store.configure(1, 1.0, 1 << 20, 10, 64 << 20, credentials=True)
    store(small_flow(2, "session=two"))
    store.configure(1, 1.0, 1 << 20, 1, 64 << 20, credentials=False)
    records = list(store.recent_records())
    assert [r["id"] for r in records] == ["s-2"]  # trimmed to the new bound at once
    assert "Cookie: session=two" in records[0]["request_headers"]  # as recorded
    store(small_flow(3, "session=three"))
    assert "Cookie: [redacted]" in next(store.recent_records())["request_headers"]


def test_the_request_line_and_reason_phrase_count_and_a_refused_one_is_capped() -> None:
    """A method, a target and a reason phrase can each be as long as a head: the window's
    bound counts them, and a refused request keeps only the start of its request line."""
    from eyewall.http1.parse import Headers, ResponseHead

    def long_flow(i: int) -> Flow:
        f = small_flow(i)
        if i % 2:  # refused: a 60 KB method, then a 60 KB target
            f.method, f.url = "X" * 60_000, "http://a/" + "p" * 60_000
            f.upstream = ""
            f.fail(ErrorKind.BAD_REQUEST, "this is a forward proxy")
        else:  # an origin's 60 KB reason phrase
            f.response = ResponseHead("HTTP/1.1", 200, "R" * 60_000, Headers([]))
        return f

    bound = 1 << 20
    store = FlowStore(None, 0, 0, memory=10_000, memory_bytes=bound)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(120):
            store(long_flow(i))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= bound * 1.25, f"{held / 2**20:.1f} MiB held for a 1 MiB bound"
    refused = next(r for r in store.recent_records() if r["error"] is not None)
    assert len(refused["method"]) < 40 and len(refused["url"]) < 2100


def test_an_access_log_turned_on_by_reload_sees_flows_before_the_store_caps_them(
    tmp_path,
) -> None:
    """At start-up the access log is the first observer; one a reload turns on must be
    too, or it would log the request line of a refused flow as the store cut it."""
    import dataclasses

    from eyewall.app import Observers
    from eyewall.config import Settings
    from eyewall.observe.accesslog import AccessLog

    async def main() -> None:
        flows = dataclasses.replace(Settings().flows, path=str(tmp_path / "f.sqlite3"))
        off = dataclasses.replace(
            Settings(),
            access_log="off",
            flows=flows,
            admin=dataclasses.replace(Settings().admin, listen="off"),
        )
        observers = Observers(off, None, lambda: None)
        assert len(observers.bus.subscribers) == 1  # the flow store
        on = dataclasses.replace(off, access_log=str(tmp_path / "access.log"))
        observers.reconfigure(off, on)
        assert isinstance(observers.bus.subscribers[0], AccessLog)
        await observers.stop()

    asyncio.run(main())
