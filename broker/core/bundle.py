"""SPIFFE trust bundles and the per-trust-domain store the SVID verifiers read.

A SPIFFE bundle is an RFC 7517 JWK Set holding one trust domain's authorities (SPIFFE Trust
Domain and Bundle §4): ``x509-svid`` entries carry a CA certificate in ``x5c``, ``jwt-svid``
entries carry a public key named by ``kid``. ``py-spiffe``'s ``JwtBundle.parse`` ignores ``use``,
accepts ``oct`` keys and keeps the last of duplicate JSON members, so the broker parses bundles
itself, strictly, and keeps every bundle bound to the trust domain it was fetched for.

What is **rejected** (the whole bundle; :class:`~broker.errors.BundleUnavailableError` with a
``bundle.*`` reason; the caller keeps its last good bundle and alerts):

* more than ``max_bytes``; not UTF-8 JSON; ``NaN``/``Infinity``; nesting too deep;
* a duplicate member name in any JSON object (a parser that keeps the first or the last would
  let two readers of the same bytes see two different bundles);
* no ``keys`` array, a ``keys`` element that is not an object, more than ``max_keys`` entries;
* ``spiffe_sequence`` or ``spiffe_refresh_hint`` present but not a non-negative integer in range;
* two ``jwt-svid`` entries with the same ``kid`` (which key is the authority is ambiguous).

What is **ignored** (that one entry; never an authority; recorded in
:attr:`TrustBundle.skipped` with a ``bundle_key.*`` reason so the adapter can log and alert):

* no ``use`` or an unknown ``use`` (§4.2.2: clients MUST ignore the entry);
* no ``kty``, ``kty: oct`` or any key type but ``EC``/``RSA`` (§4.2.1: unknown key types MUST be
  ignored; symmetric keys never belong in a public bundle);
* private key material (``d``, ``p``, ``q``, …): the key is compromised, so it is dropped rather
  than the whole bundle rejected — rejecting would keep the *previous* bundle, which likely
  still trusts the same key;
* ``x509-svid``: ``x5c`` missing, empty, holding more than one certificate (X509-SVID §6.1:
  exactly one), not strict base64 DER, not a CA (BasicConstraints ``cA=true`` and, when Key Usage
  is present, ``keyCertSign``), or with a public key outside the key policy below;
* ``jwt-svid``: ``kid`` missing or not a short token of safe characters, RSA below 2048 or above
  8192 bits, EC off P-256/P-384/P-521, malformed coordinates or a point off the curve, an ``alg``
  member outside the JWT-SVID allow-list or not matching the key.

``keys: []`` is a valid bundle that trusts nothing: every SVID of that domain is rejected.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from broker.core.jwk import JwkKeyError, ec_public_key, rsa_public_key
from broker.core.spiffe_id import TrustDomain
from broker.core.untrusted import printable
from broker.errors import (
    BundleUnavailableError,
    ConfigurationError,
    UntrustedDomainError,
)

__all__ = [
    "DEFAULT_MAX_BUNDLE_BYTES",
    "DEFAULT_MAX_BUNDLE_KEYS",
    "DEFAULT_MAX_STALENESS",
    "JWT_SVID_ALGORITHMS",
    "JwtAlgorithm",
    "JwtAuthority",
    "ReplaceOutcome",
    "SkippedKey",
    "StrictJsonError",
    "TrustBundle",
    "TrustStore",
    "is_safe_kid",
    "key_fits_algorithm",
    "loads_strict_json",
    "parse_spiffe_bundle",
]

DEFAULT_MAX_BUNDLE_BYTES: Final = 1024 * 1024
DEFAULT_MAX_BUNDLE_KEYS: Final = 1000
DEFAULT_MAX_STALENESS: Final = timedelta(hours=1)

MIN_RSA_BITS: Final = 2048
# RSA verification cost grows with the modulus; an 8192-bit cap bounds the CPU an entry can
# cost per token and is above anything SPIRE or common CAs issue.
MAX_RSA_BITS: Final = 8192
# SPIFFE Trust Domain and Bundle §4.1.1: implementations need at least 64 bits of precision.
_MAX_SEQUENCE: Final = 2**64 - 1
# A refresh hint beyond ten years is a publisher bug, not a hint.
_MAX_REFRESH_HINT_SECONDS: Final = 10 * 366 * 24 * 3600

JwtAuthority: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
"""A public key that may sign JWT-SVIDs: RSA (2048-8192 bits) or EC on P-256/P-384/P-521."""

# A kid is an opaque lookup key (RFC 7515 §4.1.4). SPIRE issues 32 random alphanumerics; JWK
# thumbprints are base64url. Anything with '/', '\\', ':', '%', quotes, spaces or control
# characters is refused, so a kid shaped like a path, an SQL fragment or a URL never reaches
# a lookup, a log line or a key-store adapter.
_KID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# Members of a JWK that only a private key has (RFC 7518 §6.2.2, §6.3.2).
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


def is_safe_kid(kid: object) -> bool:
    """True when ``kid`` is a string of 1-128 characters from ``[A-Za-z0-9._-]``, not led by '.'."""
    return isinstance(kid, str) and _KID_PATTERN.fullmatch(kid) is not None


# --------------------------------------------------------------------------------------------
# Algorithms and key policy


@dataclass(frozen=True, slots=True)
class JwtAlgorithm:
    """One JWS ``alg`` permitted for JWT-SVIDs and the key it needs."""

    name: str
    kty: Literal["EC", "RSA"]
    curve: str | None
    """For EC: the cryptography curve name the key must use (RFC 7518 §3.4 binds curve to alg)."""


# JWT-SVID §2.1: exactly the RFC 7518 §3.3-3.5 algorithms. Never 'none', HMAC, EdDSA or ES256K.
JWT_SVID_ALGORITHMS: Final[Mapping[str, JwtAlgorithm]] = MappingProxyType(
    {
        "RS256": JwtAlgorithm("RS256", "RSA", None),
        "RS384": JwtAlgorithm("RS384", "RSA", None),
        "RS512": JwtAlgorithm("RS512", "RSA", None),
        "PS256": JwtAlgorithm("PS256", "RSA", None),
        "PS384": JwtAlgorithm("PS384", "RSA", None),
        "PS512": JwtAlgorithm("PS512", "RSA", None),
        "ES256": JwtAlgorithm("ES256", "EC", "secp256r1"),
        "ES384": JwtAlgorithm("ES384", "EC", "secp384r1"),
        "ES512": JwtAlgorithm("ES512", "EC", "secp521r1"),
    }
)

_ALLOWED_CURVE_NAMES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})


def key_fits_algorithm(key: JwtAuthority, algorithm: JwtAlgorithm) -> bool:
    """True when ``key`` has the family (and, for ECDSA, the curve) that ``algorithm`` needs."""
    if algorithm.kty == "RSA":
        return isinstance(key, rsa.RSAPublicKey)
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == algorithm.curve


def _key_policy_problem(key: object) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when ``key`` may not be an authority, else ``None``."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return (
                "bundle_key.rsa_too_small",
                f"RSA key has {key.key_size} bits, at least {MIN_RSA_BITS} are required",
            )
        if key.key_size > MAX_RSA_BITS:
            return (
                "bundle_key.rsa_too_large",
                f"RSA key has {key.key_size} bits, at most {MAX_RSA_BITS} are accepted",
            )
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _ALLOWED_CURVE_NAMES:
            return (
                "bundle_key.ec_curve_unsupported",
                f"EC key is on {printable(key.curve.name)}, expected P-256, P-384 or P-521",
            )
        return None
    return (
        "bundle_key.kty_unsupported",
        f"key of type {type(key).__name__} is neither RSA nor EC",
    )


def _ca_problem(cert: x509.Certificate) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when ``cert`` may not be an X.509 authority, else ``None``."""
    try:
        # cryptography parses extensions on first access; a duplicate extension or a bad
        # value surfaces here, not when the DER is loaded.
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        return (
            "bundle_key.x5c_malformed",
            f"certificate extensions are malformed: {printable(str(exc), 80)}",
        )
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return ("bundle_key.not_a_ca", "certificate has no BasicConstraints, expected cA=true")
    if not constraints.ca:
        return ("bundle_key.not_a_ca", "certificate has BasicConstraints cA=false, expected true")
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        return ("bundle_key.not_a_ca", "CA certificate's Key Usage lacks keyCertSign")
    try:
        public_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        return (
            "bundle_key.x5c_malformed",
            f"certificate public key is malformed: {printable(str(exc), 80)}",
        )
    return _key_policy_problem(public_key)


