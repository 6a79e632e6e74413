"""A small test PKI that issues SPIRE-shaped X.509-SVIDs, one defect at a time.

By default every certificate looks like what SPIRE (ECDSA P-256) issues:

* root: self-signed, subject ``C=US,O=SPIFFE``, URI SAN ``spiffe://<td>``, KeyUsage
  keyCertSign|cRLSign (critical), BasicConstraints cA=true (critical), SKI;
* intermediate (optional): the same shape, issued by the root, with an AKI;
* leaf: subject ``C=US,O=SPIRE,x500UniqueIdentifier=<hex>``, URI SAN ``spiffe://<td>/<path>``,
  KeyUsage digitalSignature|keyEncipherment|keyAgreement (critical), EKU serverAuth+clientAuth,
  BasicConstraints cA=false (critical), SKI, AKI, one hour of validity.

Every extension can be replaced (``overrides={x509.KeyUsage: (value, critical)}``) or removed
(``overrides={x509.BasicConstraints: None}``), and dates, keys, subjects and URIs are
parameters, so a table row changes exactly one thing. :func:`resign` rewrites the signed bytes
of a certificate for defects that ``CertificateBuilder`` refuses to produce (a repeated
extension, a non-ASCII URI).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
"""The instant tests verify at; default validity windows are placed around it."""

LEAF_LIFETIME = timedelta(hours=1)

ExtensionSpec = tuple[x509.ExtensionType, bool]
"""An extension value and its criticality."""

Overrides = Mapping[type[x509.ExtensionType], ExtensionSpec | None]
"""Per extension type: a replacement, or None to leave the extension out."""


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key, SPIRE's default key type."""
    return ec.generate_private_key(ec.SECP256R1())


def key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A KeyUsage value naming only the bits that matter to SVIDs."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


LEAF_KEY_USAGE = key_usage(digital_signature=True, key_encipherment=True, key_agreement=True)
CA_KEY_USAGE = key_usage(key_cert_sign=True, crl_sign=True)
SPIRE_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def uri_sans(*uris: str) -> x509.SubjectAlternativeName:
    """A SubjectAlternativeName holding exactly these URIs."""
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri) for uri in uris])


