"""SPIFFE bundles and the trust store: SECURITY 19-21 (bundle side), one defect per row."""

from __future__ import annotations

import base64
import contextlib
import json
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.bundle import (
    ReplaceOutcome,
    SkippedKey,
    TrustBundle,
    TrustStore,
    parse_spiffe_bundle,
)
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.spiffe_id import SpiffeId, TrustDomain
from broker.errors import (
    BundleUnavailableError,
    ConfigurationError,
    JwtSvidRejectedError,
    UntrustedDomainError,
)
from tests.jwt_tokens import (
    AUDIENCE,
    DROP,
    NOW,
    SUB_A,
    SUB_B,
    TD_A,
    TD_B,
    Signer,
    b64url,
    bundle_json,
    bundle_of,
    ca_cert,
    ec_key,
    ed25519_key,
    rsa_key,
    signer_es256_a,
    signer_es256_b_colliding,
    signer_rs256_a,
    token,
    x509_jwk,
)

FETCHED = NOW - timedelta(minutes=1)


def _fake_rsa_jwk(bits: int, kid: str = "weird-rsa") -> dict[str, object]:
    # An odd modulus of exactly `bits` bits: no key generation needed to test the size policy.
    n = (1 << (bits - 1)) | 1
    return {
        "use": "jwt-svid",
        "kid": kid,
        "kty": "RSA",
        "n": b64url(n.to_bytes(bits // 8, "big")),
        "e": "AQAB",
    }


def _good_entries() -> list[dict[str, object]]:
    return [x509_jwk(ca_cert(TD_A)), signer_es256_a().jwk(), signer_rs256_a().jwk()]


def _parse(entries: list[dict[str, object]], **kwargs: object) -> TrustBundle:
    return parse_spiffe_bundle(TD_A, bundle_json(entries, **kwargs))


# ---------------------------------------------------------------------------------------------
# Happy path


def test_bundle_with_ca_and_jwt_keys_parses_with_all_fields() -> None:
    bundle = _parse(_good_entries(), sequence=42, refresh_hint=300)

    expected = (
        TD_A,
        (ca_cert(TD_A),),
        {"a-ec-1": signer_es256_a().public_key, "a-rsa-1": signer_rs256_a().public_key},
        timedelta(seconds=300),
        42,
        (),
    )
    assert expected == (
        bundle.trust_domain,
        bundle.x509_authorities,
        dict(bundle.jwt_authorities),
        bundle.refresh_hint,
        bundle.sequence_number,
        bundle.skipped,
    )


def test_bundle_without_sequence_or_refresh_hint_is_valid() -> None:
    bundle = _parse(_good_entries(), sequence=DROP, refresh_hint=DROP)

    assert (
        bundle.sequence_number,
        bundle.refresh_hint,
        len(bundle.jwt_authorities),
    ) == (None, None, 2)


def test_unknown_top_level_members_are_allowed() -> None:
    """Trust Domain and Bundle §4.1: other parameters MAY be present."""
    raw = json.dumps({"keys": [signer_es256_a().jwk()], "x-vendor": {"a": 1}}).encode()

    assert list(parse_spiffe_bundle(TD_A, raw).jwt_authorities) == ["a-ec-1"]


def test_duplicate_ca_entries_collapse_to_one_authority() -> None:
    entry = x509_jwk(ca_cert(TD_A))

    assert len(_parse([entry, entry]).x509_authorities) == 1


def test_parsed_bundle_is_immutable() -> None:
    bundle = _parse(_good_entries())

    with pytest.raises(TypeError):
        bundle.jwt_authorities["evil"] = signer_es256_a().public_key  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# SECURITY 19: entries that are ignored, never an authority


def _x5c(value: object) -> dict[str, object]:
    return x509_jwk(ca_cert(TD_A), x5c=value)


def _ca_der_patched(old: bytes, new: bytes, *, extra_oid: str | None = None) -> str:
    """A CA certificate's base64 DER with ``old`` bytes replaced by ``new`` (signature broken).

    ``extra_oid`` adds an unrecognised extension carrying a BasicConstraints value, so a patch
    can turn its OID into a second BasicConstraints.
    """
    key = ec_key("P-256", "patched")
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a.test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if extra_oid is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(extra_oid), b"\x30\x03\x01\x01\xff"),
            critical=False,
        )
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    return base64.b64encode(der.replace(old, new)).decode()


