"""Start the origins shared by all systems: nginx (static files) and origin.py.

Both are pinned to the load-generator core and live for the whole run.
"""

from __future__ import annotations

import json
import os
import select
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from processes import ManagedProcess, pinned
from systems import nginx_executable

SMALL_FILE = "1k"
SMALL_SIZE = 1024
LARGE_FILE = "100m"
LARGE_SIZE = 100 * 1024 * 1024
ORIGIN_SCRIPT = Path(__file__).resolve().parent / "origin.py"


@dataclass
class Origins:
    nginx_port: int
    bulk_port: int
    http_sink_port: int
    echo_port: int
    echo_close_port: int
    upload_body: Path
    www: Path  # the static files (also served by the HTTPS origin)
    nginx_config: str
    processes: list[ManagedProcess]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def nginx_config(root: Path, port: int) -> str:
    return textwrap.dedent(f"""\
        worker_processes 1;
        daemon off;
        pid {root}/nginx.pid;
        error_log {root}/nginx-error.log warn;
        events {{ worker_connections 8192; }}
        http {{
            access_log off;
            sendfile on;
            tcp_nopush on;
            keepalive_requests 100000000;
            keepalive_timeout 300s;
            client_body_temp_path {root}/client_body;
            proxy_temp_path {root}/proxy_temp;
            fastcgi_temp_path {root}/fastcgi_temp;
            uwsgi_temp_path {root}/uwsgi_temp;
            scgi_temp_path {root}/scgi_temp;
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                root {root}/www;
            }}
        }}
        """)


def write_files(www: Path) -> Path:
    """Create the 1 KiB and 100 MiB files; return the upload body path."""
    www.mkdir(parents=True, exist_ok=True)
    (www / SMALL_FILE).write_bytes(os.urandom(SMALL_SIZE))
    large = www / LARGE_FILE
    with open(large, "wb") as handle:
        block = os.urandom(1 << 20)
        for _ in range(LARGE_SIZE // len(block)):
            handle.write(block)
    return large


def start_nginx(root: Path, port: int, cpu: int | None) -> tuple[ManagedProcess, str]:
    executable = nginx_executable()
    if executable is None:
        raise RuntimeError("nginx not found")
    config = nginx_config(root, port)
    config_path = root / "nginx.conf"
    config_path.write_text(config)
    command = [
        executable,
        "-p",
        str(root),
        "-e",
        str(root / "nginx-error.log"),
        "-c",
        str(config_path),
    ]
    process = ManagedProcess("nginx", pinned(command, cpu), root / "nginx.stderr.log")
    process.wait_for_port(port)
    return process, config


def start_raw_origin(root: Path, cpu: int | None) -> tuple[ManagedProcess, dict[str, int]]:
    command = pinned([sys.executable, str(ORIGIN_SCRIPT)], cpu)
    process = ManagedProcess("origin.py", command, root / "origin.stderr.log", stdout_pipe=True)
    assert process.popen.stdout is not None
    ready, _, _ = select.select([process.popen.stdout], [], [], 20)
    line = process.popen.stdout.readline() if ready else b""
    if not line:
        process.stop()
        raise RuntimeError(f"origin.py did not report its ports: {process.log_tail()}")
    ports = json.loads(line)
    for port in ports.values():
        process.wait_for_port(port)
    return process, ports


def start_origins(root: Path, nginx_port: int, cpu: int | None) -> Origins:
    upload_body = write_files(root / "www")
    nginx, config = start_nginx(root, nginx_port, cpu)
    try:
        raw, ports = start_raw_origin(root, cpu)
    except Exception:
        nginx.stop()
        raise
    return Origins(
        nginx_port=nginx_port,
        bulk_port=ports["bulk"],
        http_sink_port=ports["http_sink"],
        echo_port=ports["echo"],
        echo_close_port=ports["echo_close"],
        upload_body=upload_body,
        www=root / "www",
        nginx_config=config,
        processes=[nginx, raw],
    )
