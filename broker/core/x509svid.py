"""Strict X.509-SVID verification, one trust domain at a time.

The chain (signatures and their algorithms, signing-key sizes, issuer names, CA constraints,
unknown critical extensions, dates) is checked by ``cryptography.x509.verification``. That
verifier is built for the Web PKI and accepts leaves that the X509-SVID specification forbids
(two URI SANs, a non-spiffe URI, ``cRLSign``, no ``digitalSignature``, a root-path ID, no
BasicConstraints), so the SPIFFE leaf and signing-certificate rules are checked here, before
the signature work.

Each :class:`X509SvidVerifier` knows the authorities of exactly one trust domain; the
:class:`X509SvidAuthenticator` picks the verifier of the trust domain the leaf names, so a leaf
of ``b.test`` can only ever chain to ``b.test``'s own roots (never a merged store).

A chain handed to :meth:`X509SvidAuthenticator.authenticate` must be the peer chain of a
completed mutual-TLS handshake: the handshake is the proof of possession of the leaf's private
key. A pasted certificate proves nothing (SECURITY.md item 9); :func:`parse_certificate_chain`
exists for trust material and tooling, never for turning request bytes into an identity.

Every rejection is an :class:`~broker.errors.X509SvidRejectedError` with a stable
``reason="x509.<code>"``, or an :class:`~broker.errors.UntrustedDomainError` when the leaf's
trust domain is not configured. Untrusted values in messages go through
:func:`~broker.core.untrusted.printable`; input bytes are never echoed.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from broker.core.bundle import TrustBundle, TrustStore
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.spiffe_id import SpiffeId, TrustDomain
from broker.core.untrusted import printable
from broker.errors import (
    BadRequestError,
    ConfigurationError,
    InputTooLargeError,
    SpiffeIdError,
    UntrustedDomainError,
    X509SvidRejectedError,
)

DEFAULT_MAX_CHAIN_DEPTH = 4
DEFAULT_SKEW = timedelta(seconds=30)
# pyca's chain depth is a u8 and counts intermediates only (0 = leaf issued by a root).
_MAX_CHAIN_DEPTH_LIMIT = 255
_MIN_RSA_BITS = 2048
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_BEGINNING_OF_TIME = datetime.min.replace(tzinfo=UTC)
_END_OF_TIME = datetime.max.replace(tzinfo=UTC)

# The only relaxation of pyca's Web PKI policies. X509-SVID §4.4: the EKU extension "MAY be
# marked as critical"; CA/Browser Forum rules (which pyca enforces by default) require it
# non-critical. Overriding the EKU entry also drops pyca's own "EKU contains clientAuth" check,
# so _check_leaf_constraints enforces clientAuth itself before pyca runs. No Python validator
# callback is registered instead: pyca would call back into Python on every verification,
# which measured ~15-20 µs, more than all the SPIFFE pre-checks together. Everything else
# stays at pyca's defaults: SPIRE-issued roots, intermediates and leaves already satisfy them
# (tests/pki.py builds that shape and the happy-path tests prove it).
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


class X509SvidVerifier:
    """Verifies X.509-SVIDs of ONE trust domain against that domain's authorities only.

    ``authorities`` are the X.509 authorities of the trust domain's bundle. An empty list is
    allowed and fails closed: every SVID is rejected (a bundle with ``keys: []``).
    ``max_chain_depth`` is the largest number of intermediates between leaf and authority.
    ``skew`` widens every validity window (leaf, intermediates, authority) by that much on
    both sides, so a peer whose clock is slightly off is still accepted.
    """

    __slots__ = (
        "_authorities",
        "_builder",
        "_by_key_id",
        "_max_chain_depth",
        "_skew",
        "_trust_domain",
        "_without_key_id",
    )

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        authorities: Sequence[x509.Certificate],
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
        skew: timedelta = DEFAULT_SKEW,
    ) -> None:
        if not 0 <= max_chain_depth <= _MAX_CHAIN_DEPTH_LIMIT:
            raise ConfigurationError(
                f"max_chain_depth for {trust_domain} is {max_chain_depth}, "
                f"expected 0..{_MAX_CHAIN_DEPTH_LIMIT}",
                reason="x509.bad_max_chain_depth",
            )
        if skew < timedelta(0):
            raise ConfigurationError(
                f"clock skew for {trust_domain} is {skew}, expected zero or more",
                reason="x509.bad_skew",
            )
        self._trust_domain = trust_domain
        self._max_chain_depth = max_chain_depth
        self._skew = skew
        self._authorities = tuple(_Authority(cert) for cert in authorities)
        self._by_key_id: dict[bytes, list[_Authority]] = {}
        for authority in self._authorities:
            if authority.key_id is not None:
                self._by_key_id.setdefault(authority.key_id, []).append(authority)
        self._without_key_id = tuple(a for a in self._authorities if a.key_id is None)
        # Everything except the validation time is fixed per trust domain, so the builder is
        # prepared once; verify() only adds the time and builds (about a microsecond).
        self._builder: PolicyBuilder | None = None
        if self._authorities:
            self._builder = (
                PolicyBuilder()
                .store(Store([authority.cert for authority in self._authorities]))
                .max_chain_depth(max_chain_depth)
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            )

    @property
    def trust_domain(self) -> TrustDomain:
        """The one trust domain this verifier accepts SVIDs from."""
        return self._trust_domain

    def verify(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        *,
        now: datetime,
    ) -> WorkloadIdentity:
        """Verify ``leaf`` (with the peer's ``intermediates``) as an X.509-SVID at ``now``.

        Returns the leaf's identity; ``expires_at`` is the earliest ``notAfter`` of the
        verified chain, since the identity stops being provable when any link expires.
        """
        extensions = _extension_map(leaf, "leaf")
        spiffe_id = _leaf_spiffe_id(extensions)
        return self._verify(leaf, extensions, spiffe_id, intermediates, now=now)

    def _verify(
        self,
        leaf: x509.Certificate,
        extensions: _ExtensionMap,
        spiffe_id: SpiffeId,
        intermediates: Sequence[x509.Certificate],
        *,
        now: datetime,
    ) -> WorkloadIdentity:
        now = _as_utc(now)
        if not spiffe_id.is_member_of(self._trust_domain):
            raise _reject(
                f"leaf SPIFFE ID {printable(str(spiffe_id))} is in trust domain "
                f"{printable(spiffe_id.trust_domain.name)}, this verifier accepts "
                f"{self._trust_domain} only",
                "wrong_trust_domain",
            )
        if self._builder is None:
            raise _reject(
                f"trust domain {self._trust_domain} has no X.509 authorities; "
                "every X.509-SVID is rejected until its bundle has one",
                "no_authorities",
            )
        if len(intermediates) > self._max_chain_depth:
            raise _reject(
                f"chain has {len(intermediates)} intermediates, at most "
                f"{self._max_chain_depth} are allowed for {self._trust_domain}",
                "chain_too_deep",
            )
        _check_leaf_constraints(leaf, extensions)
        presented = [_Presented("leaf", "leaf", leaf, extensions)]
        for position, intermediate in enumerate(intermediates, start=1):
            label = f"intermediate {position}"
            intermediate_extensions = _extension_map(intermediate, label)
            _check_signing_certificate(label, intermediate_extensions)
            presented.append(
                _Presented(label, "intermediate", intermediate, intermediate_extensions)
            )
        validation_time = self._validation_time(presented, now)

        verifier = self._builder.time(validation_time).build_client_verifier()
        try:
            verified = verifier.verify(leaf, list(intermediates))
        except VerificationError as exc:
            # pyca's message names the failing check and the certificate's subject, which is
            # untrusted text: it goes through printable() like any other peer value.
            raise _reject(
                f"chain of {printable(str(spiffe_id))} does not verify against the "
                f"authorities of {self._trust_domain}: {printable(str(exc))}",
                "chain_invalid",
            ) from exc
        expires_at = min(cert.not_valid_after_utc for cert in verified.chain)
        return WorkloadIdentity(
            spiffe_id=spiffe_id, expires_at=expires_at, method=AuthMethod.X509_SVID
        )

    def _validation_time(self, presented: Sequence[_Presented], now: datetime) -> datetime:
        """Check each validity window with the skew, then pick the time pyca checks at.

        pyca checks every certificate of the path at one instant and has no notion of skew.
        Each window [notBefore - skew, notAfter + skew] must contain ``now``; pyca then gets
        ``now`` clamped into the intersection of the exact windows of the presented
        certificates and the authorities that can have issued them. That instant is within
        ``skew`` of ``now`` and inside every window, so pyca's own date check passes exactly
        when the skewed checks here pass (windows that do not overlap at all are rejected).
        """
        earliest = now - self._skew
        latest = now + self._skew
        lower, upper = _BEGINNING_OF_TIME, _END_OF_TIME
        for item in presented:
            not_before, not_after = item.cert.not_valid_before_utc, item.cert.not_valid_after_utc
            if not_after < earliest:
                raise _reject(
                    f"{item.label} expired at {not_after.isoformat()}; checked at "
                    f"{now.isoformat()} with {self._skew.total_seconds():g}s skew",
                    f"{item.kind}_expired",
                )
            if not_before > latest:
                raise _reject(
                    f"{item.label} is not valid before {not_before.isoformat()}; checked at "
                    f"{now.isoformat()} with {self._skew.total_seconds():g}s skew",
                    f"{item.kind}_not_yet_valid",
                )
            lower, upper = max(lower, not_before), min(upper, not_after)
        for authority in self._possible_issuers(presented):
            # An authority outside the skewed window is left out: if the path needs it, pyca
            # rejects the chain at the chosen instant, as it should.
            if authority.not_before <= latest and authority.not_after >= earliest:
                lower = max(lower, authority.not_before)
                upper = min(upper, authority.not_after)
        if lower > upper:
            raise _reject(
                "the validity periods of the leaf, its intermediates and its authority do not "
                f"overlap (latest notBefore {lower.isoformat()}, earliest notAfter "
                f"{upper.isoformat()})",
                "validity_disjoint",
            )
        return min(max(now, lower), upper)

    def _possible_issuers(self, presented: Sequence[_Presented]) -> list[_Authority]:
        """Authorities that may have issued a presented certificate (RFC 5280 4.2.1.1).

        Matched by key identifier (AKI = SKI), which is what SPIRE chains carry; by issuer
        name only when either side has no key identifier. The result only narrows the
        instant handed to pyca, which still decides which authority the path ends at.
        """
        found: list[_Authority] = []
        for item in presented:
            aki = _find(item.extensions, x509.AuthorityKeyIdentifier)
            key_id = None if aki is None else aki.value.key_identifier
            if key_id is not None:
                found.extend(self._by_key_id.get(key_id, ()))
                candidates: Sequence[_Authority] = self._without_key_id
            else:
                candidates = self._authorities
            found.extend(a for a in candidates if a.cert.subject == item.cert.issuer)
        return found


class X509SvidAuthenticator:
    """Picks the verifier of the leaf's own trust domain (never a merged store).

    ``verifiers`` maps each trusted domain to the verifier built from that domain's bundle;
    a leaf naming any other trust domain is an :class:`~broker.errors.UntrustedDomainError`.
    To follow a bundle refresh, build a new verifier (and authenticator): nothing is added to
    an existing one, so a removed authority stops verifying at once.
    """

    __slots__ = ("_verifiers",)

    def __init__(self, verifiers: Mapping[TrustDomain, X509SvidVerifier]) -> None:
        for trust_domain, verifier in verifiers.items():
            if verifier.trust_domain != trust_domain:
                raise ConfigurationError(
                    f"the verifier registered for trust domain {trust_domain} verifies "
                    f"{verifier.trust_domain}",
                    reason="x509.verifier_trust_domain_mismatch",
                )
        self._verifiers = dict(verifiers)

    def authenticate(self, chain: Sequence[x509.Certificate], *, now: datetime) -> WorkloadIdentity:
        """Authenticate a peer from its TLS chain; ``chain[0]`` is the leaf.

        ``chain`` must come from a completed mutual-TLS handshake (proof of possession).
        """
        if not chain:
            raise _reject("no client certificate was presented", "empty_chain")
        leaf, *intermediates = chain
        extensions = _extension_map(leaf, "leaf")
        spiffe_id = _leaf_spiffe_id(extensions)
        verifier = self._verifiers.get(spiffe_id.trust_domain)
        if verifier is None:
            trusted = sorted(td.name for td in self._verifiers)
            raise UntrustedDomainError(
                f"trust domain {printable(spiffe_id.trust_domain.name)} of "
                f"{printable(str(spiffe_id))} is not trusted (trusted: {trusted})",
                reason="x509.untrusted_trust_domain",
            )
        return verifier._verify(leaf, extensions, spiffe_id, intermediates, now=now)


class TrustStoreX509Authenticator:
    """Authenticates X.509-SVIDs against the live :class:`~broker.core.bundle.TrustStore`.

    The leaf's own trust domain picks the bundle (unknown → ``trust_domain.untrusted``, stale →
    ``bundle.stale``: fail closed). One :class:`X509SvidVerifier` is cached per trust domain and
    rebuilt whenever the store holds a different bundle object for it, so a refresh that drops
    an authority takes effect on the next request and nothing is ever merged.

    Results are cached per presented chain: a keep-alive mTLS connection presents the same
    chain on every request, and re-running the path validation for each would cost the same
    answer again. An entry counts only while the store still holds the *same* bundle object for
    the trust domain (a refresh invalidates it), and only inside the window the first
    verification proved: from its ``now`` (minus the skew) until the chain's earliest NotAfter.
    """

    __slots__ = ("_max_chain_depth", "_results", "_skew", "_store", "_verifiers")

    _MAX_RESULTS = 4096

    def __init__(
        self,
        *,
        trust_store: TrustStore,
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
        skew: timedelta = DEFAULT_SKEW,
    ) -> None:
        self._store = trust_store
        self._max_chain_depth = max_chain_depth
        self._skew = skew
        self._verifiers: dict[TrustDomain, tuple[TrustBundle, X509SvidVerifier]] = {}
        self._results: OrderedDict[
            tuple[x509.Certificate, ...], tuple[TrustBundle, WorkloadIdentity, datetime]
        ] = OrderedDict()

    def authenticate(self, chain: Sequence[x509.Certificate], *, now: datetime) -> WorkloadIdentity:
        """Authenticate a peer from its TLS chain (leaf first, from a completed handshake)."""
        if not chain:
            raise _reject("no client certificate was presented", "empty_chain")
        key = tuple(chain)
        hit = self._results.get(key)
        if hit is not None:
            bundle, identity, verified_at = hit
            still_same = self._store.bundle_for(identity.spiffe_id.trust_domain, now) is bundle
            if still_same and verified_at - self._skew <= now < identity.expires_at:
                return identity
            del self._results[key]
        leaf, *intermediates = chain
        extensions = _extension_map(leaf, "leaf")
        spiffe_id = _leaf_spiffe_id(extensions)
        bundle = self._store.bundle_for(spiffe_id.trust_domain, now)
        cached = self._verifiers.get(spiffe_id.trust_domain)
        if cached is None or cached[0] is not bundle:
            verifier = X509SvidVerifier(
                trust_domain=spiffe_id.trust_domain,
                authorities=bundle.x509_authorities,
                max_chain_depth=self._max_chain_depth,
                skew=self._skew,
            )
            self._verifiers[spiffe_id.trust_domain] = (bundle, verifier)
        else:
            verifier = cached[1]
        identity = verifier._verify(leaf, extensions, spiffe_id, intermediates, now=now)
        self._results[key] = (bundle, identity, now)
        if len(self._results) > self._MAX_RESULTS:
            self._results.popitem(last=False)
        return identity


def parse_certificate_chain(
    data: bytes, *, max_bytes: int = 64 * 1024, max_certs: int = 8
) -> list[x509.Certificate]:
    """Parse PEM or (concatenated) DER certificates, within a fixed size budget.

    The size is checked before any parsing (:class:`~broker.errors.InputTooLargeError`).
    Anything that is not only certificates, including a PEM block holding a private key, is a
    :class:`~broker.errors.BadRequestError`; the input is never echoed in the message.
    """
    if len(data) > max_bytes:
        raise InputTooLargeError(
            f"certificate input is {len(data)} bytes, the limit is {max_bytes}",
            reason="x509.input_too_large",
        )
    if not data.strip():
        raise BadRequestError("certificate input is empty", reason="x509.empty_input")
    if b"-----BEGIN" in data:
        return _parse_pem_chain(data, max_certs)
    return _parse_der_chain(data, max_certs)


# --- leaf and signing-certificate rules -------------------------------------------------------


_ExtensionMap = dict[type[x509.ExtensionType], "x509.Extension[x509.ExtensionType]"]
_E = TypeVar("_E", bound=x509.ExtensionType)


class _Authority:
    """An authority certificate with the fields the validation-time choice needs."""

    __slots__ = ("cert", "key_id", "not_after", "not_before")

    def __init__(self, cert: x509.Certificate) -> None:
        self.cert = cert
        self.not_before = cert.not_valid_before_utc
        self.not_after = cert.not_valid_after_utc
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            self.key_id: bytes | None = ski.value.key_identifier
        except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
            # pyca judges a malformed authority when a path reaches it; here it only means
            # the authority is matched by name.
            self.key_id = None


@dataclass(frozen=True, slots=True)
class _Presented:
    """A certificate the peer presented, with its parsed extensions."""

    label: str
    kind: str
    cert: x509.Certificate
    extensions: _ExtensionMap


def _leaf_spiffe_id(extensions: _ExtensionMap) -> SpiffeId:
    """The leaf's one SPIFFE ID (X509-SVID §2, §5.2), which must name a workload."""
    san = _find(extensions, x509.SubjectAlternativeName)
    uris = [] if san is None else san.value.get_values_for_type(x509.UniformResourceIdentifier)
    # X509-SVID §2: exactly one URI SAN; "validators encountering an SVID containing more than
    # one URI SAN MUST reject the SVID", whatever the other URIs are.
    if len(uris) != 1:
        found = ", ".join(printable(uri, 100) for uri in uris[:3]) or "none"
        raise _reject(
            f"leaf has {len(uris)} URI SANs ({found}), expected exactly one SPIFFE ID",
            "uri_san_count",
        )
    uri = uris[0]
    if uri[:7].lower() != "spiffe:":
        raise _reject(
            f"leaf URI SAN {printable(uri)} is not a SPIFFE ID (expected the scheme 'spiffe')",
            "uri_san_not_spiffe",
        )
    try:
        spiffe_id = SpiffeId.parse(uri)
    except SpiffeIdError as exc:
        raise _reject(
            f"leaf URI SAN is not a valid SPIFFE ID: {exc.detail}", "invalid_spiffe_id"
        ) from exc
    # X509-SVID §3.1: "Leaf certificate SPIFFE IDs MUST have a non-root path component."
    if spiffe_id.is_root:
        raise _reject(
            f"leaf SPIFFE ID {printable(uri)} names the trust domain itself, "
            "expected a workload ID with a path",
            "root_id",
        )
    return spiffe_id


