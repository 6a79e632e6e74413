"""X.509-SVID verification: SECURITY.md items 1-8, one defect per table row."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.spiffe_id import SpiffeId, TrustDomain
from broker.core.x509svid import (
    X509SvidAuthenticator,
    X509SvidVerifier,
    parse_certificate_chain,
)
from broker.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InputTooLargeError,
    UntrustedDomainError,
    X509SvidRejectedError,
)
from tests.pki import (
    LEAF_KEY_USAGE,
    NOW,
    SPIRE_EKU,
    Authority,
    Overrides,
    key_usage,
    make_root,
    new_key,
    resign,
    to_der,
    to_pem,
    uri_sans,
)

A = TrustDomain("a.test")
B = TrustDomain("b.test")
SKEW = timedelta(seconds=30)
SECOND = timedelta(seconds=1)

ROOT_A = make_root("a.test")
ROOT_B = make_root("b.test")
INTERMEDIATE_A = ROOT_A.intermediate()

VERIFIER_A = X509SvidVerifier(trust_domain=A, authorities=[ROOT_A.cert], skew=SKEW)
VERIFIER_B = X509SvidVerifier(trust_domain=B, authorities=[ROOT_B.cert], skew=SKEW)
AUTHENTICATOR = X509SvidAuthenticator({A: VERIFIER_A, B: VERIFIER_B})

Chain = tuple[x509.Certificate, list[x509.Certificate]]


def identity(spiffe_id: str, expires_at: datetime) -> WorkloadIdentity:
    return WorkloadIdentity(
        spiffe_id=SpiffeId.parse(spiffe_id), expires_at=expires_at, method=AuthMethod.X509_SVID
    )


def rejected(chain: Chain, *, verifier: X509SvidVerifier = VERIFIER_A) -> X509SvidRejectedError:
    leaf, intermediates = chain
    with pytest.raises(X509SvidRejectedError) as caught:
        verifier.verify(leaf, intermediates, now=NOW)
    assert caught.value.status == 401
    return caught.value


def duplicate_san_leaf() -> x509.Certificate:
    """A leaf with two SubjectAlternativeName extensions, each holding one SPIFFE ID."""
    placeholder = x509.ObjectIdentifier("2.5.29.99")  # same DER length as SAN's 2.5.29.17
    second = x509.UnrecognizedExtension(
        placeholder, uri_sans("spiffe://a.test/admin").public_bytes()
    )
    leaf = ROOT_A.leaf(overrides={x509.UnrecognizedExtension: (second, False)})
    return resign(
        leaf, ROOT_A, lambda tbs: tbs.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")
    )


def non_ascii_uri_leaf() -> x509.Certificate:
    """A leaf whose URI SAN holds raw UTF-8 bytes, which an IA5String may not contain."""
    leaf = ROOT_A.leaf("spiffe://a.test/XX")
    return resign(leaf, ROOT_A, lambda tbs: tbs.replace(b"/XX", "/é".encode()))


def tampered_signature_leaf() -> x509.Certificate:
    """A SPIRE-shaped leaf whose signature was made over different bytes."""
    leaf = ROOT_A.leaf()
    good = leaf.tbs_certificate_bytes
    forged = resign(leaf, ROOT_A, lambda tbs: tbs.replace(b"/workload", b"/workloae"))
    der = forged.public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(der.replace(forged.tbs_certificate_bytes, good))


def eku(*oids: x509.ObjectIdentifier) -> x509.ExtendedKeyUsage:
    return x509.ExtendedKeyUsage(list(oids))


SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING
ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE
WORKLOAD_URI = x509.UniformResourceIdentifier("spiffe://a.test/workload")
SAN_OID = ExtensionOID.SUBJECT_ALTERNATIVE_NAME
KEY_USAGE_OID = ExtensionOID.KEY_USAGE


def empty_subject_leaf() -> x509.Certificate:
    """RFC 5280 4.1.2.6: with an empty subject the SAN extension must be critical."""
    critical_san = (uri_sans("spiffe://a.test/workload"), True)
    return ROOT_A.leaf(subject=x509.Name([]), overrides={x509.SubjectAlternativeName: critical_san})


# --- items 1-4: the leaf ------------------------------------------------------------------------

LeafFactory = Callable[[], x509.Certificate]


def leaf_for(spiffe_id: str) -> LeafFactory:
    return lambda: ROOT_A.leaf(spiffe_id)


def leaf_with_uris(*uris: str) -> LeafFactory:
    return lambda: ROOT_A.leaf(uris=uris)


def leaf_with(extension: x509.ExtensionType, *, critical: bool = False) -> LeafFactory:
    return lambda: ROOT_A.leaf(overrides={type(extension): (extension, critical)})


def leaf_without(extension: type[x509.ExtensionType]) -> LeafFactory:
    return lambda: ROOT_A.leaf(overrides={extension: None})


def raw_extension_leaf(oid: x509.ObjectIdentifier, der: bytes) -> LeafFactory:
    """A leaf whose extension ``oid`` holds ``der`` verbatim (replacing the parsed one)."""
    raw = x509.UnrecognizedExtension(oid, der)
    parsed: type[x509.ExtensionType] = (
        x509.SubjectAlternativeName if oid == SAN_OID else x509.KeyUsage
    )
    return lambda: ROOT_A.leaf(overrides={parsed: None, x509.UnrecognizedExtension: (raw, True)})


def leaf_with_key(make_key: Callable[[], Any]) -> LeafFactory:
    return lambda: ROOT_A.leaf(key=make_key())


def unknown_curve_leaf() -> x509.Certificate:
    """A P-256 leaf whose key names the curve OID 1.2.840.10045.3.1.8, which does not exist."""
    p256 = bytes.fromhex("06082a8648ce3d030107")
    return resign(ROOT_A.leaf(), ROOT_A, lambda tbs: tbs.replace(p256, p256[:-1] + b"\x08"))


def weak_rsa_leaf() -> x509.Certificate:
    return ROOT_A.leaf(key=rsa.generate_private_key(65537, 1024))  # noqa: S505 - the defect


def look_alike_root_leaf() -> x509.Certificate:
    """Same subject and trust domain as ROOT_A, different key."""
    return make_root("a.test").leaf()


LEAF_BASIC_CONSTRAINTS_CA = x509.BasicConstraints(ca=True, path_length=None)
UNKNOWN_EXTENSION = x509.UnrecognizedExtension(
    x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
)
DNS_ONLY_SAN = x509.SubjectAlternativeName([x509.DNSName("w.a.test")])

LEAF_DEFECTS: list[tuple[str, LeafFactory, str]] = [
    # 1. exactly one URI SAN (X509-SVID §2), and it is a SPIFFE ID
    ("no SAN extension", leaf_without(x509.SubjectAlternativeName), "uri_san_count"),
    ("only a DNS SAN", leaf_with(DNS_ONLY_SAN), "uri_san_count"),
    (
        "two SPIFFE IDs",
        leaf_with_uris("spiffe://a.test/w", "spiffe://a.test/admin"),
        "uri_san_count",
    ),
    (
        "SPIFFE ID and https URI",
        leaf_with_uris("spiffe://a.test/w", "https://a.test/w"),
        "uri_san_count",
    ),
    ("two SAN extensions", duplicate_san_leaf, "duplicate_extension"),
    ("https URI", leaf_with_uris("https://a.test/w"), "uri_san_not_spiffe"),
    ("urn URI", leaf_with_uris("urn:spiffe:a.test:w"), "uri_san_not_spiffe"),
    ("uppercase scheme", leaf_for("SPIFFE://a.test/w"), "invalid_spiffe_id"),
    ("uppercase trust domain", leaf_for("spiffe://A.test/w"), "invalid_spiffe_id"),
    ("newline in the path", leaf_for("spiffe://a.test/w\n"), "invalid_spiffe_id"),
    ("UTF-8 in the URI", non_ascii_uri_leaf, "invalid_spiffe_id"),
    (
        "byte 0xff in the URI",
        raw_extension_leaf(SAN_OID, b"\x30\x03\x86\x01\xff"),
        "malformed_extension",
    ),
    (
        "KeyUsage not a BIT STRING",
        raw_extension_leaf(KEY_USAGE_OID, b"\x04\x01\x00"),
        "malformed_extension",
    ),
    ("dot-dot segment", leaf_for("spiffe://a.test/x/../admin"), "invalid_spiffe_id"),
    ("percent-encoding", leaf_for("spiffe://a.test/%61dmin"), "invalid_spiffe_id"),
    ("query", leaf_for("spiffe://a.test/w?admin=1"), "invalid_spiffe_id"),
    ("userinfo", leaf_for("spiffe://admin@a.test/w"), "invalid_spiffe_id"),
    # 2. BasicConstraints present with cA=false (X509-SVID §4.1)
    ("no BasicConstraints", leaf_without(x509.BasicConstraints), "leaf_missing_basic_constraints"),
    ("cA=true", leaf_with(LEAF_BASIC_CONSTRAINTS_CA, critical=True), "leaf_is_ca"),
    # 3. KeyUsage present, critical, digitalSignature, no keyCertSign or cRLSign (§4.3)
    ("no KeyUsage", leaf_without(x509.KeyUsage), "leaf_missing_key_usage"),
    ("KeyUsage not critical", leaf_with(LEAF_KEY_USAGE), "leaf_key_usage_not_critical"),
    (
        "no digitalSignature",
        leaf_with(key_usage(key_encipherment=True, key_agreement=True), critical=True),
        "leaf_missing_digital_signature",
    ),
    (
        "keyCertSign",
        leaf_with(key_usage(digital_signature=True, key_cert_sign=True), critical=True),
        "leaf_key_cert_sign",
    ),
    (
        "cRLSign",
        leaf_with(key_usage(digital_signature=True, crl_sign=True), critical=True),
        "leaf_crl_sign",
    ),
    # 4. root-path ID (§3.1); EKU present without clientAuth
    ("root-path ID", leaf_for("spiffe://a.test"), "root_id"),
    ("EKU serverAuth only", leaf_with(eku(SERVER_AUTH)), "leaf_eku_missing_client_auth"),
    ("EKU anyExtendedKeyUsage only", leaf_with(eku(ANY_EKU)), "leaf_eku_missing_client_auth"),
    (
        "EKU codeSigning, critical",
        leaf_with(eku(CODE_SIGNING), critical=True),
        "leaf_eku_missing_client_auth",
    ),
    # the leaf's own key: what the TLS handshake proves possession of
    ("RSA-1024 leaf key", weak_rsa_leaf, "leaf_key_not_allowed"),
    (
        "secp256k1 leaf key",
        leaf_with_key(lambda: ec.generate_private_key(ec.SECP256K1())),
        "leaf_key_not_allowed",
    ),
    ("DSA leaf key", leaf_with_key(lambda: dsa.generate_private_key(1024)), "leaf_key_not_allowed"),  # noqa: S505
    ("unknown EC curve", unknown_curve_leaf, "leaf_key_not_allowed"),
    # signature and path, checked by pyca
    ("tampered signature", tampered_signature_leaf, "chain_invalid"),
    ("signed by a look-alike root", look_alike_root_leaf, "chain_invalid"),
    ("unknown critical extension", leaf_with(UNKNOWN_EXTENSION, critical=True), "chain_invalid"),
    ("no AKI (RFC 5280 4.2.1.1)", leaf_without(x509.AuthorityKeyIdentifier), "chain_invalid"),
]


@pytest.mark.parametrize(
    ("make_leaf", "reason"),
    [pytest.param(make, reason, id=name) for name, make, reason in LEAF_DEFECTS],
)
def test_leaf_defect_is_rejected_with_its_reason(make_leaf: LeafFactory, reason: str) -> None:
    assert rejected((make_leaf(), [])).reason == f"x509.{reason}"


ACCEPTED_LEAVES: list[tuple[str, LeafFactory]] = [
    ("SPIRE default", ROOT_A.leaf),
    ("no EKU (X509-SVID 4.4: SHOULD, not MUST)", leaf_without(x509.ExtendedKeyUsage)),
    ("critical EKU (X509-SVID 4.4: MAY)", leaf_with(SPIRE_EKU, critical=True)),
    ("EKU clientAuth only", leaf_with(eku(CLIENT_AUTH))),
    ("EKU clientAuth and anyExtendedKeyUsage", leaf_with(eku(CLIENT_AUTH, ANY_EKU))),
    ("KeyUsage digitalSignature only", leaf_with(key_usage(digital_signature=True), critical=True)),
    (
        "a DNS SAN beside the SPIFFE ID",
        leaf_with(x509.SubjectAlternativeName([WORKLOAD_URI, x509.DNSName("w.a.test")])),
    ),
    ("empty subject, critical SAN (X509-SVID 3.1)", empty_subject_leaf),
    ("RSA-2048 leaf key", leaf_with_key(lambda: rsa.generate_private_key(65537, 2048))),
    ("P-384 leaf key", leaf_with_key(lambda: ec.generate_private_key(ec.SECP384R1()))),
    ("Ed25519 leaf key", leaf_with_key(ed25519.Ed25519PrivateKey.generate)),
]


@pytest.mark.parametrize("make_leaf", [pytest.param(m, id=name) for name, m in ACCEPTED_LEAVES])
def test_valid_leaf_variant_is_accepted(make_leaf: LeafFactory) -> None:
    leaf = make_leaf()
    expected = identity("spiffe://a.test/workload", leaf.not_valid_after_utc)
    assert VERIFIER_A.verify(leaf, [], now=NOW) == expected


def test_spire_shaped_leaf_issued_by_the_root_is_accepted() -> None:
    leaf = ROOT_A.leaf("spiffe://a.test/ns/prod/sa/agent")
    expected = identity("spiffe://a.test/ns/prod/sa/agent", leaf.not_valid_after_utc)
    assert VERIFIER_A.verify(leaf, [], now=NOW) == expected


def test_spire_shaped_leaf_through_one_intermediate_is_accepted() -> None:
    leaf = INTERMEDIATE_A.leaf("spiffe://a.test/agent")
    expected = identity("spiffe://a.test/agent", leaf.not_valid_after_utc)
    assert VERIFIER_A.verify(leaf, [INTERMEDIATE_A.cert], now=NOW) == expected


def test_identity_expires_with_the_first_certificate_of_the_chain_to_expire() -> None:
    """A leaf that outlives its intermediate is provable only until the intermediate ends."""
    intermediate = ROOT_A.intermediate(not_after=NOW + timedelta(minutes=5))
    leaf = intermediate.leaf()
    verified = VERIFIER_A.verify(leaf, [intermediate.cert], now=NOW)
    assert verified.expires_at == intermediate.cert.not_valid_after_utc


def test_wrong_trust_domain_for_the_verifier_is_rejected() -> None:
    """An a.test-signed leaf naming b.test fails even at a.test's own verifier."""
    assert rejected((ROOT_A.leaf("spiffe://b.test/w"), [])).reason == "x509.wrong_trust_domain"