_DUPLICATE_BC = _ca_der_patched(
    bytes.fromhex("0603551d63"), bytes.fromhex("0603551d13"), extra_oid="2.5.29.99"
)
# id-ecPublicKey 1.2.840.10045.2.1 turned into an unknown 1.2.840.10045.2.9.
_UNKNOWN_KEY_ALG = _ca_der_patched(
    bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209")
)

_LEAF = ca_cert(TD_A, key_label="leaf", ca=False, key_cert_sign=False)
_NO_BC = ca_cert(TD_A, key_label="nobc", ca=None)
_CA_NO_CERTSIGN = ca_cert(TD_A, key_label="nocertsign", key_cert_sign=False)
_ES = signer_es256_a


IGNORED_ENTRIES: list[tuple[str, dict[str, object], str]] = [
    ("no use", _ES().jwk(use=DROP, kid="k-no-use"), "bundle_key.use_missing"),
    ("use null", _ES().jwk(use=None, kid="k-null-use"), "bundle_key.use_missing"),
    ("use sig (JOSE, not SPIFFE)", _ES().jwk(use="sig", kid="k-sig"), "bundle_key.use_unknown"),
    ("use JWT-SVID uppercase", _ES().jwk(use="JWT-SVID", kid="k-up"), "bundle_key.use_unknown"),
    ("use is a list", _ES().jwk(use=["jwt-svid"], kid="k-list"), "bundle_key.use_unknown"),
    (
        "kty oct",
        {"use": "jwt-svid", "kid": "k-oct", "kty": "oct", "k": b64url(b"secret" * 6)},
        "bundle_key.kty_oct",
    ),
    ("kty missing", _ES().jwk(kty=DROP, kid="k-nokty"), "bundle_key.kty_missing"),
    ("kty OKP", _ES().jwk(kty="OKP", kid="k-okp"), "bundle_key.kty_unsupported"),
    ("kty lowercase ec", _ES().jwk(kty="ec", kid="k-ec"), "bundle_key.kty_unsupported"),
    (
        "private d member",
        _ES().jwk(d=b64url(b"\x01" * 32), kid="k-priv"),
        "bundle_key.private_material",
    ),
    ("kid missing", _ES().jwk(kid=DROP), "bundle_key.kid_missing"),
    ("kid path", _ES().jwk(kid="../keys/a"), "bundle_key.kid_malformed"),
    ("kid URL", _ES().jwk(kid="https://evil.example/k"), "bundle_key.kid_malformed"),
    ("kid number", _ES().jwk(kid=7), "bundle_key.kid_malformed"),
    ("RSA 1024 bits", _fake_rsa_jwk(1024), "bundle_key.rsa_too_small"),
    ("RSA 2040 bits", _fake_rsa_jwk(2040), "bundle_key.rsa_too_small"),
    ("RSA 8200 bits", _fake_rsa_jwk(8200), "bundle_key.rsa_too_large"),
    ("RSA even exponent", _fake_rsa_jwk(2048) | {"e": "AAQ"}, "bundle_key.rsa_malformed"),
    ("RSA exponent 1", _fake_rsa_jwk(2048) | {"e": "AQ"}, "bundle_key.rsa_malformed"),
    ("RSA n missing", _fake_rsa_jwk(2048) | {"n": None}, "bundle_key.rsa_malformed"),
    ("RSA n padded", _fake_rsa_jwk(2048) | {"e": "AQAB=="}, "bundle_key.rsa_malformed"),
    ("EC secp256k1", _ES().jwk(crv="secp256k1", kid="k-k1"), "bundle_key.ec_curve_unsupported"),
    ("EC crv missing", _ES().jwk(crv=DROP, kid="k-nocrv"), "bundle_key.ec_curve_unsupported"),
    ("EC x short", _ES().jwk(x=b64url(b"\x01" * 31), kid="k-short"), "bundle_key.ec_malformed"),
    (
        "EC point off curve",
        _ES().jwk(y=b64url(b"\x01" * 32), kid="k-off"),
        "bundle_key.ec_malformed",
    ),
    ("EC x standard base64", _ES().jwk(x="+" * 43, kid="k-b64"), "bundle_key.ec_malformed"),
    ("alg ES384 on P-256 key", _ES().jwk(alg="ES384", kid="k-alg"), "bundle_key.alg_mismatch"),
    ("alg HS256", _ES().jwk(alg="HS256", kid="k-hs"), "bundle_key.alg_mismatch"),
    ("x5c missing", x509_jwk(ca_cert(TD_A), x5c=DROP), "bundle_key.x5c_missing"),
    ("x5c empty", _x5c([]), "bundle_key.x5c_missing"),
    ("x5c a string", _x5c("MIIB"), "bundle_key.x5c_missing"),
    (
        "x5c two certificates",
        _x5c([x509_jwk(ca_cert(TD_A))["x5c"][0], x509_jwk(ca_cert(TD_B))["x5c"][0]]),  # type: ignore[index]
        "bundle_key.x5c_count",
    ),
    ("x5c not base64", _x5c(["not base64!"]), "bundle_key.x5c_malformed"),
    ("x5c base64url", _x5c(["-_-_"]), "bundle_key.x5c_malformed"),
    (
        "x5c garbage DER",
        _x5c([base64.b64encode(b"\x30\x03\x02\x01\x01").decode()]),
        "bundle_key.x5c_malformed",
    ),
    ("x5c number", _x5c([7]), "bundle_key.x5c_malformed"),
    ("x5c duplicate BasicConstraints", _x5c([_DUPLICATE_BC]), "bundle_key.x5c_malformed"),
    ("x5c unknown key algorithm", _x5c([_UNKNOWN_KEY_ALG]), "bundle_key.x5c_malformed"),
    ("x5c leaf (cA=false)", x509_jwk(_LEAF), "bundle_key.not_a_ca"),
    ("x5c no BasicConstraints", x509_jwk(_NO_BC), "bundle_key.not_a_ca"),
    ("x5c CA without keyCertSign", x509_jwk(_CA_NO_CERTSIGN), "bundle_key.not_a_ca"),
    ("x5c kty says RSA, cert is EC", x509_jwk(ca_cert(TD_A), kty="RSA"), "bundle_key.kty_mismatch"),
    ("x5c kty oct", x509_jwk(ca_cert(TD_A), kty="oct"), "bundle_key.kty_oct"),
]


