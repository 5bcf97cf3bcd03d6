"""Keep-alive GETs through a proxy with every request's time recorded.

    python bench/timed_client.py PROXY_PORT ORIGIN PATH CONNECTIONS SECONDS WARMUP OUT

Like wrk -cN (one request at a time per connection, absolute-form through
the proxy), but it writes each measured request's (send time, latency) in
seconds to OUT as JSON, send times on time.monotonic() (the clock
bench/stall_probe.py stamps its records with), so a slow request can be laid
beside what the proxy was doing at that moment. Used by bench/loop_stalls.py
--client timed. Every response must be 200 with a Content-Length body.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


FIRST_ERROR: list[str] = []


async def connection(
    port: int, request: bytes, start: float, end: float, out: list[tuple[float, float]]
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors = 0
    now = time.monotonic
    try:
        while True:
            sent = now()
            if sent >= end:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = now()
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
                if not FIRST_ERROR:
                    FIRST_ERROR.append(head[:200].decode("latin-1"))
            elif sent >= start:
                out.append((sent, done - sent))
    finally:
        writer.close()
    return errors


async def main() -> None:
    port, origin, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    connections, seconds, warmup = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    request = f"GET http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\n\r\n".encode()
    start = time.monotonic() + warmup
    end = start + seconds
    samples: list[tuple[float, float]] = []
    errors = await asyncio.gather(
        *(connection(port, request, start, end, samples) for _ in range(connections))
    )
    with open(sys.argv[7], "w") as out:
        json.dump(
            {
                "start": start,
                "end": end,
                "errors": sum(errors),
                "first_error": FIRST_ERROR[0] if FIRST_ERROR else None,
                "samples": samples,
            },
            out,
        )


if __name__ == "__main__":
    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())
