"""Per-host certificates for intercepted tunnels, minted on demand and cached.

Every leaf shares one EC P-256 key made at start-up, so minting a certificate is one
ECDSA signature (well under a millisecond) and never an RSA key generation.  Python's
ssl module loads certificates only from files, so each context is built from files in a
private directory (0700) that are removed right after.  Both the minted certificates and
the SSL contexts live in bounded LRU caches.

Threads: `LeafCache.context` is called from executor threads (the proxy builds the
context for a CONNECT's host off the event loop) and from the event loop (the SNI
callback, for a name the client asks for that differs from the CONNECT host).  One lock
guards the caches and minting; the temporary files are per call.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from eyewall.tls.ca import CertificateAuthority

__all__ = ["LeafCache"]

LEAF_DAYS = 30


class LeafCache:
    """Certificates and server contexts for host names, minted by ``ca``, at most
    ``size`` certificates (and a quarter as many contexts) kept.  Thread-safe."""

    def __init__(self, ca: CertificateAuthority, size: int = 1024) -> None:
        self.ca = ca
        self.size = size
        self.key = ec.generate_private_key(ec.SECP256R1())
        self._certs: OrderedDict[str, bytes] = OrderedDict()  # name -> leaf + CA PEM
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._dir = Path(tempfile.mkdtemp(prefix="eyewall-tls-"))
        os.chmod(self._dir, 0o700)
        self._key_path = self._dir / "leaf.key"
        fd = os.open(self._key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                self.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self._ca_pem = ca.pem()
        self._lock = threading.RLock()

    def mint(self, name: str) -> bytes:
        """The certificate chain (PEM) for ``name``, a host name or IP address."""
        with self._lock:
            return self._mint(name)

    def _mint(self, name: str) -> bytes:
        chain = self._certs.get(name)
        if chain is not None:
            self._certs.move_to_end(name)
            return chain
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alt = x509.DNSName(name)
        now = datetime.datetime.now(datetime.UTC)
        ca_cert = self.ca.cert
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(ca_cert.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca.key.public_key()),
                critical=False,
            )
            .sign(self.ca.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem
        self._certs[name] = chain
        if len(self._certs) > self.size:
            self._certs.popitem(last=False)
        return chain

    def context(self, name: str) -> ssl.SSLContext:
        """A server-side SSL context presenting a certificate for ``name``.  Raises
        OSError (the private directory) or ValueError (a name no certificate can have)."""
        with self._lock:
            return self._context(name)

    def _context(self, name: str) -> ssl.SSLContext:
        ctx = self._contexts.get(name)
        if ctx is not None:
            self._contexts.move_to_end(name)
            return ctx
        fd, path = tempfile.mkstemp(dir=self._dir, suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._mint(name))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(path, self._key_path)
        finally:
            os.unlink(path)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._sni
        self._contexts[name] = ctx
        if len(self._contexts) > max(16, self.size // 4):
            self._contexts.popitem(last=False)
        return ctx

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        """Present the certificate for the name the client asks for (SNI)."""
        if name:
            sslobj.context = self.context(name)

    def __len__(self) -> int:
        return len(self._certs)

    def close(self) -> None:
        """Delete the directory of leaf certificate files."""
        shutil.rmtree(self._dir, ignore_errors=True)