# --------------------------------------------------------------------------------------------
# Strict JSON


class StrictJsonError(ValueError):
    """Raised by :func:`loads_strict_json`; ``reason`` is ``"malformed"`` or ``"duplicate"``."""

    def __init__(self, message: str, *, reason: Literal["malformed", "duplicate"]) -> None:
        super().__init__(message)
        self.reason = reason


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Counter keeps this linear: an object with 100 000 members costs no quadratic scan.
        counts = Counter(name for name, _ in pairs)
        duplicate = next(name for name, count in counts.items() if count > 1)
        raise StrictJsonError(f"duplicate member {printable(duplicate, 64)}", reason="duplicate")
    return obj


def _refuse_constant(name: str) -> NoReturn:
    raise StrictJsonError(f"non-standard constant {name}", reason="malformed")


# One decoder, built once: json.loads with hooks would build a new one on every call.
_STRICT_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant
)


def loads_strict_json(data: bytes) -> object:
    """Parse RFC 8259 JSON from UTF-8 ``data``, refusing duplicate members anywhere.

    Python's :func:`json.loads` keeps the last duplicate, accepts ``NaN``/``Infinity`` and
    guesses UTF-16/32 from bytes; all three are refused. Every failure (including nesting too
    deep and integers too long to convert) is a :class:`StrictJsonError`.
    """
    try:
        return _STRICT_DECODER.decode(data.decode("utf-8"))
    except StrictJsonError:
        raise
    except RecursionError as exc:
        raise StrictJsonError("JSON nesting is too deep", reason="malformed") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise StrictJsonError(f"not valid JSON: {exc}", reason="malformed") from exc