@pytest.mark.parametrize(
    ("case", "entry", "reason"), IGNORED_ENTRIES, ids=[row[0] for row in IGNORED_ENTRIES]
)
def test_defective_entry_is_ignored_recorded_and_never_an_authority(
    case: str, entry: dict[str, object], reason: str
) -> None:
    good = signer_rs256_a().jwk()

    bundle = _parse([good, entry])

    assert (["a-rsa-1"], (), [SkippedKey(1, reason, bundle.skipped[0].detail)]) == (
        list(bundle.jwt_authorities),
        bundle.x509_authorities,
        list(bundle.skipped),
    )


def test_ignored_entry_kid_does_not_verify_tokens() -> None:
    """A token signed by a key whose entry had no `use` is rejected: kid unknown."""
    signer = signer_es256_a()
    store = TrustStore()
    store.replace(_parse([signer.jwk(use=DROP)]), FETCHED)
    verifier = JwtSvidVerifier(audience=AUDIENCE, trust_store=store)

    with pytest.raises(JwtSvidRejectedError) as info:
        verifier.verify(token(signer), now=NOW)

    assert info.value.reason == "jwt.kid_unknown"


def test_skipped_detail_escapes_untrusted_values() -> None:
    bundle = _parse([_ES().jwk(use="x\r\n\x1b[2J" + "u" * 10_000)])

    detail = bundle.skipped[0].detail
    assert ("\n" in detail, "\x1b" in detail, len(detail) < 200) == (False, False, True)


