"""TLS interception: the CA commands, decrypted flows through curl and httpx, refusals,
origin verification, and the certificate cache's bound."""

from __future__ import annotations

import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from eyewall.tls.ca import CertificateAuthority
from eyewall.tls.leaves import LeafCache
from tests.conftest import ROOT, read_response


def eyewall(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "eyewall", *args],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("interception") / "ca"
    result = eyewall("ca", "init", "--ca-dir", str(directory))
    assert result.returncode == 0, result.stderr
    return directory


def rules(tmp_path: Path, ca_dir: Path, bundle: str | None, hosts: str = '["localhost"]') -> str:
    path = tmp_path / "intercept.toml"
    text = f'[tls]\nca_dir = "{ca_dir}"\n'
    if bundle:
        text += f'upstream_ca_bundle = "{bundle}"\n'
    text += f'[[rules]]\nid = "mitm"\naction = "intercept"\nhosts = {hosts}\n'
    path.write_text(text)
    return str(path)


def test_ca_init_and_export(ca_dir):
    key = ca_dir / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    before = (ca_dir / "ca.pem").read_bytes()
    again = eyewall("ca", "init", "--ca-dir", str(ca_dir))  # idempotent: the CA is kept
    assert again.returncode == 0 and b"already exists: kept" in again.stdout
    assert (ca_dir / "ca.pem").read_bytes() == before
    pem = eyewall("ca", "export", "--ca-dir", str(ca_dir))
    assert pem.returncode == 0 and pem.stdout == (ca_dir / "ca.pem").read_bytes()
    assert b"update-ca-certificates" in pem.stderr
    assert f"cp {ca_dir / 'ca.pem'} ".encode() in pem.stderr  # the hints name the real file
    missing = eyewall("ca", "export", "--ca-dir", str(ca_dir.parent / "nowhere"))
    assert missing.returncode == 1
    assert f"eyewall ca init --ca-dir {ca_dir.parent / 'nowhere'}".encode() in missing.stderr
    der = eyewall("ca", "export", "--der", "--ca-dir", str(ca_dir))
    cert = x509.load_der_x509_certificate(der.stdout)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "Eyewall" in cert.subject.rfc4514_string()


