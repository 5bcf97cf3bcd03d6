"""Memory per idle keep-alive client connection: Eyewall's RSS (summed over its process
tree) before and after N connections that each made one request and stay open.

    .venv/bin/python bench/connection_memory.py [--connections 5000] [--workers 1]

The request is answered by the proxy itself (403: a private destination), so no origin
is needed and each connection ends idle between requests, with its buffers as they are
after one exchange.  20 warm-up connections are opened and closed first.  Kernel socket
buffers are not in RSS; on an idle connection they hold nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUEST = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n"


def tree_rss_kib(pid: int) -> tuple[int, int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, count, pending = 0, 0, [pid]
    while pending:
        p = pending.pop()
        pending += children.get(p, [])
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                count += 1
    return total, count


def exchange(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("the proxy closed the connection")
        data += chunk
        if b"Content-Length:" in data and b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                break
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--workers", default="1")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fd, name = tempfile.mkstemp(prefix="eyewall-connection-memory-", suffix=".log")
    os.close(fd)
    log = Path(name)
    with open(log, "wb") as stderr:
        proxy = subprocess.Popen(
            [sys.executable, "-m", "eyewall", "--listen", "127.0.0.1:0", "--admin-listen",
             "off", "--no-flows", "--flows-memory", "0", "--access-log", "off",
             "--workers", args.workers,
             "--client-connections", "0", "--max-connections", str(args.connections + 100)],
            stderr=stderr, cwd=REPO,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while " listening on " not in log.read_text():
            if time.monotonic() > deadline or proxy.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.05)
        line = next(x for x in log.read_text().splitlines() if " listening on " in x)
        port = int(line.rsplit(":", 1)[1])
        for _ in range(20):
            exchange(port).close()
        time.sleep(1.0)  # let the warm-up's garbage go
        before, processes = tree_rss_kib(proxy.pid)
        held = [exchange(port) for _ in range(args.connections)]
        time.sleep(1.0)
        after, _ = tree_rss_kib(proxy.pid)
        per = (after - before) / len(held)
        print(
            f"workers={args.workers} processes={processes} connections={len(held)}"
            f" rss_before_kib={before} rss_after_kib={after} kib_per_connection={per:.1f}"
        )
        for s in held:
            s.close()
    finally:
        proxy.terminate()
        proxy.wait(30)
        log.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