# --- item 5: intermediates and depth --------------------------------------------------------

ChainFactory = Callable[[], Chain]


def under_intermediate(overrides: Overrides) -> ChainFactory:
    def make() -> Chain:
        intermediate = ROOT_A.intermediate(overrides=overrides)
        return intermediate.leaf(), [intermediate.cert]

    return make


def two_intermediates() -> Chain:
    first = ROOT_A.intermediate()
    second = first.intermediate()
    return second.leaf(), [second.cert, first.cert]


def leaf_among_intermediates() -> Chain:
    return ROOT_A.leaf(), [ROOT_A.leaf("spiffe://a.test/other")]


def intermediate_not_presented() -> Chain:
    return INTERMEDIATE_A.leaf(), []


def one_intermediate() -> Chain:
    return INTERMEDIATE_A.leaf(), [INTERMEDIATE_A.cert]


def intermediate_of_b_for_a() -> Chain:
    """An a.test-looking signing certificate issued by b.test's root."""
    intermediate = ROOT_B.intermediate(trust_domain="a.test")
    return intermediate.leaf(), [intermediate.cert]


def verifier_with_depth(depth: int) -> X509SvidVerifier:
    return X509SvidVerifier(trust_domain=A, authorities=[ROOT_A.cert], max_chain_depth=depth)