def test_curl_and_httpx_through_interception_are_recorded_decrypted(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    p = make_proxy("--config", rules(tmp_path, ca_dir, ca_file))
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(ca_dir / "ca.pem"),
            "-x",
            p.url,
            "-H",
            "X-Inspected-Header: visible-to-the-proxy",
            f"{tls_origin.url}/echo/curl?q=1",
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert b'"/echo/curl?q=1"' in result.stdout
    verify = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    with httpx.Client(proxy=p.url, verify=verify, timeout=10, trust_env=False) as c:
        for i in range(3):
            assert c.post(f"{tls_origin.url}/upload", content=b"x" * i).json()["size"] == i
    with httpx.Client(timeout=10, trust_env=False) as admin:
        flows = admin.get(p.admin_url + "/api/flows?q=/echo/curl").json()["flows"]
        assert len(flows) == 1 and flows[0]["intercepted"]
        assert flows[0]["url"] == f"{tls_origin.url}/echo/curl?q=1"
        detail = admin.get(p.admin_url + f"/api/flows/{flows[0]['id']}").json()
    assert ["X-Inspected-Header", "visible-to-the-proxy"] in detail["request"]["headers"]
    assert detail["response"]["status"] == 200
    line = p.access_entry("/echo/curl")
    assert "rule=mitm" in line and " 200 " in line


def test_without_the_ca_the_client_refuses_and_the_proxy_says_why(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    p = make_proxy("--config", rules(tmp_path, ca_dir, ca_file))
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca_file,
            "-x",
            p.url,
            f"{tls_origin.url}/echo",
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 60  # curl: peer certificate cannot be authenticated
    p.log_with("refused the interception certificate")


def test_pinned_hosts_pass_through_after_a_refusal(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    p = make_proxy("--config", rules(tmp_path, ca_dir, ca_file), "--passthrough-pinned")
    command = [
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        ca_file,
        "-x",
        p.url,
        f"{tls_origin.url}/echo/pinned",
    ]
    assert subprocess.run(command, capture_output=True, check=False).returncode == 60
    second = subprocess.run(command, capture_output=True, check=False)
    assert second.returncode == 0 and b"/echo/pinned" in second.stdout  # the origin's cert


def test_origin_with_an_untrusted_certificate_is_502(make_proxy, tls_origin, ca_dir, tmp_path):
    p = make_proxy("--config", rules(tmp_path, ca_dir, None))  # system store only
    verify = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    with httpx.Client(proxy=p.url, verify=verify, timeout=10, trust_env=False) as c:
        r = c.get(f"{tls_origin.url}/echo")
    assert r.status_code == 502
    assert "certificate of localhost failed verification: unable to get local issuer" in r.text


def test_only_matching_hosts_are_intercepted(make_proxy, tls_origin, ca_file, ca_dir, tmp_path):
    p = make_proxy("--config", rules(tmp_path, ca_dir, ca_file, '["other.example"]'))
    verify = ssl.create_default_context(cafile=ca_file)  # trusts only the origin's CA
    with httpx.Client(proxy=p.url, verify=verify, timeout=10, trust_env=False) as c:
        assert c.get(f"{tls_origin.url}/echo").status_code == 200
    assert "rule=default" in p.access_entry(f"CONNECT {tls_origin.authority}")


def test_tls_bytes_before_the_connect_answer_get_a_clean_close(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path
):
    p = make_proxy("--config", rules(tmp_path, ca_dir, ca_file))
    with socket.create_connection(p.address, timeout=5) as s:
        s.sendall(f"CONNECT {tls_origin.authority} HTTP/1.1\r\n\r\n".encode() + b"\x16\x03\x01")
        assert s.recv(100) == b""
    p.log_with("sent TLS data before the CONNECT answer")
    assert "TLS data sent before the CONNECT answer" in p.access_entry("CONNECT")


@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        (b"CONNECT elsewhere.example:443 HTTP/1.1\r\n\r\n", b"CONNECT inside"),
        (b"GET https://elsewhere.example/ HTTP/1.1\r\nHost: x\r\n\r\n", b"another host"),
    ],
    ids=["connect", "absolute-form"],
)
def test_a_request_for_another_destination_inside_an_intercepted_tunnel_is_refused(
    make_proxy, tls_origin, ca_file, ca_dir, tmp_path, inner, reason
):
    p = make_proxy("--config", rules(tmp_path, ca_dir, ca_file))
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    with socket.create_connection(p.address, timeout=5) as raw:
        raw.sendall(f"CONNECT {tls_origin.authority} HTTP/1.1\r\n\r\n".encode())
        assert read_response(raw, head_only=True).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(inner)
            data = read_response(tls)
    assert data.startswith(b"HTTP/1.1 400") and reason in data


def test_dashboard_offers_the_ca(make_proxy, ca_dir, ca_file, tmp_path):
    p = make_proxy("--config", rules(tmp_path, ca_dir, ca_file))
    r = httpx.get(p.admin_url + "/api/ca.pem", timeout=5, trust_env=False)
    assert r.status_code == 200 and r.content == (ca_dir / "ca.pem").read_bytes()


def test_certificate_cache_stays_bounded_over_10000_hosts(tmp_path):
    cache = LeafCache(CertificateAuthority.create(), size=1024)
    try:
        for i in range(10_000):
            chain = cache.mint(f"host{i}.example")
        assert len(cache) == 1024
        leaf = x509.load_pem_x509_certificate(chain)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["host9999.example"]
        for i in range(300):
            cache.context(f"ctx{i}.example")
        assert len(cache._contexts) <= 256
    finally:
        cache.close()