# ---------------------------------------------------------------------------------------------
# SECURITY 19: bundles that are rejected whole


def _raw_keys(*entries: str) -> bytes:
    return ('{"keys":[' + ",".join(entries) + "]}").encode()


_EC_JWK = json.dumps(signer_es256_a().jwk())
_RSA_JWK = json.dumps(signer_rs256_a().jwk())

REJECTED_BUNDLES: list[tuple[str, bytes, str]] = [
    (
        "duplicate jwt-svid kid",
        bundle_json([signer_es256_a().jwk(), signer_rs256_a().jwk(kid="a-ec-1")]),
        "bundle.duplicate_kid",
    ),
    (
        "duplicate kid, second entry would be ignored",
        bundle_json([signer_es256_a().jwk(), {"use": "jwt-svid", "kid": "a-ec-1", "kty": "oct"}]),
        "bundle.duplicate_kid",
    ),
    (
        "duplicate keys member",
        f'{{"keys":[],"keys":[{_EC_JWK}]}}'.encode(),
        "bundle.duplicate_member",
    ),
    (
        "duplicate member inside a JWK",
        _raw_keys(_EC_JWK[:-1] + ',"use":"x509-svid"}'),
        "bundle.duplicate_member",
    ),
    (
        "duplicate spiffe_sequence",
        b'{"keys":[],"spiffe_sequence":1,"spiffe_sequence":9}',
        "bundle.duplicate_member",
    ),
    (
        "duplicate member in an unknown nested object",
        b'{"keys":[],"x":{"a":1,"a":2}}',
        "bundle.duplicate_member",
    ),
    ("not JSON", b"{keys: []}", "bundle.malformed_json"),
    ("empty body", b"", "bundle.malformed_json"),
    ("not UTF-8", b'{"keys":[],"x":"\xff"}', "bundle.malformed_json"),
    ("UTF-16", '{"keys":[]}'.encode("utf-16"), "bundle.malformed_json"),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"keys":[]}', "bundle.malformed_json"),
    ("NaN", b'{"keys":[],"spiffe_sequence":NaN}', "bundle.malformed_json"),
    (
        "deep nesting",
        b'{"keys":[],"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
        "bundle.malformed_json",
    ),
    (
        "huge integer",
        b'{"keys":[],"spiffe_sequence":' + b"9" * 5000 + b"}",
        "bundle.malformed_json",
    ),
    ("top-level array", _raw_keys()[8:-1], "bundle.not_an_object"),
    ("keys missing", b'{"spiffe_sequence":1}', "bundle.keys_missing"),
    ("keys an object", b'{"keys":{"a":1}}', "bundle.keys_not_a_list"),
    ("keys null", b'{"keys":null}', "bundle.keys_not_a_list"),
    ("keys a string", b'{"keys":"[]"}', "bundle.keys_not_a_list"),
    ("keys a number", b'{"keys":0}', "bundle.keys_not_a_list"),
    ("keys false", b'{"keys":false}', "bundle.keys_not_a_list"),
    ("key entry a list", _raw_keys("[]"), "bundle.key_not_an_object"),
    ("key entry a string", _raw_keys('"MIIB"'), "bundle.key_not_an_object"),
    ("key entry null", _raw_keys("null"), "bundle.key_not_an_object"),
    ("too many keys", _raw_keys(*["{}"] * 1001), "bundle.too_many_keys"),
    ("sequence negative", bundle_json([], sequence=-1), "bundle.bad_sequence"),
    ("sequence float", bundle_json([], sequence=1.5), "bundle.bad_sequence"),
    ("sequence string", bundle_json([], sequence="7"), "bundle.bad_sequence"),
    ("sequence true", bundle_json([], sequence=True), "bundle.bad_sequence"),
    ("sequence above 2^64-1", bundle_json([], sequence=2**64), "bundle.bad_sequence"),
    ("refresh hint negative", bundle_json([], refresh_hint=-300), "bundle.bad_refresh_hint"),
    ("refresh hint string", bundle_json([], refresh_hint="5m"), "bundle.bad_refresh_hint"),
    ("refresh hint 1e30", bundle_json([], refresh_hint=1e30), "bundle.bad_refresh_hint"),
    ("refresh hint absurd", bundle_json([], refresh_hint=10**12), "bundle.bad_refresh_hint"),
]