NOT_CA = x509.BasicConstraints(ca=False, path_length=None)
CA = x509.BasicConstraints(ca=True, path_length=None)
NO_CERT_SIGN = key_usage(digital_signature=True, crl_sign=True)

INTERMEDIATE_DEFECTS: list[tuple[str, ChainFactory, X509SvidVerifier, str]] = [
    (
        "no BasicConstraints",
        under_intermediate({x509.BasicConstraints: None}),
        VERIFIER_A,
        "intermediate_not_ca",
    ),
    (
        "cA=false",
        under_intermediate({x509.BasicConstraints: (NOT_CA, True)}),
        VERIFIER_A,
        "intermediate_not_ca",
    ),
    ("a leaf among the intermediates", leaf_among_intermediates, VERIFIER_A, "intermediate_not_ca"),
    (
        "no KeyUsage",
        under_intermediate({x509.KeyUsage: None}),
        VERIFIER_A,
        "intermediate_missing_key_cert_sign",
    ),
    (
        "no keyCertSign",
        under_intermediate({x509.KeyUsage: (NO_CERT_SIGN, True)}),
        VERIFIER_A,
        "intermediate_missing_key_cert_sign",
    ),
    (
        "workload ID",
        under_intermediate({x509.SubjectAlternativeName: (uri_sans("spiffe://a.test/ca"), False)}),
        VERIFIER_A,
        "intermediate_has_workload_id",
    ),
    (
        "BasicConstraints not critical",
        under_intermediate({x509.BasicConstraints: (CA, False)}),
        VERIFIER_A,
        "chain_invalid",
    ),
    ("1 intermediate, depth 0", one_intermediate, verifier_with_depth(0), "chain_too_deep"),
    ("2 intermediates, depth 1", two_intermediates, verifier_with_depth(1), "chain_too_deep"),
    ("intermediate not presented", intermediate_not_presented, VERIFIER_A, "chain_invalid"),
    ("intermediate issued by b.test", intermediate_of_b_for_a, VERIFIER_A, "chain_invalid"),
]


