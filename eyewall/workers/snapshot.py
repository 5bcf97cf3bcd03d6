"""A configuration checked once and applied everywhere: the supervisor validates the
files (`eyewall.app.Loader`) and sends the result to every worker as a `Snapshot` —
the settings, the exact htpasswd text it checked and the CA — so a worker never reads
a file the supervisor did not check, and a bad file changes nothing anywhere."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from eyewall.app import Loaded, build_policy
from eyewall.config import ConfigError
from eyewall.tls.ca import CertificateAuthority
from eyewall.workers.wire import Snapshot

__all__ = ["loaded_of", "snapshot_of"]


def snapshot_of(loaded: Loaded) -> Snapshot:
    """The snapshot of a configuration `Loader.load` accepted.  Raises ConfigError
    when the htpasswd file changed since and no longer reads or validates."""
    settings = loaded.settings
    htpasswd = None
    if settings.auth.htpasswd:
        try:
            with open(settings.auth.htpasswd, encoding="utf-8", errors="replace") as f:
                htpasswd = f.read()
        except OSError as e:
            raise ConfigError(f"auth.htpasswd: cannot read {settings.auth.htpasswd}: {e}") from None
        text = htpasswd
        build_policy(settings, lambda _: text)  # the text sent is the text checked
    ca = None
    if loaded.ca is not None:
        key = loaded.ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ca = (key, loaded.ca.pem())
    return Snapshot(settings, htpasswd, ca)


def loaded_of(snapshot: Snapshot) -> Loaded:
    """The configuration of a snapshot (in a worker).  Raises ConfigError only if the
    supervisor sent something it did not check."""
    text = snapshot.htpasswd

    def read(path: str) -> str:
        if text is None:
            raise OSError(f"{path} was not part of the checked configuration")
        return text

    policy = build_policy(snapshot.settings, read)
    ca = None
    if snapshot.ca is not None:
        key = serialization.load_pem_private_key(snapshot.ca[0], password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("tls.ca_dir: not an EC private key")
        ca = CertificateAuthority(key, x509.load_pem_x509_certificate(snapshot.ca[1]))
    return Loaded(snapshot.settings, policy, ca)