@pytest.mark.parametrize(
    ("case", "data", "reason"), REJECTED_BUNDLES, ids=[row[0] for row in REJECTED_BUNDLES]
)
def test_malformed_or_ambiguous_bundle_is_rejected_whole(
    case: str, data: bytes, reason: str
) -> None:
    with pytest.raises(BundleUnavailableError) as info:
        parse_spiffe_bundle(TD_A, data)

    assert reason == info.value.reason


def test_bundle_given_as_text_is_rejected() -> None:
    with pytest.raises(BundleUnavailableError) as info:
        parse_spiffe_bundle(TD_A, '{"keys": []}')  # type: ignore[arg-type]

    assert info.value.reason == "bundle.malformed_json"


def test_duplicate_member_among_many_is_found_in_linear_time() -> None:
    members = ",".join(f'"m{i}":{i}' for i in range(20_000))
    data = ('{"keys":[],' + members + ',"m0":1}').encode()

    with pytest.raises(BundleUnavailableError) as info:
        parse_spiffe_bundle(TD_A, data)

    assert (info.value.reason, "m0" in info.value.detail) == ("bundle.duplicate_member", True)


def test_oversized_bundle_is_rejected_before_parsing() -> None:
    data = b'{"keys":[' + b" " * 2048 + b"]}"

    with pytest.raises(BundleUnavailableError) as info:
        parse_spiffe_bundle(TD_A, data, max_bytes=1024)

    assert info.value.reason == "bundle.too_large"


def test_same_kid_in_jwt_and_x509_entries_is_not_a_duplicate() -> None:
    """X509-SVID entries carry no kid (§6.1); a stray one does not clash with a JWT key."""
    bundle = _parse([x509_jwk(ca_cert(TD_A), kid="a-ec-1"), signer_es256_a().jwk()])

    assert (len(bundle.x509_authorities), list(bundle.jwt_authorities)) == (1, ["a-ec-1"])


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_bundle_errors(data: bytes) -> None:
    with contextlib.suppress(BundleUnavailableError):
        parse_spiffe_bundle(TD_A, data)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_jwk_like = st.fixed_dictionaries(
    {},
    optional={
        "use": st.sampled_from(["jwt-svid", "x509-svid"]) | _json,
        "kid": st.sampled_from(["k1", "k2"]) | _json,
        "kty": st.sampled_from(["EC", "RSA", "oct"]) | _json,
        "crv": st.sampled_from(["P-256", "P-384"]) | _json,
        "x": _json,
        "y": _json,
        "n": _json,
        "e": _json,
        "x5c": st.lists(st.text(max_size=20), max_size=2) | _json,
        "alg": _json,
    },
)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    keys=st.lists(_jwk_like, max_size=4) | _json,
    sequence=_json,
    hint=_json,
)
def test_arbitrary_jwk_sets_only_raise_bundle_errors(
    keys: object, sequence: object, hint: object
) -> None:
    data = json.dumps({"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": hint})
    with contextlib.suppress(BundleUnavailableError):
        parse_spiffe_bundle(TD_A, data.encode())


# ---------------------------------------------------------------------------------------------
# from_authorities and direct construction