@pytest.mark.parametrize(
    ("make_chain", "verifier", "reason"),
    [pytest.param(m, v, reason, id=name) for name, m, v, reason in INTERMEDIATE_DEFECTS],
)
def test_intermediate_defect_is_rejected_with_its_reason(
    make_chain: ChainFactory, verifier: X509SvidVerifier, reason: str
) -> None:
    assert rejected(make_chain(), verifier=verifier).reason == f"x509.{reason}"


def test_chain_exactly_as_deep_as_configured_is_accepted() -> None:
    leaf, intermediates = two_intermediates()
    expected = identity("spiffe://a.test/workload", leaf.not_valid_after_utc)
    assert verifier_with_depth(2).verify(leaf, intermediates, now=NOW) == expected


def test_intermediates_in_any_order_are_accepted() -> None:
    """TLS 1.3 lets a peer send the signing certificates unordered (RFC 8446 4.4.2)."""
    leaf, intermediates = two_intermediates()
    verified = verifier_with_depth(2).verify(leaf, intermediates[::-1], now=NOW)
    assert verified.spiffe_id == SpiffeId.parse("spiffe://a.test/workload")


# --- item 6: dates, at the skew boundaries ----------------------------------------------------

Dated = tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]
"""A leaf, its intermediates and the authorities to verify them with."""
DatedFactory = Callable[[datetime, datetime], Dated]