# --------------------------------------------------------------------------------------------
# TrustBundle


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A bundle entry that was ignored, and why; never an authority. Values are escaped."""

    index: int
    """Position in ``keys``; for ``from_authorities``, certificates first, then JWT keys."""
    reason: str
    detail: str


@dataclass(frozen=True, slots=True, eq=False)
class TrustBundle:
    """The authorities of one trust domain, valid from construction.

    Compared by identity; :meth:`has_same_authorities` compares contents.

    ``jwt_authorities`` maps ``kid`` to a public key; ``jwt_authority_algorithms`` holds the
    ``alg`` a JWK declared for its key (RFC 7517 §4.4), which tokens must then use. ``skipped``
    lists the entries that were ignored while parsing, for logs and alerts.

    Direct construction raises :class:`BundleUnavailableError` for any authority outside the key
    policy; :meth:`from_authorities` and :func:`parse_spiffe_bundle` skip such entries instead.
    """

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, JwtAuthority] = field(default_factory=dict)
    refresh_hint: timedelta | None = None
    sequence_number: int | None = None
    jwt_authority_algorithms: Mapping[str, str] = field(default_factory=dict)
    skipped: tuple[SkippedKey, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise BundleUnavailableError(
                "bundle trust domain must be a TrustDomain, "
                f"got {type(self.trust_domain).__name__}",
                reason="bundle.invalid_authority",
            )
        certs = tuple(self.x509_authorities)
        for cert in certs:
            if not isinstance(cert, x509.Certificate):
                _raise_invalid(self.trust_domain, f"X.509 authority is a {type(cert).__name__}")
            problem = _ca_problem(cert)
            if problem is not None:
                _raise_invalid(self.trust_domain, problem[1])
        keys = dict(self.jwt_authorities)
        for kid, key in keys.items():
            if not is_safe_kid(kid):
                _raise_invalid(self.trust_domain, f"kid {printable(kid)} is not a safe token")
            problem = _key_policy_problem(key)
            if problem is not None:
                _raise_invalid(self.trust_domain, f"kid {kid}: {problem[1]}")
        algs = dict(self.jwt_authority_algorithms)
        for kid, alg in algs.items():
            spec = JWT_SVID_ALGORITHMS.get(alg)
            if kid not in keys or spec is None or not key_fits_algorithm(keys[kid], spec):
                _raise_invalid(
                    self.trust_domain, f"kid {printable(kid)} bound to unusable alg {alg!r}"
                )
        if self.sequence_number is not None and not (
            type(self.sequence_number) is int and 0 <= self.sequence_number <= _MAX_SEQUENCE
        ):
            _raise_invalid(self.trust_domain, "sequence number is not a 64-bit unsigned integer")
        if self.refresh_hint is not None and self.refresh_hint < timedelta(0):
            _raise_invalid(self.trust_domain, "refresh hint is negative")
        object.__setattr__(self, "x509_authorities", certs)
        object.__setattr__(self, "jwt_authorities", MappingProxyType(keys))
        object.__setattr__(self, "jwt_authority_algorithms", MappingProxyType(algs))
        object.__setattr__(self, "skipped", tuple(self.skipped))

    @classmethod
    def from_authorities(
        cls,
        trust_domain: TrustDomain,
        *,
        x509_authorities: Iterable[x509.Certificate] = (),
        jwt_authorities: Mapping[str, PublicKeyTypes] | None = None,
        refresh_hint: timedelta | None = None,
        sequence_number: int | None = None,
    ) -> TrustBundle:
        """Build a bundle from already-parsed authorities (as the Workload API adapter has them).

        The same policy as :func:`parse_spiffe_bundle` applies: a certificate that is not a CA,
        a key outside the key policy or a kid that is not a safe token is skipped and recorded
        in :attr:`skipped`, never trusted. Duplicate certificates collapse to one.
        """
        skipped: list[SkippedKey] = []
        certs: list[x509.Certificate] = []
        given_certs = list(x509_authorities)
        for index, cert in enumerate(given_certs):
            problem = (
                _ca_problem(cert)
                if isinstance(cert, x509.Certificate)
                else ("bundle_key.x5c_malformed", f"authority is a {type(cert).__name__}")
            )
            if problem is not None:
                skipped.append(SkippedKey(index, *problem))
            elif cert not in certs:
                certs.append(cert)
        keys: dict[str, JwtAuthority] = {}
        # JWT keys are numbered after the certificates, so every input has its own index.
        keys_given = (jwt_authorities or {}).items()
        for position, (kid, key) in enumerate(keys_given, start=len(given_certs)):
            if not is_safe_kid(kid):
                skipped.append(
                    SkippedKey(
                        position,
                        "bundle_key.kid_malformed",
                        f"kid {printable(kid, 64)} is not 1-128 characters of [A-Za-z0-9._-]",
                    )
                )
                continue
            problem = _key_policy_problem(key)
            if problem is not None:
                skipped.append(SkippedKey(position, *problem))
                continue
            keys[kid] = _as_authority(key)
        return cls(
            trust_domain=trust_domain,
            x509_authorities=tuple(certs),
            jwt_authorities=keys,
            refresh_hint=refresh_hint,
            sequence_number=sequence_number,
            skipped=tuple(skipped),
        )

    def jwt_authority(self, kid: str) -> JwtAuthority | None:
        """The key named ``kid`` in this trust domain, or ``None``."""
        return self.jwt_authorities.get(kid)

    def has_same_authorities(self, other: TrustBundle) -> bool:
        """True when both bundles trust exactly the same certificates, keys and key algs."""
        return _authority_fingerprint(self) == _authority_fingerprint(other)


def _as_authority(key: object) -> JwtAuthority:
    # Narrowing helper: callers ran _key_policy_problem, so only RSA or EC keys get here.
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return key
    raise AssertionError(f"unexpected key type {type(key).__name__}")  # pragma: no cover


def _raise_invalid(trust_domain: TrustDomain, what: str) -> NoReturn:
    raise BundleUnavailableError(
        f"bundle for {trust_domain} holds an invalid authority: {what}",
        reason="bundle.invalid_authority",
    )


def _authority_fingerprint(
    bundle: TrustBundle,
) -> tuple[frozenset[bytes], frozenset[tuple[str, bytes]], frozenset[tuple[str, str]]]:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return (
        frozenset(c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities),
        frozenset((kid, k.public_bytes(*spki)) for kid, k in bundle.jwt_authorities.items()),
        frozenset(bundle.jwt_authority_algorithms.items()),
    )


# --------------------------------------------------------------------------------------------
# JWKS parsing


def parse_spiffe_bundle(
    trust_domain: TrustDomain,
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    max_keys: int = DEFAULT_MAX_BUNDLE_KEYS,
) -> TrustBundle:
    """Parse the SPIFFE bundle (JWK Set) ``data`` fetched for ``trust_domain``.

    The trust domain comes from configuration, never from the document (Trust Domain and
    Bundle §3: record the ``<trust_domain_name, bundle>`` tuple independently). See the module
    docstring for what rejects the bundle and what is ignored.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        _reject(trust_domain, f"bundle must be bytes, got {type(data).__name__}", "malformed_json")
    if len(data) > max_bytes:
        _reject(
            trust_domain,
            f"bundle is {len(data)} bytes, the limit is {max_bytes}; not parsed",
            "too_large",
        )
    try:
        document = loads_strict_json(bytes(data))
    except StrictJsonError as exc:
        if exc.reason == "duplicate":
            _reject(trust_domain, f"bundle JSON has a {exc}", "duplicate_member")
        _reject(trust_domain, f"bundle is not strict JSON: {printable(str(exc))}", "malformed_json")
    if not isinstance(document, dict):
        _reject(trust_domain, "bundle is not a JSON object", "not_an_object")
    if "keys" not in document:
        _reject(
            trust_domain, "bundle has no 'keys' member (§4.1.3: MUST be present)", "keys_missing"
        )
    entries = document["keys"]
    if not isinstance(entries, list):
        _reject(
            trust_domain,
            f"bundle 'keys' is a {_json_type(entries)}, expected an array",
            "keys_not_a_list",
        )
    if len(entries) > max_keys:
        _reject(
            trust_domain,
            f"bundle has {len(entries)} keys, the limit is {max_keys}",
            "too_many_keys",
        )
    sequence = _optional_uint(trust_domain, document, "spiffe_sequence", _MAX_SEQUENCE, "sequence")
    hint = _optional_uint(
        trust_domain, document, "spiffe_refresh_hint", _MAX_REFRESH_HINT_SECONDS, "refresh_hint"
    )

    certs: list[x509.Certificate] = []
    keys: dict[str, JwtAuthority] = {}
    algs: dict[str, str] = {}
    skipped: list[SkippedKey] = []
    jwt_kids: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            _reject(
                trust_domain,
                f"keys[{index}] is a {_json_type(entry)}, expected a JWK object",
                "key_not_an_object",
            )
        use = entry.get("use")
        kid = entry.get("kid")
        # Counted before any per-entry check: two jwt-svid entries naming the same kid make
        # the publisher's intent ambiguous even when one of them would be ignored.
        if use == "jwt-svid" and isinstance(kid, str):
            if kid in jwt_kids:
                _reject(
                    trust_domain,
                    f"keys[{index}] repeats jwt-svid kid {printable(kid, 64)}: "
                    "the authority is ambiguous",
                    "duplicate_kid",
                )
            jwt_kids.add(kid)
        try:
            parsed = _entry_authority(entry)
        except _Skip as skip:
            skipped.append(SkippedKey(index, skip.reason, skip.detail))
            continue
        if isinstance(parsed, x509.Certificate):
            if parsed not in certs:
                certs.append(parsed)
        else:
            kid_checked, key, alg = parsed
            keys[kid_checked] = key
            if alg is not None:
                algs[kid_checked] = alg

    return TrustBundle(
        trust_domain=trust_domain,
        x509_authorities=tuple(certs),
        jwt_authorities=keys,
        refresh_hint=None if hint is None else timedelta(seconds=hint),
        sequence_number=sequence,
        jwt_authority_algorithms=algs,
        skipped=tuple(skipped),
    )


