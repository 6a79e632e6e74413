"""PEM files for a Redis served over TLS in tests: a CA, a server certificate that names the
loopback address, and a client certificate for ``tls-auth-clients yes``, valid now (real
servers check the clock, unlike the SVID tables' fixed instant).

The certificates come from :mod:`tests.pki` (SPIRE-shaped, whose leaves carry both serverAuth
and clientAuth); only the subject alternative names differ: an IP or DNS name here instead
of a SPIFFE ID, because Redis's clients check the host name.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.pki import Authority, make_root, new_key, to_pem


@dataclass(frozen=True, slots=True)
class RedisTLSFiles:
    """Where one test PKI's files are."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _names(*names: str) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


def key_pem(key: ec.EllipticCurvePrivateKey, *, passphrase: bytes | None = None) -> bytes:
    """A private key as PKCS #8 PEM, encrypted with ``passphrase`` when given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def issue(authority: Authority, directory: Path, stem: str, *names: str) -> tuple[Path, Path]:
    """A certificate for ``names`` (IP addresses or DNS names) and its key, as ``stem.pem`` and
    ``stem-key.pem`` in ``directory``."""
    now = datetime.now(UTC)
    key = new_key()
    cert = authority.leaf(
        key=key,
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
        overrides={x509.SubjectAlternativeName: (_names(*names), False)},
    )
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_path.write_bytes(to_pem(cert))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path


def new_authority() -> Authority:
    """A CA valid now."""
    now = datetime.now(UTC)
    return make_root(
        "redis.test", not_before=now - timedelta(hours=1), not_after=now + timedelta(days=2)
    )


def write_redis_tls_files(
    directory: Path, *, server_names: tuple[str, ...] = ("127.0.0.1",)
) -> RedisTLSFiles:
    """A fresh CA, a server certificate for ``server_names`` and a client certificate, all
    under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = new_authority()
    ca = directory / "ca.pem"
    ca.write_bytes(to_pem(authority.cert))
    server_cert, server_key = issue(authority, directory, "server", *server_names)
    client_cert, client_key = issue(authority, directory, "client", "tasklease-broker")
    return RedisTLSFiles(
        ca=ca,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
    )


def tls_server_config(port: int, files: RedisTLSFiles) -> str:
    """``redis.conf`` lines for a server (or Sentinel) that speaks only TLS on ``port``, asks
    every client for a certificate of the CA, and replicates (or monitors) over TLS."""
    return "\n".join(
        [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {files.server_cert}",
            f"tls-key-file {files.server_key}",
            f"tls-ca-cert-file {files.ca}",
            "tls-auth-clients yes",
            "tls-replication yes",
            "",
        ]
    )