def test_from_authorities_keeps_good_authorities_and_skips_the_rest() -> None:
    leaf = _LEAF
    good_ca = ca_cert(TD_A)
    keys = {
        "good": signer_es256_a().public_key,
        "weak": rsa_key(1024).public_key(),
        "../x": signer_rs256_a().public_key,
        "ed": ed25519_key().public_key(),
        "k1": ec_key("secp256k1").public_key(),
    }

    bundle = TrustBundle.from_authorities(
        TD_A,
        x509_authorities=[good_ca, leaf, good_ca, "MIIB"],  # type: ignore[list-item]
        jwt_authorities=keys,
        sequence_number=3,
    )

    assert (
        (good_ca,),
        ["good"],
        [
            (1, "bundle_key.not_a_ca"),
            (3, "bundle_key.x5c_malformed"),
            (5, "bundle_key.rsa_too_small"),
            (6, "bundle_key.kid_malformed"),
            (7, "bundle_key.kty_unsupported"),
            (8, "bundle_key.ec_curve_unsupported"),
        ],
    ) == (
        bundle.x509_authorities,
        list(bundle.jwt_authorities),
        [(s.index, s.reason) for s in bundle.skipped],
    )


INVALID_DIRECT: list[tuple[str, dict[str, object]]] = [
    ("RSA 1024 key", {"jwt_authorities": {"weak": rsa_key(1024).public_key()}}),
    ("Ed25519 key", {"jwt_authorities": {"ed": ed25519_key().public_key()}}),
    ("unsafe kid", {"jwt_authorities": {"../x": signer_es256_a().public_key}}),
    ("not a certificate", {"x509_authorities": ("MIIB",)}),
    ("leaf certificate", {"x509_authorities": (_LEAF,)}),
    (
        "alg not fitting the key",
        {
            "jwt_authorities": {"a-ec-1": signer_es256_a().public_key},
            "jwt_authority_algorithms": {"a-ec-1": "RS256"},
        },
    ),
    ("alg for a missing key", {"jwt_authority_algorithms": {"missing": "ES256"}}),
    ("trust domain as text", {"trust_domain": "a.test"}),
    ("negative sequence", {"sequence_number": -1}),
    ("boolean sequence", {"sequence_number": True}),
    ("negative refresh hint", {"refresh_hint": timedelta(seconds=-1)}),
]


@pytest.mark.parametrize(("case", "kwargs"), INVALID_DIRECT, ids=[row[0] for row in INVALID_DIRECT])
def test_direct_construction_refuses_invalid_authorities(
    case: str, kwargs: dict[str, object]
) -> None:
    with pytest.raises(BundleUnavailableError) as info:
        TrustBundle(**({"trust_domain": TD_A} | kwargs))  # type: ignore[arg-type]

    assert info.value.reason == "bundle.invalid_authority"


# ---------------------------------------------------------------------------------------------
# SECURITY 20: empty bundles, whole replacement, staleness, sequence


def _verifier(store: TrustStore) -> JwtSvidVerifier:
    return JwtSvidVerifier(audience=AUDIENCE, trust_store=store)


@pytest.mark.parametrize(
    "signer",
    [signer_es256_a(), signer_rs256_a(), Signer("a-ec384", ec_key("P-384", "a"), "ES384")],
    ids=lambda s: s.alg,
)
def test_empty_keys_bundle_rejects_every_token_of_that_domain(signer: Signer) -> None:
    store = TrustStore()
    store.replace(parse_spiffe_bundle(TD_A, b'{"keys": []}'), FETCHED)
    assert tuple(store.trust_domains) == (TD_A,)

    with pytest.raises(JwtSvidRejectedError) as info:
        _verifier(store).verify(token(signer), now=NOW)

    assert info.value.reason == "jwt.kid_unknown"


def test_key_removed_on_refresh_stops_verifying_after_replace() -> None:
    store = TrustStore()
    store.replace(bundle_of(TD_A, signer_es256_a(), signer_rs256_a(), sequence=1), FETCHED)
    verifier = _verifier(store)
    jwt = token(signer_es256_a())
    assert SpiffeId.parse(SUB_A) == verifier.verify(jwt, now=NOW).spiffe_id

    outcome = store.replace(bundle_of(TD_A, signer_rs256_a(), sequence=2), NOW)

    with pytest.raises(JwtSvidRejectedError) as info:
        verifier.verify(jwt, now=NOW)
    assert (outcome, info.value.reason) == (ReplaceOutcome.INSTALLED, "jwt.kid_unknown")


