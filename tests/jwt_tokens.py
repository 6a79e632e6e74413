"""Keys, SPIFFE bundles and JWT-SVIDs for tests, including deliberately malformed ones.

Everything here builds bytes by hand (never through the code under test), so a test can emit
any header, payload or signature: duplicate JSON members, a wrong ``alg`` for the key, padded
base64, an all-zero ECDSA signature. Keys are generated once per process and cached.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import get_default_algorithms

from broker.core.bundle import JwtAuthority, TrustBundle, TrustStore, parse_spiffe_bundle
from broker.core.spiffe_id import TrustDomain

NOW: Final = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AUDIENCE: Final = "spiffe://broker.test/tasklease"
TD_A: Final = TrustDomain("a.test")
TD_B: Final = TrustDomain("b.test")
SUB_A: Final = "spiffe://a.test/agent/planner"
SUB_B: Final = "spiffe://b.test/agent/planner"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class _Drop:
    """Marker: remove this member from the default header or claims."""

    def __repr__(self) -> str:
        return "DROP"


DROP: Final = _Drop()


# ---------------------------------------------------------------------------------------------
# Keys


@cache
def ec_key(curve: str = "P-256", label: str = "a") -> ec.EllipticCurvePrivateKey:
    """An EC private key on ``curve``; ``label`` tells distinct keys apart (cached)."""
    del label  # only part of the cache key
    curves: dict[str, ec.EllipticCurve] = {
        "P-256": ec.SECP256R1(),
        "P-384": ec.SECP384R1(),
        "P-521": ec.SECP521R1(),
        "secp256k1": ec.SECP256K1(),
    }
    return ec.generate_private_key(curves[curve])


@cache
def rsa_key(bits: int = 2048, label: str = "a") -> rsa.RSAPrivateKey:
    """An RSA private key of ``bits``; ``label`` tells distinct keys apart (cached)."""
    del label
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@cache
def ed25519_key() -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key: a type no SPIFFE JWT authority may have here."""
    return ed25519.Ed25519PrivateKey.generate()


@dataclass(frozen=True)
class Signer:
    """A private key with the ``kid`` and ``alg`` its tokens carry."""

    kid: str
    key: PrivateKey
    alg: str

    @property
    def public_key(self) -> JwtAuthority:
        return self.key.public_key()

    def jwk(self, **overrides: object) -> dict[str, object]:
        """The public JWK of this key as a ``jwt-svid`` bundle entry."""
        entry = {"use": "jwt-svid", "kid": self.kid, **public_jwk(self.public_key)}
        return _apply(entry, overrides)


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(length, "big"))


def public_jwk(key: JwtAuthority) -> dict[str, object]:
    """The RFC 7518 §6 public members of ``key`` (no ``use``/``kid``)."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {"kty": "RSA", "n": _uint(numbers.n), "e": _uint(numbers.e)}
    numbers_ec = key.public_numbers()
    crv, size = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48)}.get(
        key.curve.name, ("P-521", 66)
    )
    return {
        "kty": "EC",
        "crv": crv,
        "x": _uint(numbers_ec.x, size),
        "y": _uint(numbers_ec.y, size),
    }


# ---------------------------------------------------------------------------------------------
# Certificates and bundles


@cache
def ca_cert(
    trust_domain: TrustDomain = TD_A,
    *,
    key_label: str | None = None,
    ca: bool | None = True,
    key_cert_sign: bool = True,
) -> x509.Certificate:
    """A self-signed certificate (cached: ECDSA signatures differ on each signing).

    The key is ``ec_key("P-256", key_label or f"ca-{trust_domain}")``; ``ca=None`` leaves out
    BasicConstraints entirely.
    """
    signing_key = ec_key("P-256", key_label or f"ca-{trust_domain}")
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain.name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signing_key.public_key())
        .serial_number(1000 + len(trust_domain.name))
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=not key_cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    return builder.sign(signing_key, hashes.SHA256())


def x509_jwk(cert: x509.Certificate, **overrides: object) -> dict[str, object]:
    """An ``x509-svid`` bundle entry for ``cert`` (X509-SVID §6.1)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    entry = {
        "use": "x509-svid",
        **public_jwk(public),
        "x5c": [base64.b64encode(der).decode("ascii")],
    }
    return _apply(entry, overrides)