def leaf_dated(not_before: datetime, not_after: datetime) -> Dated:
    return ROOT_A.leaf(not_before=not_before, not_after=not_after), [], [ROOT_A.cert]


def intermediate_dated(not_before: datetime, not_after: datetime) -> Dated:
    intermediate = ROOT_A.intermediate(not_before=not_before, not_after=not_after)
    leaf = intermediate.leaf(not_before=NOW - HOUR, not_after=NOW + HOUR)
    return leaf, [intermediate.cert], [ROOT_A.cert]


def root_dated(not_before: datetime, not_after: datetime) -> Dated:
    root = make_root("a.test", not_before=not_before, not_after=not_after)
    return root.leaf(not_before=NOW - HOUR, not_after=NOW + HOUR), [], [root.cert]


def root_without_key_id_dated(not_before: datetime, not_after: datetime) -> Dated:
    """Matched to its leaf by issuer name alone, since it has no SubjectKeyIdentifier."""
    root = make_root(
        "a.test",
        not_before=not_before,
        not_after=not_after,
        overrides={x509.SubjectKeyIdentifier: None},
    )
    return root.leaf(not_before=NOW - HOUR, not_after=NOW + HOUR), [], [root.cert]


HOUR = timedelta(hours=1)
INSIDE = SKEW - SECOND
OUTSIDE = SKEW + SECOND

# (name, factory, notBefore and notAfter of the certificate under test, reason or None = valid)
DATE_CASES: list[tuple[str, DatedFactory, datetime, datetime, str | None]] = [
    ("leaf expired 1s outside the skew", leaf_dated, NOW - HOUR, NOW - OUTSIDE, "leaf_expired"),
    ("leaf expired exactly the skew ago", leaf_dated, NOW - HOUR, NOW - SKEW, None),
    ("leaf expired 1s inside the skew", leaf_dated, NOW - HOUR, NOW - INSIDE, None),
    (
        "leaf starts 1s outside the skew",
        leaf_dated,
        NOW + OUTSIDE,
        NOW + HOUR,
        "leaf_not_yet_valid",
    ),
    ("leaf starts exactly the skew ahead", leaf_dated, NOW + SKEW, NOW + HOUR, None),
    ("leaf starts 1s inside the skew", leaf_dated, NOW + INSIDE, NOW + HOUR, None),
    (
        "intermediate expired 1s outside",
        intermediate_dated,
        NOW - HOUR,
        NOW - OUTSIDE,
        "intermediate_expired",
    ),
    ("intermediate expired 1s inside", intermediate_dated, NOW - HOUR, NOW - INSIDE, None),
    (
        "intermediate starts 1s outside",
        intermediate_dated,
        NOW + OUTSIDE,
        NOW + HOUR,
        "intermediate_not_yet_valid",
    ),
    ("intermediate starts 1s inside", intermediate_dated, NOW + INSIDE, NOW + HOUR, None),
    ("root expired 1s outside the skew", root_dated, NOW - HOUR, NOW - OUTSIDE, "chain_invalid"),
    ("root expired 1s inside the skew", root_dated, NOW - HOUR, NOW - INSIDE, None),
    ("root starts 1s outside the skew", root_dated, NOW + OUTSIDE, NOW + HOUR, "chain_invalid"),
    ("root starts 1s inside the skew", root_dated, NOW + INSIDE, NOW + HOUR, None),
    (
        "root without SKI starts 1s inside",
        root_without_key_id_dated,
        NOW + INSIDE,
        NOW + HOUR,
        None,
    ),
    (
        "root without SKI expired 1s inside",
        root_without_key_id_dated,
        NOW - HOUR,
        NOW - INSIDE,
        None,
    ),
]


@pytest.mark.parametrize(
    ("make", "not_before", "not_after", "reason"),
    [pytest.param(make, nb, na, reason, id=name) for name, make, nb, na, reason in DATE_CASES],
)
def test_validity_is_checked_with_the_skew_applied_exactly(
    make: DatedFactory, not_before: datetime, not_after: datetime, reason: str | None
) -> None:
    leaf, intermediates, authorities = make(not_before, not_after)
    verifier = X509SvidVerifier(trust_domain=A, authorities=authorities, skew=SKEW)
    if reason is None:
        verified = verifier.verify(leaf, intermediates, now=NOW)
        assert verified.spiffe_id == SpiffeId.parse("spiffe://a.test/workload")
    else:
        assert rejected((leaf, intermediates), verifier=verifier).reason == f"x509.{reason}"