def test_key_removed_on_refresh_without_sequence_numbers_stops_verifying() -> None:
    store = TrustStore()
    store.replace(_parse([signer_es256_a().jwk()], sequence=DROP), FETCHED)
    store.replace(_parse([signer_rs256_a().jwk()], sequence=DROP), NOW)

    with pytest.raises(JwtSvidRejectedError):
        _verifier(store).verify(token(signer_es256_a()), now=NOW)


def test_replace_all_removes_domains_absent_from_the_new_set() -> None:
    store = TrustStore()
    store.replace_all([bundle_of(TD_A, signer_es256_a()), bundle_of(TD_B)], FETCHED)

    outcomes = store.replace_all([bundle_of(TD_A, signer_es256_a())], NOW)

    with pytest.raises(UntrustedDomainError):
        store.bundle_for(TD_B, NOW)
    assert dict(outcomes) == {TD_A: ReplaceOutcome.REFRESHED, TD_B: ReplaceOutcome.REMOVED}


def test_replace_all_with_duplicate_trust_domains_changes_nothing() -> None:
    store = TrustStore()
    store.replace(bundle_of(TD_A, signer_es256_a()), FETCHED)

    with pytest.raises(BundleUnavailableError) as info:
        store.replace_all([bundle_of(TD_A), bundle_of(TD_A, signer_rs256_a())], NOW)

    assert (
        info.value.reason,
        store.fetched_at(TD_A),
        list(store.bundle_for(TD_A, NOW).jwt_authorities),
    ) == ("bundle.duplicate_trust_domain", FETCHED, ["a-ec-1"])


def test_remove_stops_trusting_the_domain() -> None:
    store = TrustStore()
    store.replace(bundle_of(TD_A), FETCHED)

    assert (store.remove(TD_A), store.remove(TD_A)) == (True, False)
    with pytest.raises(UntrustedDomainError):
        store.bundle_for(TD_A, NOW)


def test_unknown_domain_raises_untrusted() -> None:
    store = TrustStore()
    store.replace(bundle_of(TD_A), FETCHED)

    with pytest.raises(UntrustedDomainError) as info:
        store.bundle_for(TrustDomain("c.test"), NOW)

    assert info.value.reason == "trust_domain.untrusted"


@pytest.mark.parametrize(
    ("age", "stale"),
    [
        (timedelta(minutes=59, seconds=59), False),
        (timedelta(hours=1), False),
        (timedelta(hours=1, seconds=1), True),
        (timedelta(days=3), True),
        (timedelta(minutes=-5), False),  # clock stepped back: not stale
    ],
    ids=["1s-inside", "at-limit", "1s-beyond", "days", "clock-back"],
)
def test_bundle_older_than_max_staleness_fails_closed(age: timedelta, stale: bool) -> None:
    store = TrustStore(max_staleness=timedelta(hours=1))
    store.replace(bundle_of(TD_A, signer_es256_a()), NOW - age)

    if stale:
        with pytest.raises(BundleUnavailableError) as info:
            store.bundle_for(TD_A, NOW)
        assert info.value.reason == "bundle.stale"
    else:
        assert store.bundle_for(TD_A, NOW).trust_domain == TD_A


def test_per_domain_staleness_overrides_the_store_default() -> None:
    store = TrustStore(
        max_staleness=timedelta(hours=1), max_staleness_for={TD_B: timedelta(minutes=5)}
    )
    store.replace_all([bundle_of(TD_A), bundle_of(TD_B)], NOW - timedelta(minutes=6))

    assert store.bundle_for(TD_A, NOW).trust_domain == TD_A
    with pytest.raises(BundleUnavailableError):
        store.bundle_for(TD_B, NOW)


