"""The interception certificate authority: an EC P-256 key and a self-signed CA
certificate, kept in a directory only its owner can read (``ca.key`` mode 0600)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CertificateAuthority", "default_ca_dir"]

KEY_FILE = "ca.key"
CERT_FILE = "ca.pem"


def default_ca_dir() -> Path:
    """Where the interception CA lives when ``tls.ca_dir`` is unset:
    ``$XDG_DATA_HOME/eyewall/ca`` (default ``~/.local/share``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "eyewall" / "ca"


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class CertificateAuthority:
    """The interception CA: an EC P-256 key and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "Eyewall interception CA", years: int = 10) -> CertificateAuthority:
        """A new CA named ``name``, valid for ``years`` years from a day ago (basic
        constraints CA, path length 0)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Eyewall"),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def save(self, directory: Path) -> None:
        """Write ``ca.key`` (0600) and ``ca.pem``; refuses to overwrite an existing CA."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        if key_path.exists() or cert_path.exists():
            raise FileExistsError(f"a CA already exists in {directory}")
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_path.write_bytes(self.pem())

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Read a CA written by `save`; errors say what is missing or wrong."""
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"no interception CA in {directory} ({e.filename} missing):"
                f" run eyewall ca init --ca-dir {directory}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC private key")
        return cls(key, cert)

    def pem(self) -> bytes:
        """The certificate, PEM-encoded."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def der(self) -> bytes:
        """The certificate, DER-encoded."""
        return self.cert.public_bytes(serialization.Encoding.DER)

    def fingerprint(self) -> str:
        """The certificate's SHA-256 fingerprint as colon-separated hex pairs, upper case."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()