def _check_leaf_constraints(leaf: x509.Certificate, extensions: _ExtensionMap) -> None:
    # X509-SVID §4.1 and §5.2: a leaf MUST set cA to false, which needs the extension present.
    basic = _find(extensions, x509.BasicConstraints)
    if basic is None:
        raise _reject(
            "leaf has no BasicConstraints extension, expected one with cA=false",
            "leaf_missing_basic_constraints",
        )
    if basic.value.ca:
        raise _reject("leaf has BasicConstraints cA=true, expected cA=false", "leaf_is_ca")

    # X509-SVID §4.3: key usage "MUST be set on all SVIDs, and MUST be marked critical"; a leaf
    # MUST set digitalSignature and MUST NOT set keyCertSign or cRLSign.
    key_usage = _find(extensions, x509.KeyUsage)
    if key_usage is None:
        raise _reject(
            "leaf has no KeyUsage extension, expected a critical one with digitalSignature",
            "leaf_missing_key_usage",
        )
    if not key_usage.critical:
        raise _reject(
            "leaf KeyUsage extension is not critical, expected critical",
            "leaf_key_usage_not_critical",
        )
    if not key_usage.value.digital_signature:
        raise _reject(
            "leaf KeyUsage lacks digitalSignature, which an X.509-SVID leaf must set",
            "leaf_missing_digital_signature",
        )
    if key_usage.value.key_cert_sign:
        raise _reject(
            "leaf KeyUsage sets keyCertSign, which an X.509-SVID leaf must not set",
            "leaf_key_cert_sign",
        )
    if key_usage.value.crl_sign:
        raise _reject(
            "leaf KeyUsage sets cRLSign, which an X.509-SVID leaf must not set",
            "leaf_crl_sign",
        )

    # X509-SVID §4.4 makes EKU optional; when present the broker, authenticating a client,
    # needs clientAuth (anyExtendedKeyUsage alone is not enough). See _EE_POLICY.
    eku = _find(extensions, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku.value:
        found = ", ".join(oid.dotted_string for oid in list(eku.value)[:5])
        raise _reject(
            f"leaf ExtendedKeyUsage ({printable(found)}) lacks clientAuth "
            f"({ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string})",
            "leaf_eku_missing_client_auth",
        )

    _check_leaf_key(leaf)


def _check_leaf_key(leaf: x509.Certificate) -> None:
    # pyca applies its key-size floor to the keys that verify signatures in the path, not to
    # the leaf's own key, yet that key is what the TLS handshake proves possession of. The set
    # below is the Web PKI's (and covers SPIRE's ec-p256, ec-p384, rsa-2048 and rsa-4096).
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _reject(
            f"leaf public key cannot be read: {printable(str(exc))}", "leaf_key_not_allowed"
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= _MIN_RSA_BITS:
            return
        found = f"RSA-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, _ALLOWED_CURVES):
            return
        found = f"EC {key.curve.name}"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return
    else:
        found = type(key).__name__
    raise _reject(
        f"leaf key is {printable(found)}, expected RSA of at least {_MIN_RSA_BITS} bits, "
        "EC P-256/P-384/P-521, Ed25519 or Ed448",
        "leaf_key_not_allowed",
    )


def _check_signing_certificate(label: str, extensions: _ExtensionMap) -> None:
    """X509-SVID §3.2: every presented intermediate is a CA with keyCertSign.

    pyca checks the certificates on the path it builds; this also covers presented
    certificates it would leave unused, so nothing odd in the chain goes unnoticed.
    """
    basic = _find(extensions, x509.BasicConstraints)
    if basic is None or not basic.value.ca:
        raise _reject(
            f"{label} is not a CA (BasicConstraints cA=true is missing)", "intermediate_not_ca"
        )
    key_usage = _find(extensions, x509.KeyUsage)
    if key_usage is None or not key_usage.value.key_cert_sign:
        raise _reject(
            f"{label} KeyUsage lacks keyCertSign, which a signing certificate must set",
            "intermediate_missing_key_cert_sign",
        )
    # X509-SVID §3.2: "the SPIFFE ID of a signing certificate MUST NOT have a path component".
    san = _find(extensions, x509.SubjectAlternativeName)
    for uri in [] if san is None else san.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and "/" in uri[len("spiffe://") :]:
            raise _reject(
                f"{label} carries the workload SPIFFE ID {printable(uri)}; a signing "
                "certificate may only carry a trust domain ID",
                "intermediate_has_workload_id",
            )


def _extension_map(cert: x509.Certificate, label: str) -> _ExtensionMap:
    """The certificate's extensions by type, parsed once for all the checks."""
    # cryptography parses extensions lazily and raises on duplicates (two SAN extensions are a
    # classic confusion attack) or malformed values; both mean the certificate is rejected.
    try:
        extensions = cert.extensions
    except x509.DuplicateExtension as exc:
        raise _reject(
            f"{label} repeats the extension {exc.oid.dotted_string}", "duplicate_extension"
        ) from exc
    except ValueError as exc:
        raise _reject(
            f"{label} has a malformed extension: {printable(str(exc))}", "malformed_extension"
        ) from exc
    return {type(extension.value): extension for extension in extensions}


def _find(extensions: _ExtensionMap, kind: type[_E]) -> x509.Extension[_E] | None:
    return cast("x509.Extension[_E] | None", extensions.get(kind))


def _as_utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        # A naive time is a programming error in the caller, not a bad request.
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _reject(detail: str, code: str) -> X509SvidRejectedError:
    return X509SvidRejectedError(detail, reason=f"x509.{code}")


# --- parsing ----------------------------------------------------------------------------------

_PEM_LABEL = re.compile(rb"-----BEGIN ([^\r\n]{0,64}?)-----")
# Base64 has no spaces, so "PRIVATE KEY" can only come from a PEM label or the text around
# one: any private key block (PKCS#8, EC, RSA, ENCRYPTED, OPENSSH) matches.
_PRIVATE_KEY = re.compile(rb"PRIVATE\s+KEY", re.IGNORECASE)


def _parse_pem_chain(data: bytes, max_certs: int) -> list[x509.Certificate]:
    if _PRIVATE_KEY.search(data):
        raise BadRequestError(
            "certificate input contains a private key block; send certificates only "
            "(and treat that key as disclosed)",
            reason="x509.pem_private_key",
        )
    labels = _PEM_LABEL.findall(data)
    if len(labels) != data.count(b"-----BEGIN"):
        raise BadRequestError(
            "certificate input has a malformed PEM header line", reason="x509.malformed_pem"
        )
    unexpected = sum(1 for label in labels if label != b"CERTIFICATE")
    if unexpected:
        # The labels are not named: they are caller text, and the caller knows what it sent.
        raise BadRequestError(
            f"certificate input has {unexpected} PEM block(s) that are not certificates; "
            "send certificates only",
            reason="x509.pem_unexpected_block",
        )
    if len(labels) > max_certs:
        raise InputTooLargeError(
            f"certificate input has {len(labels)} certificates, the limit is {max_certs}",
            reason="x509.too_many_certificates",
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BadRequestError(
            "certificate input is not a valid PEM certificate chain", reason="x509.malformed_pem"
        ) from exc
    if len(certs) != len(labels):
        raise BadRequestError(
            f"certificate input has {len(labels)} certificate headers but only {len(certs)} "
            "certificates could be read",
            reason="x509.malformed_pem",
        )
    return certs


def _parse_der_chain(data: bytes, max_certs: int) -> list[x509.Certificate]:
    # cryptography reads one DER certificate and refuses trailing bytes, and a TLS or Workload
    # API chain is certificates back to back. Only the outer SEQUENCE header of each is read
    # here, to find where it ends; cryptography then parses each slice strictly (a non-minimal
    # length, for one, fails there).
    spans: list[tuple[int, int]] = []
    offset = 0
    while offset < len(data):
        end = _der_sequence_end(data, offset)
        if end is None:
            raise BadRequestError(
                "certificate input is neither PEM nor a sequence of DER certificates",
                reason="x509.malformed_der",
            )
        spans.append((offset, end))
        if len(spans) > max_certs:
            raise InputTooLargeError(
                f"certificate input has more than {max_certs} certificates",
                reason="x509.too_many_certificates",
            )
        offset = end
    certs: list[x509.Certificate] = []
    for start, end in spans:
        try:
            certs.append(x509.load_der_x509_certificate(data[start:end]))
        except ValueError as exc:
            raise BadRequestError(
                f"certificate {len(certs) + 1} of the input is not a valid DER certificate",
                reason="x509.malformed_der",
            ) from exc
    return certs


def _der_sequence_end(data: bytes, offset: int) -> int | None:
    """End offset of the DER SEQUENCE starting at ``offset``, or None if there is none."""
    if data[offset] != 0x30 or offset + 2 > len(data):
        return None
    first = data[offset + 1]
    if first < 0x80:
        header, length = 2, first
    else:
        # Long form with 1..4 length bytes; 0x80 (indefinite length) is BER, not DER.
        count = first & 0x7F
        if not 1 <= count <= 4 or offset + 2 + count > len(data):
            return None
        header = 2 + count
        length = int.from_bytes(data[offset + 2 : offset + header], "big")
    end = offset + header + length
    return end if end <= len(data) else None