@dataclass(frozen=True)
class Authority:
    """A CA certificate and its key: a root or an intermediate of one trust domain."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    trust_domain: str

    def intermediate(
        self,
        *,
        trust_domain: str | None = None,
        not_before: datetime = NOW - timedelta(days=1),
        not_after: datetime = NOW + timedelta(days=30),
        key: CertificateIssuerPrivateKeyTypes | None = None,
        overrides: Overrides | None = None,
    ) -> Authority:
        """Issue a SPIRE-shaped signing certificate under this authority."""
        trust_domain = trust_domain or self.trust_domain
        key = key or new_key()
        subject = _name(
            (NameOID.COUNTRY_NAME, "US"),
            (NameOID.ORGANIZATION_NAME, "SPIFFE"),
            (NameOID.SERIAL_NUMBER, secrets.token_hex(4)),
        )
        extensions = _ca_extensions(trust_domain, key.public_key())
        extensions[x509.AuthorityKeyIdentifier] = (self._authority_key_id(), False)
        cert = _build(
            subject,
            self,
            key.public_key(),
            not_before=not_before,
            not_after=not_after,
            extensions=extensions,
            overrides=overrides,
        )
        return Authority(cert=cert, key=key, trust_domain=trust_domain)

    def leaf(
        self,
        spiffe_id: str | None = None,
        *,
        uris: Sequence[str] | None = None,
        not_before: datetime = NOW - LEAF_LIFETIME / 2,
        not_after: datetime | None = None,
        key: CertificateIssuerPrivateKeyTypes | None = None,
        subject: x509.Name | None = None,
        overrides: Overrides | None = None,
    ) -> x509.Certificate:
        """Issue a SPIRE-shaped X.509-SVID; ``uris`` replaces the one-URI SAN when given."""
        if uris is None:
            uris = [spiffe_id or f"spiffe://{self.trust_domain}/workload"]
        public_key = (key or new_key()).public_key()
        subject = (
            subject
            if subject is not None
            else _name(
                (NameOID.COUNTRY_NAME, "US"),
                (NameOID.ORGANIZATION_NAME, "SPIRE"),
                (NameOID.X500_UNIQUE_IDENTIFIER, secrets.token_hex(16)),
            )
        )
        extensions: dict[type[x509.ExtensionType], ExtensionSpec] = {
            x509.KeyUsage: (LEAF_KEY_USAGE, True),
            x509.ExtendedKeyUsage: (SPIRE_EKU, False),
            x509.BasicConstraints: (x509.BasicConstraints(ca=False, path_length=None), True),
            x509.SubjectKeyIdentifier: (
                x509.SubjectKeyIdentifier.from_public_key(public_key),
                False,
            ),
            x509.AuthorityKeyIdentifier: (self._authority_key_id(), False),
            x509.SubjectAlternativeName: (uri_sans(*uris), False),
        }
        return _build(
            subject,
            self,
            public_key,
            not_before=not_before,
            not_after=not_after or not_before + LEAF_LIFETIME,
            extensions=extensions,
            overrides=overrides,
        )

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            # An issuer without SKI: the key identifier is derived from its key (RFC 5280).
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def make_root(
    trust_domain: str = "a.test",
    *,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=365),
    key: CertificateIssuerPrivateKeyTypes | None = None,
    overrides: Overrides | None = None,
) -> Authority:
    """A self-signed SPIRE-shaped root CA of ``trust_domain``."""
    key = key or new_key()
    subject = _name((NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, "SPIFFE"))
    extensions = _ca_extensions(trust_domain, key.public_key())
    builder = _builder(subject, subject, key.public_key(), not_before, not_after)
    for value, critical in _apply(extensions, overrides):
        builder = builder.add_extension(value, critical=critical)
    cert = builder.sign(key, hashes.SHA256())
    return Authority(cert=cert, key=key, trust_domain=trust_domain)


def resign(
    cert: x509.Certificate,
    issuer: Authority,
    edit_tbs: Callable[[bytes], bytes],
) -> x509.Certificate:
    """Re-sign ``cert`` after ``edit_tbs`` rewrote its to-be-signed bytes (DER in, DER out).

    For ECDSA-with-SHA256 issuers (the default). Keep edits length-preserving unless the
    edit also fixes the enclosing DER lengths.
    """
    tbs = edit_tbs(cert.tbs_certificate_bytes)
    assert isinstance(issuer.key, ec.EllipticCurvePrivateKey)
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    der = cert.public_bytes(Encoding.DER)
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    body_start = _header_length(der, 0)
    algorithm_start = body_start + len(cert.tbs_certificate_bytes)
    algorithm_end = algorithm_start + _header_length(der, algorithm_start)
    algorithm_end += _content_length(der, algorithm_start)
    algorithm = der[algorithm_start:algorithm_end]
    return x509.load_der_x509_certificate(
        _tlv(0x30, tbs + algorithm + _tlv(0x03, b"\x00" + signature))
    )


def to_pem(*certs: x509.Certificate) -> bytes:
    """The certificates as one PEM bundle."""
    return b"".join(cert.public_bytes(Encoding.PEM) for cert in certs)


def to_der(*certs: x509.Certificate) -> bytes:
    """The certificates as concatenated DER, as the Workload API carries a chain."""
    return b"".join(cert.public_bytes(Encoding.DER) for cert in certs)


def _ca_extensions(
    trust_domain: str, public_key: CertificatePublicKeyTypes
) -> dict[type[x509.ExtensionType], ExtensionSpec]:
    return {
        x509.BasicConstraints: (x509.BasicConstraints(ca=True, path_length=None), True),
        x509.KeyUsage: (CA_KEY_USAGE, True),
        x509.SubjectKeyIdentifier: (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        x509.SubjectAlternativeName: (uri_sans(f"spiffe://{trust_domain}"), False),
    }


def _build(
    subject: x509.Name,
    issuer: Authority,
    public_key: CertificatePublicKeyTypes,
    *,
    not_before: datetime,
    not_after: datetime,
    extensions: dict[type[x509.ExtensionType], ExtensionSpec],
    overrides: Overrides | None,
) -> x509.Certificate:
    builder = _builder(subject, issuer.cert.subject, public_key, not_before, not_after)
    for value, critical in _apply(extensions, overrides):
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(issuer.key, hashes.SHA256())


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _apply(
    extensions: dict[type[x509.ExtensionType], ExtensionSpec], overrides: Overrides | None
) -> list[ExtensionSpec]:
    merged: dict[type[x509.ExtensionType], ExtensionSpec | None] = dict(extensions)
    merged.update(overrides or {})
    return [spec for spec in merged.values() if spec is not None]


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _header_length(der: bytes, offset: int) -> int:
    first = der[offset + 1]
    return 2 if first < 0x80 else 2 + (first & 0x7F)


def _content_length(der: bytes, offset: int) -> int:
    first = der[offset + 1]
    if first < 0x80:
        return first
    return int.from_bytes(der[offset + 2 : offset + 2 + (first & 0x7F)], "big")


def _tlv(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    length = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body