def test_validity_periods_that_do_not_overlap_are_rejected() -> None:
    """Each window is within the skew of now, but no single instant is in all of them."""
    intermediate = ROOT_A.intermediate(not_before=NOW + 20 * SECOND, not_after=NOW + HOUR)
    leaf = intermediate.leaf(not_before=NOW - HOUR, not_after=NOW + 10 * SECOND)
    assert rejected((leaf, [intermediate.cert])).reason == "x509.validity_disjoint"


def test_zero_skew_rejects_a_leaf_one_second_past_its_end() -> None:
    verifier = X509SvidVerifier(trust_domain=A, authorities=[ROOT_A.cert], skew=timedelta(0))
    leaf = ROOT_A.leaf(not_before=NOW - HOUR, not_after=NOW - SECOND)
    assert rejected((leaf, []), verifier=verifier).reason == "x509.leaf_expired"


def test_now_in_another_timezone_means_the_same_instant() -> None:
    leaf = ROOT_A.leaf(not_before=NOW - HOUR, not_after=NOW - OUTSIDE)
    same_instant = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    with pytest.raises(X509SvidRejectedError) as caught:
        VERIFIER_A.verify(leaf, [], now=same_instant)
    assert caught.value.reason == "x509.leaf_expired"


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        VERIFIER_A.verify(ROOT_A.leaf(), [], now=NOW.replace(tzinfo=None))


# --- item 7: one verifier per trust domain --------------------------------------------------


def authentication_failure(
    chain: Sequence[x509.Certificate], authenticator: X509SvidAuthenticator = AUTHENTICATOR
) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        authenticator.authenticate(chain, now=NOW)
    return caught.value


def test_leaf_of_b_signed_by_a_root_is_rejected_although_both_are_trusted() -> None:
    """No merged store: b.test's verifier knows only b.test's roots."""
    error = authentication_failure([ROOT_A.leaf("spiffe://b.test/agent")])
    assert (type(error), error.reason) == (X509SvidRejectedError, "x509.chain_invalid")


def test_leaf_of_a_signed_by_b_root_is_rejected_although_both_are_trusted() -> None:
    error = authentication_failure([ROOT_B.leaf("spiffe://a.test/agent")])
    assert (type(error), error.reason) == (X509SvidRejectedError, "x509.chain_invalid")


def test_leaf_of_an_unconfigured_trust_domain_is_untrusted() -> None:
    only_a = X509SvidAuthenticator({A: VERIFIER_A})
    error = authentication_failure([ROOT_A.leaf("spiffe://b.test/agent")], only_a)
    assert (type(error), error.reason, error.status) == (
        UntrustedDomainError,
        "x509.untrusted_trust_domain",
        401,
    )
    assert "trust domain b.test of spiffe://b.test/agent is not trusted" in error.detail
    assert "(trusted: ['a.test'])" in error.detail


def test_authenticator_with_no_trust_domains_trusts_nothing() -> None:
    error = authentication_failure([ROOT_A.leaf()], X509SvidAuthenticator({}))
    assert type(error) is UntrustedDomainError


@pytest.mark.parametrize(
    ("root", "spiffe_id"),
    [(ROOT_A, "spiffe://a.test/agent"), (ROOT_B, "spiffe://b.test/agent")],
    ids=["a.test", "b.test"],
)
def test_authenticator_accepts_each_domain_through_its_own_verifier(
    root: Authority, spiffe_id: str
) -> None:
    leaf = root.leaf(spiffe_id)
    verified = AUTHENTICATOR.authenticate([leaf], now=NOW)
    assert verified == identity(spiffe_id, leaf.not_valid_after_utc)


def test_authenticator_takes_the_intermediates_after_the_leaf() -> None:
    leaf = INTERMEDIATE_A.leaf()
    verified = AUTHENTICATOR.authenticate([leaf, INTERMEDIATE_A.cert], now=NOW)
    assert verified == identity("spiffe://a.test/workload", leaf.not_valid_after_utc)


def test_authenticator_checks_the_leaf_rules_before_choosing_a_verifier() -> None:
    error = authentication_failure([ROOT_A.leaf(uris=["spiffe://c.test/w", "spiffe://a.test/w"])])
    assert error.reason == "x509.uri_san_count"


def test_empty_chain_is_rejected() -> None:
    assert authentication_failure([]).reason == "x509.empty_chain"


def test_trust_domain_without_authorities_rejects_every_svid() -> None:
    """A bundle with `keys: []` fails closed (SECURITY.md item 20)."""
    verifier = X509SvidVerifier(trust_domain=A, authorities=[])
    assert rejected((ROOT_A.leaf(), []), verifier=verifier).reason == "x509.no_authorities"


