"""The HTTPS origin of the intercept scenario: a second nginx serving the same
1 KiB file over TLS with keep-alive, with a certificate for `localhost` and
127.0.0.1 issued by a throwaway CA (trustme) created in the run's temp dir.

Started on first use, pinned to the load-generator core, stopped with the
other processes at the end of the run.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from processes import ManagedProcess, free_port, pinned
from systems import nginx_executable

TLS_HOST = "localhost"  # the name clients CONNECT to and verify


@dataclass
class TlsOrigin:
    port: int
    ca_file: Path  # PEM of the throwaway CA that issued the origin's certificate
    nginx_config: str
    process: ManagedProcess


def write_certificates(root: Path) -> tuple[Path, Path, Path]:
    """(CA pem, server chain pem, server key pem) for localhost / 127.0.0.1."""
    try:
        import trustme
    except ImportError:
        raise RuntimeError(
            "trustme is not installed (pip install trustme; it is in eyewall's test extra)"
        ) from None
    ca = trustme.CA(organization_name="eyewall-bench throwaway origin CA")
    server = ca.issue_cert(TLS_HOST, "127.0.0.1")
    ca_file, chain_file, key_file = root / "origin-ca.pem", root / "origin.pem", root / "origin.key"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_pem.write_to_path(str(key_file))
    with open(chain_file, "wb") as chain:
        for blob in server.cert_chain_pems:
            chain.write(blob.bytes())
    return ca_file, chain_file, key_file


def tls_nginx_config(root: Path, www: Path, port: int, chain: Path, key: Path) -> str:
    return textwrap.dedent(f"""\
        worker_processes 1;
        daemon off;
        pid {root}/nginx.pid;
        error_log {root}/nginx-error.log warn;
        events {{ worker_connections 8192; }}
        http {{
            access_log off;
            keepalive_requests 100000000;
            keepalive_timeout 300s;
            client_body_temp_path {root}/client_body;
            proxy_temp_path {root}/proxy_temp;
            fastcgi_temp_path {root}/fastcgi_temp;
            uwsgi_temp_path {root}/uwsgi_temp;
            scgi_temp_path {root}/scgi_temp;
            server {{
                listen 127.0.0.1:{port} ssl backlog=4096;
                server_name {TLS_HOST};
                ssl_certificate {chain};
                ssl_certificate_key {key};
                ssl_protocols TLSv1.2 TLSv1.3;
                ssl_session_cache shared:bench:1m;
                root {www};
            }}
        }}
        """)


def start_tls_origin(root: Path, www: Path, cpu: int | None) -> TlsOrigin:
    executable = nginx_executable()
    if executable is None:
        raise RuntimeError("nginx not found")
    root.mkdir(parents=True, exist_ok=True)
    ca_file, chain, key = write_certificates(root)
    port = free_port()
    config = tls_nginx_config(root, www, port, chain, key)
    config_path = root / "nginx-tls.conf"
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
    process = ManagedProcess("nginx-tls", pinned(command, cpu), root / "nginx.stderr.log")
    process.wait_for_port(port)
    return TlsOrigin(port, ca_file, config, process)