def _entry_authority(
    entry: dict[str, Any],
) -> x509.Certificate | tuple[str, JwtAuthority, str | None]:
    use = entry.get("use")
    if use == "x509-svid":
        return _x509_entry(entry)
    if use == "jwt-svid":
        return _jwt_entry(entry)
    if use is None:
        raise _Skip("bundle_key.use_missing", "entry has no 'use' (§4.2.2: MUST be set)")
    raise _Skip(
        "bundle_key.use_unknown",
        f"entry has use {printable(use, 64)}, expected x509-svid or jwt-svid",
    )


class _Skip(Exception):  # noqa: N818 - control flow inside the parser, never escapes it
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject(trust_domain: TrustDomain, detail: str, reason: str) -> NoReturn:
    raise BundleUnavailableError(
        f"bundle for trust domain {trust_domain} rejected: {detail}", reason=f"bundle.{reason}"
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _optional_uint(
    trust_domain: TrustDomain, document: dict[str, Any], name: str, limit: int, reason: str
) -> int | None:
    if name not in document:
        return None
    value = document[name]
    # bool is an int in Python; JSON true is not a number.
    if type(value) is not int or not 0 <= value <= limit:
        _reject(
            trust_domain,
            f"{name} is {printable(value, 40)}, expected an integer in [0, {limit}]",
            f"bad_{reason}",
        )
    return value


def _check_kty(entry: dict[str, Any]) -> Literal["EC", "RSA"]:
    kty = entry.get("kty")
    if kty is None:
        raise _Skip("bundle_key.kty_missing", "entry has no 'kty' (§4.2.1: MUST be set)")
    if kty == "oct":
        raise _Skip("bundle_key.kty_oct", "entry is a symmetric 'oct' key: never an authority")
    if kty not in ("EC", "RSA"):
        raise _Skip(
            "bundle_key.kty_unsupported",
            f"entry has kty {printable(kty, 40)}, expected EC or RSA",
        )
    private = sorted(_PRIVATE_MEMBERS.intersection(entry))
    if private:
        raise _Skip(
            "bundle_key.private_material",
            f"entry carries private key members {private}: the key is compromised, ignored",
        )
    return "EC" if kty == "EC" else "RSA"


def _x509_entry(entry: dict[str, Any]) -> x509.Certificate:
    kty = _check_kty(entry)
    chain = entry.get("x5c")
    if not isinstance(chain, list) or not chain:
        raise _Skip("bundle_key.x5c_missing", "x509-svid entry has no 'x5c' certificate")
    if len(chain) != 1:
        # X509-SVID §6.1: the value MUST include exactly one CA certificate. §6.2 lets a
        # consumer take the first; an entry that breaks §6.1 is ignored whole instead.
        raise _Skip(
            "bundle_key.x5c_count",
            f"x509-svid entry has {len(chain)} certificates in 'x5c', expected exactly one",
        )
    encoded = chain[0]
    if not isinstance(encoded, str):
        raise _Skip("bundle_key.x5c_malformed", "x5c[0] is not a string")
    try:
        # RFC 7517 §4.7: standard base64 (not base64url) of the DER certificate.
        der = base64.b64decode(encoded, validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise _Skip(
            "bundle_key.x5c_malformed",
            f"x5c[0] is not base64 DER: {printable(str(exc), 80)}",
        ) from None
    problem = _ca_problem(cert)
    if problem is not None:
        raise _Skip(*problem)
    public_key = cert.public_key()
    if (kty == "RSA") != isinstance(public_key, rsa.RSAPublicKey):
        raise _Skip(
            "bundle_key.kty_mismatch",
            f"entry says kty {kty} but the certificate key is {type(public_key).__name__}",
        )
    return cert


def _jwt_entry(entry: dict[str, Any]) -> tuple[str, JwtAuthority, str | None]:
    kid = entry.get("kid")
    if kid is None:
        raise _Skip("bundle_key.kid_missing", "jwt-svid entry has no 'kid'")
    if not is_safe_kid(kid):
        raise _Skip(
            "bundle_key.kid_malformed",
            f"kid {printable(kid, 64)} is not 1-128 characters of [A-Za-z0-9._-]",
        )
    kty = _check_kty(entry)
    key: JwtAuthority = _rsa_key(entry) if kty == "RSA" else _ec_key(entry)
    problem = _key_policy_problem(key)
    if problem is not None:
        raise _Skip(*problem)
    alg = entry.get("alg")
    if alg is not None:
        spec = JWT_SVID_ALGORITHMS.get(alg) if isinstance(alg, str) else None
        if spec is None or not key_fits_algorithm(key, spec):
            raise _Skip(
                "bundle_key.alg_mismatch",
                f"entry declares alg {printable(alg, 40)}, not a JWT-SVID alg for a {kty} key",
            )
    return kid, key, alg


def _rsa_key(entry: dict[str, Any]) -> rsa.RSAPublicKey:
    try:
        return rsa_public_key(entry)
    except JwkKeyError as exc:
        raise _Skip(f"bundle_key.{exc.code}", exc.detail) from None


def _ec_key(entry: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    try:
        return ec_public_key(entry)
    except JwkKeyError as exc:
        raise _Skip(f"bundle_key.{exc.code}", exc.detail) from None


# --------------------------------------------------------------------------------------------
# TrustStore


class ReplaceOutcome(StrEnum):
    """What :meth:`TrustStore.replace` did with one bundle."""

    INSTALLED = "installed"
    """A new trust domain, or new authorities: the new bundle replaced the old one whole."""
    REFRESHED = "refreshed"
    """Same authorities and sequence as installed: only the fetch time moved forward."""
    KEPT_SEQUENCE_REGRESSED = "kept_sequence_regressed"
    """Not installed: its sequence number is lower than the installed one. Alert."""
    KEPT_SEQUENCE_REUSED = "kept_sequence_reused"
    """Not installed: same sequence number as installed, different authorities. Alert."""
    REMOVED = "removed"
    """:meth:`TrustStore.replace_all` dropped a domain absent from the new set."""

    @property
    def kept_old(self) -> bool:
        """True when the new bundle was refused and the installed one kept: alert on this."""
        return self in (ReplaceOutcome.KEPT_SEQUENCE_REGRESSED, ReplaceOutcome.KEPT_SEQUENCE_REUSED)


@dataclass(frozen=True, slots=True)
class _Installed:
    bundle: TrustBundle
    fetched_at: datetime


class TrustStore:
    """The trusted bundles, one per trust domain, each with the time it was fetched.

    Each update swaps an immutable snapshot in one assignment, so a verification reads one
    consistent view. :meth:`replace` installs a bundle *whole*: a key absent from the new bundle
    stops verifying at once (there is no add-only merge). A domain is trusted from the moment a
    bundle for it is installed until :meth:`remove` (or :meth:`replace_all` without it).

    Freshness: :meth:`bundle_for` fails closed with ``bundle.stale`` once ``now - fetched_at``
    exceeds ``max_staleness`` (or the per-domain value in ``max_staleness_for``). A ``now``
    earlier than ``fetched_at`` (the clock stepped back) counts as fresh.

    Sequence numbers (Trust Domain and Bundle §4.1.1: monotonically increasing, changed with
    every content change): a new bundle whose ``sequence_number`` is lower than the installed
    one, or equal with different authorities, is *not* installed. The installed bundle and its
    old ``fetched_at`` are kept, so it still goes stale on schedule and then fails closed, and
    the returned :class:`ReplaceOutcome` says ``kept_old`` for the caller to alert on. When
    either bundle has no sequence number, order cannot be judged and the new bundle is
    installed.
    """

    def __init__(
        self,
        *,
        max_staleness: timedelta = DEFAULT_MAX_STALENESS,
        max_staleness_for: Mapping[TrustDomain, timedelta] | None = None,
    ) -> None:
        overrides = dict(max_staleness_for or {})
        for name, value in [("max_staleness", max_staleness), *overrides.items()]:
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigurationError(
                    f"bundle staleness limit for {name} is {value!r}, expected a positive duration"
                )
        self._max_staleness = max_staleness
        self._max_staleness_for: Mapping[TrustDomain, timedelta] = MappingProxyType(overrides)
        self._installed: Mapping[TrustDomain, _Installed] = MappingProxyType({})

    @property
    def trust_domains(self) -> frozenset[TrustDomain]:
        """The trust domains that currently have a bundle."""
        return frozenset(self._installed)

    def max_staleness_of(self, trust_domain: TrustDomain) -> timedelta:
        """The staleness limit that applies to ``trust_domain``."""
        return self._max_staleness_for.get(trust_domain, self._max_staleness)

    def fetched_at(self, trust_domain: TrustDomain) -> datetime | None:
        """When the installed bundle of ``trust_domain`` was fetched, or ``None``."""
        installed = self._installed.get(trust_domain)
        return None if installed is None else installed.fetched_at

    def replace(self, bundle: TrustBundle, fetched_at: datetime) -> ReplaceOutcome:
        """Install ``bundle`` whole for its trust domain, unless its sequence went backwards."""
        _require_aware(fetched_at, "fetched_at")
        outcome = self._judge(bundle)
        if not outcome.kept_old:
            updated = dict(self._installed)
            updated[bundle.trust_domain] = _Installed(bundle, fetched_at)
            self._installed = MappingProxyType(updated)
        return outcome

    def replace_all(
        self, bundles: Iterable[TrustBundle], fetched_at: datetime
    ) -> Mapping[TrustDomain, ReplaceOutcome]:
        """Make ``bundles`` the complete trusted set, in one swap.

        Each bundle is judged as by :meth:`replace`; a domain with no bundle in the set is
        removed (a federation relationship that ended stops verifying). Two bundles for the
        same trust domain reject the whole update with ``bundle.duplicate_trust_domain`` and
        change nothing: which one is authoritative is ambiguous.
        """
        _require_aware(fetched_at, "fetched_at")
        incoming: dict[TrustDomain, TrustBundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in incoming:
                raise BundleUnavailableError(
                    f"bundle set holds two bundles for trust domain {bundle.trust_domain}; "
                    "nothing was changed",
                    reason="bundle.duplicate_trust_domain",
                )
            incoming[bundle.trust_domain] = bundle
        outcomes: dict[TrustDomain, ReplaceOutcome] = {}
        updated: dict[TrustDomain, _Installed] = {}
        for td, bundle in incoming.items():
            outcomes[td] = self._judge(bundle)
            updated[td] = (
                self._installed[td] if outcomes[td].kept_old else _Installed(bundle, fetched_at)
            )
        for td in self._installed.keys() - incoming.keys():
            outcomes[td] = ReplaceOutcome.REMOVED
        self._installed = MappingProxyType(updated)
        return MappingProxyType(outcomes)

    def remove(self, trust_domain: TrustDomain) -> bool:
        """Stop trusting ``trust_domain`` (federation ended); True if it had a bundle."""
        if trust_domain not in self._installed:
            return False
        updated = dict(self._installed)
        del updated[trust_domain]
        self._installed = MappingProxyType(updated)
        return True

    def bundle_for(self, trust_domain: TrustDomain, now: datetime) -> TrustBundle:
        """The fresh bundle of ``trust_domain``; fail closed when unknown or stale."""
        installed = self._installed.get(trust_domain)
        if installed is None:
            trusted = sorted(td.name for td in self._installed)
            raise UntrustedDomainError(
                f"trust domain {printable(trust_domain.name)} is not trusted "
                f"(trusted: {printable(trusted)})",
                reason="trust_domain.untrusted",
            )
        limit = self.max_staleness_of(trust_domain)
        age = now - installed.fetched_at
        if age > limit:
            raise BundleUnavailableError(
                f"bundle for {trust_domain} was fetched {age} ago, beyond the limit of {limit}",
                reason="bundle.stale",
            )
        return installed.bundle

    def _judge(self, bundle: TrustBundle) -> ReplaceOutcome:
        current = self._installed.get(bundle.trust_domain)
        if current is None:
            return ReplaceOutcome.INSTALLED
        old, new = current.bundle.sequence_number, bundle.sequence_number
        same = current.bundle.has_same_authorities(bundle)
        if old is not None and new is not None:
            if new < old:
                return ReplaceOutcome.KEPT_SEQUENCE_REGRESSED
            if new == old and not same:
                return ReplaceOutcome.KEPT_SEQUENCE_REUSED
        return ReplaceOutcome.REFRESHED if same and old == new else ReplaceOutcome.INSTALLED


def _require_aware(moment: datetime, name: str) -> None:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise TypeError(f"{name} must be a timezone-aware datetime, got {moment!r}")
