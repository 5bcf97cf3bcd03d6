"""CPU per flow of the flow store's writer thread, outside the proxy.

    .venv/bin/python bench/flow_store_cost.py [--rows 160000]

Builds flows like the benchmark's small requests (GET of a 1 KiB file through
the proxy, nginx's response head), then times, with the thread's CPU clock
(time.thread_time), what the flow store does per batch of 1,000: `row_of` (on
the event loop, as each flow ends) and `FlowStore._insert` (the writer thread:
sqlite3 binding with the GIL, each statement's step without), into a fresh
database file in a temp dir, with the store's schema and with lighter ones, so
a change to the schema can be judged by its CPU per row. Filling up to --rows
rows shows the cost as the table and its indexes grow.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from eyewall.flow import Flow
from eyewall.http1.parse import Headers, RequestHead, ResponseHead
from eyewall.observe import store
from eyewall.observe.records import row_of

BATCH = 1000


def flows(count: int, prefix: str) -> list[Flow]:
    origin = "127.0.0.1:40577"
    request = RequestHead("GET", f"http://{origin}/1k", "HTTP/1.1", Headers([("Host", origin)]))
    response = ResponseHead(
        "HTTP/1.1",
        200,
        "OK",
        Headers([
            ("Server", "nginx/1.22.1"), ("Date", "Mon, 30 Nov 2026 08:12:14 GMT"),
            ("Content-Type", "text/plain"), ("Content-Length", "1024"),
            ("Last-Modified", "Mon, 30 Nov 2026 08:12:12 GMT"), ("ETag", '"6b0d2fdc-400"'),
            ("Accept-Ranges", "bytes"), ("Via", "1.1 eyewall"),
        ]),
    )  # fmt: skip
    now = time.time()
    out = []
    for i in range(count):
        flow = Flow(f"{prefix}-{i:x}", "http", ("127.0.0.1", 40000 + i % 20000), now + i * 1e-4)
        flow.method, flow.url, flow.host, flow.port = "GET", request.target, "127.0.0.1", 40577
        flow.request, flow.response, flow.status = request, response, 200
        flow.upstream, flow.reused, flow.bytes_out = origin, True, 1024
        flow.t_response, flow.duration, flow.rule = 0.0008, 0.0009, "default"
        out.append(flow)
    return out


SCHEMAS = {
    "store as is: id TEXT PRIMARY KEY, index on started, INSERT OR REPLACE": (None, None),
    "rowid table (no PRIMARY KEY on id), index on started, INSERT": ("TEXT PRIMARY KEY", None),
    "rowid table, no index, INSERT": ("TEXT PRIMARY KEY", "CREATE INDEX"),
}


def measure(label: str, rows_wanted: int, directory: Path) -> None:
    drop_pk, drop_index = SCHEMAS[label]
    schema, insert, insert_many = store._SCHEMA, store._INSERT, store._INSERT_MANY
    if drop_pk:
        schema = schema.replace(drop_pk, "")
        insert = insert.replace("INSERT OR REPLACE", "INSERT")
        insert_many = insert_many.replace("INSERT OR REPLACE", "INSERT")
    if drop_index:
        schema = schema.split(drop_index)[0]
    path = directory / f"flows-{len(list(directory.iterdir()))}.sqlite3"
    db = store._connect(path)
    db.executescript(schema)
    saved = store._INSERT, store._INSERT_MANY
    store._INSERT, store._INSERT_MANY = insert, insert_many
    rows_cpu = insert_cpu = 0.0
    done = 0
    try:
        while done < rows_wanted:
            batch = flows(BATCH, f"{done:x}")
            t0 = time.thread_time()
            rows = [row_of(f) for f in batch]
            t1 = time.thread_time()
            store.FlowStore._insert(db, rows)
            t2 = time.thread_time()
            rows_cpu += t1 - t0
            insert_cpu += t2 - t1
            done += len(batch)
    finally:
        store._INSERT, store._INSERT_MANY = saved
        db.close()
    print(
        f"| {label} | {rows_cpu / done * 1e6:.1f} | {insert_cpu / done * 1e6:.1f} "
        f"| {(rows_cpu + insert_cpu) / done * 1e6:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=160_000)
    args = parser.parse_args()
    print(f"CPU µs per flow, {args.rows} rows in batches of {BATCH}:\n")
    print("| schema | row_of | _insert | total |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        for label in SCHEMAS:
            measure(label, args.rows, Path(directory))


if __name__ == "__main__":
    main()