def test_authority_removed_on_refresh_no_longer_verifies() -> None:
    """A refreshed bundle is a new verifier; the old root is not carried over."""
    refreshed = X509SvidVerifier(trust_domain=A, authorities=[make_root("a.test").cert])
    error = authentication_failure([ROOT_A.leaf()], X509SvidAuthenticator({A: refreshed}))
    assert error.reason == "x509.chain_invalid"


def test_bundle_with_two_roots_accepts_leaves_of_both() -> None:
    new_root = make_root("a.test")
    verifier = X509SvidVerifier(trust_domain=A, authorities=[ROOT_A.cert, new_root.cert])
    verified = [verifier.verify(root.leaf(), [], now=NOW).spiffe_id for root in (ROOT_A, new_root)]
    assert verified == [SpiffeId.parse("spiffe://a.test/workload")] * 2


def test_root_that_just_expired_does_not_disturb_a_fresh_leaf_of_its_successor() -> None:
    """Only the leaf's own issuer (by name and key identifier) narrows pyca's instant."""
    old_root = make_root("a.test", not_before=NOW - 400 * HOUR, not_after=NOW - 20 * SECOND)
    verifier = X509SvidVerifier(trust_domain=A, authorities=[old_root.cert, ROOT_A.cert])
    leaf = ROOT_A.leaf(not_before=NOW - 5 * SECOND, not_after=NOW + HOUR)
    assert verifier.verify(leaf, [], now=NOW) == identity("spiffe://a.test/workload", NOW + HOUR)


def test_verifier_registered_under_another_trust_domain_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        X509SvidAuthenticator({B: VERIFIER_A})
    assert caught.value.reason == "x509.verifier_trust_domain_mismatch"


@pytest.mark.parametrize(
    ("depth", "skew", "reason"),
    [
        pytest.param(-1, SKEW, "x509.bad_max_chain_depth", id="negative depth"),
        pytest.param(256, SKEW, "x509.bad_max_chain_depth", id="depth over 255"),
        pytest.param(4, -SECOND, "x509.bad_skew", id="negative skew"),
    ],
)
def test_bad_verifier_settings_are_refused(depth: int, skew: timedelta, reason: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        X509SvidVerifier(
            trust_domain=A, authorities=[ROOT_A.cert], max_chain_depth=depth, skew=skew
        )
    assert caught.value.reason == reason


# --- item 38: hostile values stay one short escaped line ------------------------------------

HOSTILE = "\r\n\x1b[31mFAKE LOG LINE " + "A" * 100_000
HOSTILE_SUBJECT = x509.Name(
    [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "x\r\n\x1b[2J\u202e" + "A" * 5_000)]
)


def leaf_quoted_by_pyca() -> x509.Certificate:
    """pyca names the certificate (with its subject) when its extension policy fails."""
    unknown_critical = (UNKNOWN_EXTENSION, True)
    return ROOT_A.leaf(
        subject=HOSTILE_SUBJECT, overrides={x509.UnrecognizedExtension: unknown_critical}
    )


HOSTILE_CASES: list[tuple[str, LeafFactory]] = [
    ("non-spiffe URI", leaf_with_uris("https://x/" + HOSTILE)),
    ("two URIs", leaf_with_uris("spiffe://a.test/a\r\nx", "x:" + HOSTILE)),
    ("invalid SPIFFE ID", leaf_for("spiffe://a.test/w\r\n\x1b[2J")),
    ("subject quoted by pyca", leaf_quoted_by_pyca),
]


@pytest.mark.parametrize("make_leaf", [pytest.param(m, id=name) for name, m in HOSTILE_CASES])
def test_hostile_values_in_a_rejection_are_escaped_and_truncated(make_leaf: LeafFactory) -> None:
    detail = rejected((make_leaf(), [])).detail
    assert [ch for ch in detail if ch in "\r\n\x1b\u202e"] == []
    assert len(detail) < 1_000


# --- item 8: parsing untrusted bytes --------------------------------------------------------

KEY_PEM = new_key().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
EC_KEY_PEM = new_key().private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
PUBLIC_KEY_PEM = (
    new_key()
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)
CRL_PEM = b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
CHAIN_PEM = to_pem(INTERMEDIATE_A.leaf(), INTERMEDIATE_A.cert)
LEAF_DER = to_der(INTERMEDIATE_A.leaf())
CANARY = b"CANARY-5f0c2a-DO-NOT-ECHO"
BEGIN = b"-----BEGIN CERTIFICATE-----\n"
END = b"\n-----END CERTIFICATE-----\n"
KIB_64 = 64 * 1024
LONG_LABEL_BLOCK = b"-----BEGIN " + b"X" * 100 + b"-----\nAAAA\n-----END " + b"X" * 100 + b"-----\n"