def bundle_json(
    keys: Sequence[Mapping[str, object]] | None,
    *,
    sequence: object = 1,
    refresh_hint: object = 300,
) -> bytes:
    """A SPIFFE bundle document; ``None``/``DROP`` leave a member out."""
    document: dict[str, object] = {}
    if keys is not None:
        document["keys"] = list(keys)
    if sequence is not DROP:
        document["spiffe_sequence"] = sequence
    if refresh_hint is not DROP:
        document["spiffe_refresh_hint"] = refresh_hint
    return json.dumps(document).encode()


def bundle_of(trust_domain: TrustDomain, *signers: Signer, sequence: int = 1) -> TrustBundle:
    """A parsed bundle trusting exactly ``signers`` (JWT) and one CA."""
    keys = [x509_jwk(ca_cert(trust_domain)), *(s.jwk() for s in signers)]
    return parse_spiffe_bundle(trust_domain, bundle_json(keys, sequence=sequence))


def store_with(*bundles: TrustBundle, fetched_at: datetime | None = None) -> TrustStore:
    """A store holding ``bundles``, fetched one minute before :data:`NOW`."""
    store = TrustStore(max_staleness=timedelta(hours=1))
    for bundle in bundles:
        store.replace(bundle, fetched_at or NOW - timedelta(minutes=1))
    return store


# ---------------------------------------------------------------------------------------------
# Tokens


def default_claims(sub: str = SUB_A, *, now: datetime = NOW, ttl: int = 300) -> dict[str, object]:
    """The claims of a valid JWT-SVID issued at ``now`` for :data:`AUDIENCE`."""
    issued = int(now.timestamp())
    return {"sub": sub, "aud": [AUDIENCE], "exp": issued + ttl, "iat": issued}


def encode_json(value: object) -> bytes:
    """Compact JSON, the way JWT libraries emit it."""
    return json.dumps(value, separators=(",", ":")).encode()


def sign(key: PrivateKey, alg: str, signing_input: bytes) -> bytes:
    """A JWS signature (raw r||s for ECDSA) with PyJWT's algorithm objects."""
    algorithm = get_default_algorithms()[alg]
    signature: bytes = algorithm.sign(signing_input, key)
    return signature


def token(
    signer: Signer,
    *,
    header: Mapping[str, object] | None = None,
    claims: Mapping[str, object] | None = None,
    sub: str = SUB_A,
    header_bytes: bytes | None = None,
    payload_bytes: bytes | None = None,
    signature: bytes | None = None,
    sign_alg: str | None = None,
) -> str:
    """A compact JWS signed by ``signer``, with any part overridden.

    ``header``/``claims`` update the defaults (``DROP`` removes a member); ``header_bytes``/
    ``payload_bytes`` replace the JSON wholesale (for duplicate members or invalid JSON);
    ``signature`` replaces the computed signature; ``sign_alg`` signs with another algorithm
    than the header says.
    """
    head = _apply({"alg": signer.alg, "kid": signer.kid, "typ": "JWT"}, header or {})
    body = _apply(default_claims(sub), claims or {})
    signing_input = (
        b64url(header_bytes if header_bytes is not None else encode_json(head))
        + "."
        + b64url(payload_bytes if payload_bytes is not None else encode_json(body))
    )
    if signature is None:
        signature = sign(signer.key, sign_alg or signer.alg, signing_input.encode())
    return f"{signing_input}.{b64url(signature)}"


def hs256_with_public_key(signer: Signer, *, sub: str = SUB_A) -> str:
    """The classic confusion attack: HMAC-SHA256 keyed with the signer's public key PEM."""
    import hashlib
    import hmac

    pem = signer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = (
        b64url(encode_json({"alg": "HS256", "kid": signer.kid, "typ": "JWT"}))
        + "."
        + b64url(encode_json(default_claims(sub)))
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _apply(base: dict[str, object], overrides: Mapping[str, object]) -> dict[str, object]:
    merged = dict(base)
    for name, value in overrides.items():
        if value is DROP:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


# ---------------------------------------------------------------------------------------------
# The standard cast


@cache
def signer_es256_a() -> Signer:
    return Signer("a-ec-1", ec_key("P-256", "a"), "ES256")


@cache
def signer_rs256_a() -> Signer:
    return Signer("a-rsa-1", rsa_key(2048, "a"), "RS256")


@cache
def signer_es256_b_colliding() -> Signer:
    """Trust domain B's key, published under the same kid as A's EC key."""
    return Signer("a-ec-1", ec_key("P-256", "b"), "ES256")