def test_stale_bundle_rejects_tokens_of_that_domain_only() -> None:
    store = TrustStore(max_staleness_for={TD_B: timedelta(minutes=5)})
    store.replace(bundle_of(TD_A, signer_es256_a()), NOW - timedelta(minutes=10))
    store.replace(bundle_of(TD_B, signer_es256_b_colliding()), NOW - timedelta(minutes=10))
    verifier = _verifier(store)

    assert SpiffeId.parse(SUB_A) == verifier.verify(token(signer_es256_a()), now=NOW).spiffe_id
    with pytest.raises(BundleUnavailableError):
        verifier.verify(token(signer_es256_b_colliding(), sub=SUB_B), now=NOW)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_staleness": timedelta(0)},
        {"max_staleness": timedelta(seconds=-1)},
        {"max_staleness_for": {TD_A: timedelta(0)}},
    ],
    ids=["zero", "negative", "per-domain-zero"],
)
def test_store_refuses_non_positive_staleness(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        TrustStore(**kwargs)  # type: ignore[arg-type]


def test_sequence_going_backwards_keeps_old_bundle_and_fetch_time() -> None:
    store = TrustStore(max_staleness=timedelta(hours=1))
    store.replace(bundle_of(TD_A, signer_es256_a(), sequence=5), FETCHED)

    outcome = store.replace(bundle_of(TD_A, signer_rs256_a(), sequence=4), NOW)

    assert (
        outcome,
        outcome.kept_old,
        store.fetched_at(TD_A),
        list(store.bundle_for(TD_A, NOW).jwt_authorities),
    ) == (ReplaceOutcome.KEPT_SEQUENCE_REGRESSED, True, FETCHED, ["a-ec-1"])


def test_kept_old_bundle_still_goes_stale_on_schedule() -> None:
    store = TrustStore(max_staleness=timedelta(hours=1))
    store.replace(bundle_of(TD_A, signer_es256_a(), sequence=5), FETCHED)
    later = FETCHED + timedelta(hours=1, seconds=1)
    store.replace(bundle_of(TD_A, signer_es256_a(), sequence=4), later)

    with pytest.raises(BundleUnavailableError):
        store.bundle_for(TD_A, later)


def test_sequence_reused_with_different_keys_keeps_old_bundle() -> None:
    store = TrustStore()
    store.replace(bundle_of(TD_A, signer_es256_a(), sequence=5), FETCHED)

    outcome = store.replace(bundle_of(TD_A, signer_rs256_a(), sequence=5), NOW)

    assert (
        outcome,
        list(store.bundle_for(TD_A, NOW).jwt_authorities),
    ) == (ReplaceOutcome.KEPT_SEQUENCE_REUSED, ["a-ec-1"])


def test_same_sequence_same_keys_refreshes_fetch_time() -> None:
    store = TrustStore()
    store.replace(bundle_of(TD_A, signer_es256_a(), sequence=5), FETCHED)

    outcome = store.replace(bundle_of(TD_A, signer_es256_a(), sequence=5), NOW)

    assert (
        outcome,
        outcome.kept_old,
        store.fetched_at(TD_A),
    ) == (ReplaceOutcome.REFRESHED, False, NOW)


def test_replace_all_keeps_old_bundle_for_a_regressed_domain_only() -> None:
    store = TrustStore()
    store.replace_all(
        [bundle_of(TD_A, signer_es256_a(), sequence=5), bundle_of(TD_B, sequence=1)], FETCHED
    )

    outcomes = store.replace_all(
        [
            bundle_of(TD_A, signer_rs256_a(), sequence=3),
            bundle_of(TD_B, signer_rs256_a(), sequence=2),
        ],
        NOW,
    )

    assert (
        dict(outcomes),
        (store.fetched_at(TD_A), store.fetched_at(TD_B)),
        list(store.bundle_for(TD_A, NOW).jwt_authorities),
    ) == (
        {TD_A: ReplaceOutcome.KEPT_SEQUENCE_REGRESSED, TD_B: ReplaceOutcome.INSTALLED},
        (FETCHED, NOW),
        ["a-ec-1"],
    )


def test_replace_requires_timezone_aware_fetch_time() -> None:
    with pytest.raises(TypeError):
        TrustStore().replace(bundle_of(TD_A), NOW.replace(tzinfo=None))