PARSE_DEFECTS: list[tuple[str, bytes, type[BadRequestError], str]] = [
    ("empty", b"", BadRequestError, "empty_input"),
    ("whitespace", b" \r\n\t", BadRequestError, "empty_input"),
    ("text", b"hello " + CANARY, BadRequestError, "malformed_der"),
    ("binary garbage", b"\x00\xff" + CANARY, BadRequestError, "malformed_der"),
    ("DER SEQUENCE, not a certificate", b"\x30\x03\x02\x01\x05", BadRequestError, "malformed_der"),
    ("truncated DER", LEAF_DER[:-10], BadRequestError, "malformed_der"),
    ("DER and a trailing byte", LEAF_DER + b"\x00", BadRequestError, "malformed_der"),
    ("indefinite-length BER", b"\x30\x80" + LEAF_DER[4:], BadRequestError, "malformed_der"),
    ("five length bytes", b"\x30\x85\x00\x00\x00\x01\x00", BadRequestError, "malformed_der"),
    ("PEM, broken base64", BEGIN + CANARY + b"!!" + END, BadRequestError, "malformed_pem"),
    ("PEM header only", BEGIN + CANARY, BadRequestError, "malformed_pem"),
    (
        "chain and an unterminated block",
        CHAIN_PEM + BEGIN + b"AAAA\n",
        BadRequestError,
        "malformed_pem",
    ),
    ("chain and a 100-byte label", CHAIN_PEM + LONG_LABEL_BLOCK, BadRequestError, "malformed_pem"),
    ("chain and a PKCS#8 key", CHAIN_PEM + KEY_PEM, BadRequestError, "pem_private_key"),
    ("EC private key alone", EC_KEY_PEM, BadRequestError, "pem_private_key"),
    ("PEM public key", PUBLIC_KEY_PEM, BadRequestError, "pem_unexpected_block"),
    ("certificate and a CRL", CHAIN_PEM + CRL_PEM, BadRequestError, "pem_unexpected_block"),
    ("9 PEM certificates", to_pem(*[ROOT_A.cert] * 9), InputTooLargeError, "too_many_certificates"),
    ("9 DER certificates", to_der(*[ROOT_A.cert] * 9), InputTooLargeError, "too_many_certificates"),
    (
        "5 MB of certificates",
        CHAIN_PEM * (5_000_000 // len(CHAIN_PEM)),
        InputTooLargeError,
        "input_too_large",
    ),
    ("64 KiB and one byte", b"\x00" * (KIB_64 + 1), InputTooLargeError, "input_too_large"),
]


@pytest.mark.parametrize(
    ("data", "error", "reason"),
    [pytest.param(data, error, reason, id=name) for name, data, error, reason in PARSE_DEFECTS],
)
def test_bad_certificate_input_is_a_400_that_echoes_nothing(
    data: bytes, error: type[BadRequestError], reason: str
) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse_certificate_chain(data)
    found = (type(caught.value), caught.value.reason, caught.value.status)
    assert found == (error, f"x509.{reason}", 400)
    assert echoed(caught.value.detail, data) == []


def echoed(detail: str, data: bytes) -> list[str]:
    """The 12-character stretches of ``detail`` that also occur in ``data``."""
    text = data.decode("latin-1")
    return [detail[i : i + 12] for i in range(len(detail) - 11) if detail[i : i + 12] in text]


def test_oversized_input_is_refused_before_any_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_parse(data: bytes) -> list[x509.Certificate]:
        raise AssertionError("parsed an input over the size budget")

    monkeypatch.setattr(x509, "load_pem_x509_certificates", must_not_parse)
    with pytest.raises(InputTooLargeError):
        parse_certificate_chain(CHAIN_PEM * 1_000)


def test_largest_accepted_input_is_refused_within_a_fixed_budget() -> None:
    """64 KiB of PEM-shaped garbage costs far less than a request's time budget."""
    data = (BEGIN + b"A" * KIB_64)[: KIB_64 - len(END)] + END
    started = time.perf_counter()
    with pytest.raises(BadRequestError):
        parse_certificate_chain(data)
    assert time.perf_counter() - started < 0.25


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(CHAIN_PEM, id="PEM"),
        pytest.param(b"explanatory text (RFC 7468)\n" + CHAIN_PEM, id="PEM with text"),
        pytest.param(to_der(*x509.load_pem_x509_certificates(CHAIN_PEM)), id="concatenated DER"),
    ],
)
def test_certificate_chain_parses_from_pem_or_der(data: bytes) -> None:
    chain = parse_certificate_chain(data)
    assert chain == x509.load_pem_x509_certificates(CHAIN_PEM)
    assert AUTHENTICATOR.authenticate(chain, now=NOW) == identity(
        "spiffe://a.test/workload", chain[0].not_valid_after_utc
    )


def test_eight_certificates_are_within_the_budget() -> None:
    assert len(parse_certificate_chain(to_pem(*[ROOT_A.cert] * 8))) == 8
