"""JWT-SVID verification: SECURITY 11-18, one defect per row, exact reason codes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core import jwtsvid
from broker.core.bundle import TrustBundle, TrustStore, parse_spiffe_bundle
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.jwtsvid import JtiReplayCache, JwtSvidVerifier
from broker.core.spiffe_id import SpiffeId, TrustDomain
from broker.errors import (
    BundleUnavailableError,
    ConfigurationError,
    JwtSvidRejectedError,
    TaskleaseError,
    UnavailableError,
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
    default_claims,
    ec_key,
    encode_json,
    hs256_with_public_key,
    rsa_key,
    sign,
    signer_es256_a,
    signer_es256_b_colliding,
    signer_rs256_a,
    token,
    x509_jwk,
)

T0 = int(NOW.timestamp())


class CountingTrustStore(TrustStore):
    """A real store that counts bundle lookups, to prove a rejection happened before one."""

    def __init__(self) -> None:
        super().__init__(max_staleness=timedelta(hours=1))
        self.lookups = 0

    def bundle_for(self, trust_domain: TrustDomain, now: datetime) -> TrustBundle:
        self.lookups += 1
        return super().bundle_for(trust_domain, now)


def ps256() -> Signer:
    return Signer("a-rsa-ps", rsa_key(2048, "a"), "PS256")


def all_signers_a() -> list[Signer]:
    return [
        signer_es256_a(),
        signer_rs256_a(),
        ps256(),
        Signer("a-ec384", ec_key("P-384", "a"), "ES384"),
        Signer("a-ec521", ec_key("P-521", "a"), "ES512"),
        Signer("a-rs384", rsa_key(2048, "a"), "RS384"),
        Signer("a-rs512", rsa_key(2048, "a"), "RS512"),
        Signer("a-ps384", rsa_key(2048, "a"), "PS384"),
        Signer("a-ps512", rsa_key(2048, "a"), "PS512"),
    ]


def make_store() -> CountingTrustStore:
    store = CountingTrustStore()
    store.replace(bundle_of(TD_A, *all_signers_a()), NOW - timedelta(minutes=1))
    store.replace(bundle_of(TD_B, signer_es256_b_colliding()), NOW - timedelta(minutes=1))
    return store


@pytest.fixture
def store() -> CountingTrustStore:
    return make_store()


@pytest.fixture
def verifier(store: CountingTrustStore) -> JwtSvidVerifier:
    return JwtSvidVerifier(audience=AUDIENCE, trust_store=store)


def rejected(verifier: JwtSvidVerifier, jwt: object, *, now: datetime = NOW) -> TaskleaseError:
    with pytest.raises(TaskleaseError) as info:
        verifier.verify(jwt, now=now)  # type: ignore[arg-type]
    return info.value


# ---------------------------------------------------------------------------------------------
# Happy paths


@pytest.mark.parametrize("signer", all_signers_a(), ids=lambda s: s.alg)
def test_valid_token_of_every_allowed_alg_is_accepted(
    verifier: JwtSvidVerifier, signer: Signer
) -> None:
    identity = verifier.verify(token(signer), now=NOW)

    expected = WorkloadIdentity(
        spiffe_id=SpiffeId.parse(SUB_A),
        expires_at=datetime.fromtimestamp(T0 + 300, UTC),
        method=AuthMethod.JWT_SVID,
    )
    assert expected == identity


def test_string_aud_and_multi_value_aud_containing_ours_are_accepted(
    verifier: JwtSvidVerifier,
) -> None:
    signer = signer_es256_a()
    for aud in (AUDIENCE, ["spiffe://other.test/x", AUDIENCE]):
        assert (
            SpiffeId.parse(SUB_A)
            == verifier.verify(token(signer, claims={"aud": aud}), now=NOW).spiffe_id
        )


def test_typ_jose_or_absent_and_nbf_in_the_past_are_accepted(verifier: JwtSvidVerifier) -> None:
    signer = signer_es256_a()
    for jwt in (
        token(signer, header={"typ": "JOSE"}),
        token(signer, header={"typ": DROP}),
        token(signer, claims={"nbf": T0 - 10, "iat": DROP}),
        token(signer, claims={"iat": DROP}),
    ):
        assert verifier.verify(jwt, now=NOW).method == AuthMethod.JWT_SVID


def test_token_of_trust_domain_b_verifies_against_b_bundle(verifier: JwtSvidVerifier) -> None:
    jwt = token(signer_es256_b_colliding(), sub=SUB_B)

    assert SpiffeId.parse(SUB_B) == verifier.verify(jwt, now=NOW).spiffe_id


# ---------------------------------------------------------------------------------------------
# SECURITY 11: alg allow-list, checked before any key lookup


def _alg_rows() -> list[tuple[str, Callable[[], str], str]]:
    es = signer_es256_a
    return [
        ("none", lambda: token(es(), header={"alg": "none"}, signature=b""), "jwt.alg_not_allowed"),
        ("None", lambda: token(es(), header={"alg": "None"}, signature=b""), "jwt.alg_not_allowed"),
        ("HS256 keyed with public key", lambda: hs256_with_public_key(es()), "jwt.alg_not_allowed"),
        (
            "EdDSA",
            lambda: token(es(), header={"alg": "EdDSA"}, signature=b"\x01" * 64),
            "jwt.alg_not_allowed",
        ),
        (
            "ES256K",
            lambda: token(Signer("a-ec-1", ec_key("secp256k1"), "ES256K")),
            "jwt.alg_not_allowed",
        ),
        ("ES521 alias", lambda: token(es(), header={"alg": "ES521"}), "jwt.alg_not_allowed"),
        ("lowercase es256", lambda: token(es(), header={"alg": "es256"}), "jwt.alg_not_allowed"),
        ("alg is a list", lambda: token(es(), header={"alg": ["ES256"]}), "jwt.alg_not_allowed"),
        ("alg is null", lambda: token(es(), header={"alg": None}), "jwt.alg_not_allowed"),
        ("alg missing", lambda: token(es(), header={"alg": DROP}), "jwt.alg_missing"),
    ]


@pytest.mark.parametrize(("case", "build", "reason"), _alg_rows(), ids=[r[0] for r in _alg_rows()])
def test_alg_outside_allow_list_is_rejected_before_key_lookup(
    verifier: JwtSvidVerifier,
    store: CountingTrustStore,
    case: str,
    build: Callable[[], str],
    reason: str,
) -> None:
    error = rejected(verifier, build())

    assert (JwtSvidRejectedError, reason, 0) == (type(error), error.reason, store.lookups)


@pytest.mark.parametrize(
    ("header_alg", "signer"),
    [
        ("ES256", signer_rs256_a()),  # RSA key asked to do ECDSA
        ("RS256", signer_es256_a()),  # EC key asked to do RSA
        ("ES384", signer_es256_a()),  # P-256 key with the P-384 algorithm
        ("ES512", Signer("a-ec384", ec_key("P-384", "a"), "ES384")),
    ],
    ids=["rsa-key-es256", "ec-key-rs256", "p256-key-es384", "p384-key-es512"],
)
def test_alg_not_matching_key_family_or_curve_is_rejected(
    verifier: JwtSvidVerifier, header_alg: str, signer: Signer
) -> None:
    jwt = token(signer, header={"alg": header_alg}, sign_alg=signer.alg)

    assert rejected(verifier, jwt).reason == "jwt.alg_key_mismatch"


def test_alg_other_than_the_one_the_jwk_declares_is_rejected() -> None:
    signer = Signer("bound", rsa_key(2048, "a"), "RS256")
    entry = signer.jwk(alg="RS256")
    store = TrustStore()
    store.replace(parse_spiffe_bundle(TD_A, bundle_json([entry])), NOW)
    verifier = JwtSvidVerifier(audience=AUDIENCE, trust_store=store)
    assert SpiffeId.parse(SUB_A) == verifier.verify(token(signer), now=NOW).spiffe_id

    pss = token(Signer("bound", signer.key, "PS256"))

    assert rejected(verifier, pss).reason == "jwt.alg_key_mismatch"


# ---------------------------------------------------------------------------------------------
# SECURITY 12: kid


@pytest.mark.parametrize(
    ("kid", "reason", "lookups"),
    [
        (DROP, "jwt.kid_missing", 0),
        ("no-such-kid", "jwt.kid_unknown", 1),
        ("../../etc/passwd", "jwt.kid_malformed", 0),
        ("/etc/passwd", "jwt.kid_malformed", 0),
        ("..", "jwt.kid_malformed", 0),
        ("a-ec-1' OR '1'='1", "jwt.kid_malformed", 0),
        ("1; DROP TABLE keys--", "jwt.kid_malformed", 0),
        ("https://evil.example/jwks.json", "jwt.kid_malformed", 0),
        ("a-ec-1%2F..", "jwt.kid_malformed", 0),
        ("a-ec-1\n", "jwt.kid_malformed", 0),
        ("", "jwt.kid_malformed", 0),
        ("k" * 129, "jwt.kid_malformed", 0),
        (7, "jwt.kid_malformed", 0),
        (None, "jwt.kid_malformed", 0),
        (["a-ec-1"], "jwt.kid_malformed", 0),
    ],
    ids=repr,
)
def test_bad_kid_is_rejected_and_shaped_kids_without_lookup(
    verifier: JwtSvidVerifier, store: CountingTrustStore, kid: object, reason: str, lookups: int
) -> None:
    error = rejected(verifier, token(signer_es256_a(), header={"kid": kid}))

    assert (reason, lookups) == (error.reason, store.lookups)


# ---------------------------------------------------------------------------------------------
# SECURITY 13: the kid is looked up only in the sub's trust domain


def test_token_signed_by_a_with_sub_in_b_fails_even_when_kids_collide(
    verifier: JwtSvidVerifier,
) -> None:
    # A's key and B's key are both published as "a-ec-1"; the sub names B, so B's key is used.
    jwt = token(signer_es256_a(), sub=SUB_B)

    assert rejected(verifier, jwt).reason == "jwt.signature_invalid"


def test_token_signed_by_a_with_sub_in_b_fails_when_b_lacks_the_kid(
    verifier: JwtSvidVerifier,
) -> None:
    jwt = token(signer_rs256_a(), sub=SUB_B)

    assert rejected(verifier, jwt).reason == "jwt.kid_unknown"


def test_token_with_sub_in_untrusted_domain_is_rejected(verifier: JwtSvidVerifier) -> None:
    error = rejected(verifier, token(signer_es256_a(), sub="spiffe://c.test/agent"))

    assert (UntrustedDomainError, "trust_domain.untrusted") == (type(error), error.reason)


@pytest.mark.parametrize(
    ("sub", "reason"),
    [
        (DROP, "jwt.sub_missing"),
        ("spiffe://a.test", "jwt.sub_is_root"),
        ("spiffe://a.test/agent\n", "jwt.sub_invalid"),
        ("spiffe://A.test/agent", "jwt.sub_invalid"),
        ("https://a.test/agent", "jwt.sub_invalid"),
        ("spiffe://a.test/agent/", "jwt.sub_invalid"),
        ("spiffe://a.test/" + "x" * 3000, "jwt.sub_invalid"),
        (42, "jwt.sub_invalid"),
        (["spiffe://a.test/agent"], "jwt.sub_invalid"),
    ],
    ids=repr,
)
def test_bad_sub_is_rejected_before_lookup(
    verifier: JwtSvidVerifier, store: CountingTrustStore, sub: object, reason: str
) -> None:
    error = rejected(verifier, token(signer_es256_a(), claims={"sub": sub}))

    assert (reason, 0) == (error.reason, store.lookups)


# ---------------------------------------------------------------------------------------------
# SECURITY 14: exp, nbf, iat, lifetime


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": DROP}, "jwt.exp_missing"),
        ({"exp": T0 - 31, "iat": T0 - 100}, "jwt.expired"),
        ({"exp": str(T0 + 300)}, "jwt.exp_not_integer"),
        ({"exp": float(T0 + 300)}, "jwt.exp_not_integer"),
        ({"exp": 1e30}, "jwt.exp_not_integer"),
        ({"exp": True}, "jwt.exp_not_integer"),
        ({"exp": None}, "jwt.exp_not_integer"),
        ({"exp": 10**30}, "jwt.exp_out_of_range"),
        ({"exp": -1}, "jwt.exp_out_of_range"),
        ({"nbf": T0 + 31}, "jwt.not_yet_valid"),
        ({"nbf": str(T0)}, "jwt.nbf_not_integer"),
        ({"nbf": 10**30}, "jwt.nbf_out_of_range"),
        ({"iat": T0 + 31}, "jwt.iat_in_future"),
        ({"iat": float(T0)}, "jwt.iat_not_integer"),
        ({"iat": -5}, "jwt.iat_out_of_range"),
        ({"exp": T0 + 3601}, "jwt.lifetime_too_long"),
        ({"exp": T0 + 3601, "iat": DROP, "nbf": T0}, "jwt.lifetime_too_long"),
        ({"exp": T0 + 3601, "iat": DROP}, "jwt.lifetime_too_long"),
        ({"exp": T0 + 3000, "iat": T0 - 1000}, "jwt.lifetime_too_long"),
        ({"exp": T0 + 5, "nbf": T0 + 20}, "jwt.exp_before_start"),
        ({"exp": T0 + 5, "iat": T0 + 10}, "jwt.exp_before_start"),
    ],
    ids=repr,
)
def test_bad_time_claim_is_rejected_before_lookup(
    verifier: JwtSvidVerifier, store: CountingTrustStore, claims: dict[str, object], reason: str
) -> None:
    error = rejected(verifier, token(signer_es256_a(), claims=claims))

    assert (JwtSvidRejectedError, reason, 0) == (type(error), error.reason, store.lookups)


@pytest.mark.parametrize(
    ("now_offset", "accepted"),
    [(29, True), (30, False), (31, False)],
    ids=["1s-inside", "at-boundary", "1s-outside"],
)
def test_exp_leeway_boundary(verifier: JwtSvidVerifier, now_offset: int, accepted: bool) -> None:
    """exp + leeway (30 s) must be strictly after now."""
    jwt = token(signer_es256_a(), claims={"exp": T0, "iat": T0 - 60})
    now = NOW + timedelta(seconds=now_offset)

    if accepted:
        assert int(verifier.verify(jwt, now=now).expires_at.timestamp()) == T0
    else:
        assert rejected(verifier, jwt, now=now).reason == "jwt.expired"


@pytest.mark.parametrize(
    ("nbf_offset", "accepted"),
    [(29, True), (30, True), (31, False)],
    ids=["1s-inside", "at-boundary", "1s-outside"],
)
def test_nbf_leeway_boundary(verifier: JwtSvidVerifier, nbf_offset: int, accepted: bool) -> None:
    """nbf - leeway (30 s) must not be after now."""
    jwt = token(signer_es256_a(), claims={"nbf": T0 + nbf_offset, "iat": DROP})

    if accepted:
        assert SpiffeId.parse(SUB_A) == verifier.verify(jwt, now=NOW).spiffe_id
    else:
        assert rejected(verifier, jwt).reason == "jwt.not_yet_valid"


def test_lifetime_exactly_at_maximum_is_accepted(verifier: JwtSvidVerifier) -> None:
    jwt = token(signer_es256_a(), claims={"exp": T0 + 3600})

    assert int(verifier.verify(jwt, now=NOW).expires_at.timestamp()) == T0 + 3600


# ---------------------------------------------------------------------------------------------
# SECURITY 15: audience


@pytest.mark.parametrize(
    ("aud", "reason"),
    [
        (DROP, "jwt.aud_missing"),
        ("spiffe://other.test/service", "jwt.aud_mismatch"),
        (["spiffe://other.test/a", "spiffe://other.test/b"], "jwt.aud_mismatch"),
        (AUDIENCE.upper(), "jwt.aud_mismatch"),
        (AUDIENCE + "/", "jwt.aud_mismatch"),
        ([], "jwt.aud_malformed"),
        ("", "jwt.aud_malformed"),
        ([""], "jwt.aud_malformed"),
        ([AUDIENCE, 7], "jwt.aud_malformed"),
        ([[AUDIENCE]], "jwt.aud_malformed"),
        (None, "jwt.aud_malformed"),
        ({"aud": AUDIENCE}, "jwt.aud_malformed"),
        (7, "jwt.aud_malformed"),
    ],
    ids=repr,
)
def test_bad_aud_is_rejected(
    verifier: JwtSvidVerifier, store: CountingTrustStore, aud: object, reason: str
) -> None:
    error = rejected(verifier, token(signer_es256_a(), claims={"aud": aud}))

    assert (reason, 0) == (error.reason, store.lookups)


@pytest.mark.parametrize("audience", ["", "   ", "\n", None, f" {AUDIENCE}", "a\x00b"], ids=repr)
def test_verifier_with_empty_or_blank_audience_refuses_to_start(audience: object) -> None:
    with pytest.raises(ConfigurationError):
        JwtSvidVerifier(audience=audience, trust_store=TrustStore())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_lifetime": timedelta(0)},
        {"max_lifetime": timedelta(days=1, seconds=1)},
        {"leeway": timedelta(seconds=-1)},
        {"leeway": timedelta(minutes=6)},
        {"max_token_bytes": 0},
        {"max_token_bytes": True},
    ],
    ids=repr,
)
def test_verifier_with_unsafe_limits_refuses_to_start(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        JwtSvidVerifier(audience=AUDIENCE, trust_store=TrustStore(), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# SECURITY 16: header allow-list and typ


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"jku": "https://evil.example/jwks"}, "jwt.header_not_allowed"),
        ({"x5u": "https://evil.example/cert"}, "jwt.header_not_allowed"),
        ({"jwk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}}, "jwt.header_not_allowed"),
        ({"x5c": ["MIIB"]}, "jwt.header_not_allowed"),
        ({"crit": ["exp"]}, "jwt.header_not_allowed"),
        ({"b64": False}, "jwt.header_not_allowed"),
        ({"cty": "JWT"}, "jwt.header_not_allowed"),
        ({"zip": "DEF"}, "jwt.header_not_allowed"),
        ({"x-custom": 1}, "jwt.header_not_allowed"),
        ({"typ": "at+jwt"}, "jwt.typ_not_allowed"),
        ({"typ": "jwt"}, "jwt.typ_not_allowed"),
        ({"typ": ""}, "jwt.typ_not_allowed"),
        ({"typ": None}, "jwt.typ_not_allowed"),
        ({"typ": ["JWT"]}, "jwt.typ_not_allowed"),
    ],
    ids=repr,
)
def test_header_outside_allow_list_is_rejected_before_lookup(
    verifier: JwtSvidVerifier, store: CountingTrustStore, header: dict[str, object], reason: str
) -> None:
    error = rejected(verifier, token(signer_es256_a(), header=header))

    assert (reason, 0) == (error.reason, store.lookups)


# ---------------------------------------------------------------------------------------------
# SECURITY 17: serialization, encoding, budget, signature


def _good() -> str:
    return token(signer_es256_a())


def _segments() -> list[str]:
    return _good().split(".")


def _replace_segment(index: int, value: str) -> str:
    parts = _segments()
    parts[index] = value
    return ".".join(parts)


def _one_mod_four(segment: str) -> str:
    return segment + "A" * ((1 - len(segment)) % 4 or 4)


def _header_json(raw: bytes) -> str:
    return token(signer_es256_a(), header_bytes=raw)


def _payload_json(raw: bytes) -> str:
    return token(signer_es256_a(), payload_bytes=raw)


_HEADER = b'{"alg":"ES256","kid":"a-ec-1","typ":"JWT"}'
_CLAIMS = encode_json(default_claims())


def _structure_rows() -> list[tuple[str, Callable[[], object], str]]:
    h, p, s = 0, 1, 2
    return [
        ("empty", lambda: "", "jwt.segment_count"),
        ("bytes not str", lambda: _good().encode(), "jwt.not_a_string"),
        ("None", lambda: None, "jwt.not_a_string"),
        (
            "JWS JSON general",
            lambda: '{"payload":"e30","signatures":[{"protected":"e30","signature":"AA"}]}',
            "jwt.json_serialization",
        ),
        (
            "JWS JSON flattened",
            lambda: '  {"payload":"e30","protected":"e30","signature":"AA"}',
            "jwt.json_serialization",
        ),
        ("two segments", lambda: ".".join(_segments()[:2]), "jwt.segment_count"),
        ("four segments", lambda: _good() + ".AAAA", "jwt.segment_count"),
        ("five segments (JWE)", lambda: _good() + ".AA.AA", "jwt.segment_count"),
        ("only dots", lambda: "..", "jwt.header_malformed"),
        ("padded header", lambda: _replace_segment(h, _segments()[h] + "=="), "jwt.bad_base64"),
        (
            "plus in payload",
            lambda: _replace_segment(p, "+" + _segments()[p][1:]),
            "jwt.bad_base64",
        ),
        ("slash in sig", lambda: _replace_segment(s, "/" + _segments()[s][1:]), "jwt.bad_base64"),
        ("space in header", lambda: " " + _good(), "jwt.bad_base64"),
        ("newline in sig", lambda: _good()[:-2] + "\n" + _good()[-1:], "jwt.bad_base64"),
        (
            "length 1 mod 4",
            lambda: _replace_segment(p, _one_mod_four(_segments()[p])),
            "jwt.bad_base64",
        ),
        ("non-ascii", lambda: _replace_segment(p, "é" + _segments()[p][1:]), "jwt.bad_base64"),
        (
            "non-canonical trailing bits",
            lambda: _replace_segment(s, _segments()[s][:-1] + "B"),
            "jwt.bad_base64",
        ),
        ("header not JSON", lambda: _header_json(b"{alg:ES256}"), "jwt.header_malformed"),
        ("header JSON array", lambda: _header_json(b'["ES256"]'), "jwt.header_malformed"),
        ("header not UTF-8", lambda: _header_json(b'{"alg":"\xff"}'), "jwt.header_malformed"),
        (
            "header UTF-16",
            lambda: _header_json(_HEADER.decode().encode("utf-16")),
            "jwt.header_malformed",
        ),
        (
            "header NaN",
            lambda: _header_json(b'{"alg":"ES256","kid":"a-ec-1","typ":NaN}'),
            "jwt.header_malformed",
        ),
        (
            "header duplicate alg",
            lambda: _header_json(b'{"alg":"none","alg":"ES256","kid":"a-ec-1"}'),
            "jwt.duplicate_member",
        ),
        (
            "header duplicate kid",
            lambda: _header_json(b'{"alg":"ES256","kid":"x","kid":"a-ec-1"}'),
            "jwt.duplicate_member",
        ),
        ("payload not JSON", lambda: _payload_json(b"not json"), "jwt.payload_malformed"),
        ("payload JSON string", lambda: _payload_json(b'"sub"'), "jwt.payload_malformed"),
        ("payload empty", lambda: _payload_json(b""), "jwt.payload_malformed"),
        (
            "payload deep nesting",
            lambda: _payload_json(b"[" * 3000 + b"]" * 3000),
            "jwt.payload_malformed",
        ),
        (
            "payload duplicate sub",
            lambda: _payload_json(_CLAIMS[:-1] + b',"sub":"spiffe://b.test/x"}'),
            "jwt.duplicate_member",
        ),
        (
            "payload nested duplicate",
            lambda: _payload_json(_CLAIMS[:-1] + b',"ctx":{"a":1,"a":2}}'),
            "jwt.duplicate_member",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "build", "reason"), _structure_rows(), ids=[r[0] for r in _structure_rows()]
)
def test_malformed_serialization_is_rejected_before_lookup(
    verifier: JwtSvidVerifier,
    store: CountingTrustStore,
    case: str,
    build: Callable[[], object],
    reason: str,
) -> None:
    error = rejected(verifier, build())

    assert (JwtSvidRejectedError, reason, 0) == (type(error), error.reason, store.lookups)


def _signature_rows() -> list[tuple[str, Callable[[], str]]]:
    es, rs = signer_es256_a(), signer_rs256_a()
    other = Signer("a-ec-1", ec_key("P-256", "attacker"), "ES256")
    good = token(es)
    return [
        ("ECDSA r=s=0", lambda: token(es, signature=b"\x00" * 64)),
        ("ECDSA r=s=n (curve order)", lambda: token(es, signature=_p256_order_signature())),
        ("ECDSA short signature", lambda: token(es, signature=b"\x01" * 63)),
        ("ECDSA DER-encoded signature", lambda: token(es, signature=_der_signature(es))),
        ("empty signature", lambda: token(es, signature=b"")),
        ("RSA zero signature", lambda: token(rs, signature=b"\x00" * 256)),
        ("RSA short signature", lambda: token(rs, signature=b"\x01" * 8)),
        ("signed by another key with the same kid", lambda: token(other)),
        ("RS256 header, PS256 signature", lambda: token(rs, sign_alg="PS256")),
        (
            "payload swapped after signing",
            lambda: ".".join(
                [
                    good.split(".")[0],
                    b64url(encode_json(default_claims(ttl=200))),
                    good.split(".")[2],
                ]
            ),
        ),
    ]


def _p256_order_signature() -> bytes:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return n.to_bytes(32, "big") * 2


def _der_signature(signer: Signer) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    assert isinstance(signer.key, ec.EllipticCurvePrivateKey)
    return signer.key.sign(b"whatever", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("case", "build"), _signature_rows(), ids=[r[0] for r in _signature_rows()]
)
def test_bad_signature_is_rejected(
    verifier: JwtSvidVerifier, case: str, build: Callable[[], str]
) -> None:
    error = rejected(verifier, build())

    assert (JwtSvidRejectedError, "jwt.signature_invalid") == (type(error), error.reason)


def test_one_megabyte_token_is_rejected_fast_without_parsing(
    verifier: JwtSvidVerifier, store: CountingTrustStore
) -> None:
    huge = "A" * (1024 * 1024 - 2) + ".."
    started = time.perf_counter()
    error = rejected(verifier, huge)
    elapsed = time.perf_counter() - started

    assert (error.reason, store.lookups) == ("jwt.too_large", 0)
    assert elapsed < 0.05


@pytest.mark.parametrize("budget", [8 * 1024, 64 * 1024], ids=["default-budget", "large-budget"])
def test_ten_thousand_dots_are_rejected_fast(store: CountingTrustStore, budget: int) -> None:
    verifier = JwtSvidVerifier(audience=AUDIENCE, trust_store=store, max_token_bytes=budget)
    dots = "." * 10_000
    started = time.perf_counter()
    error = rejected(verifier, dots)
    elapsed = time.perf_counter() - started

    expected = "jwt.too_large" if budget < 10_000 else "jwt.segment_count"
    assert (expected, 0) == (error.reason, store.lookups)
    assert elapsed < 0.05


def test_rejection_detail_never_contains_the_token(verifier: JwtSvidVerifier) -> None:
    jwt = token(signer_es256_a(), sub=SUB_B)
    signature = jwt.split(".")[2]

    error = rejected(verifier, jwt)

    assert (jwt in error.detail, signature in error.detail) == (False, False)


def test_untrusted_values_in_details_are_escaped_and_truncated(verifier: JwtSvidVerifier) -> None:
    hostile = "evil\r\n\x1b[31m" + "x" * 100_000
    error = rejected(verifier, token(signer_es256_a(), header={"typ": hostile[:3000]}))

    assert (
        error.reason,
        "\n" in error.detail,
        "\x1b" in error.detail,
        len(error.detail) < 400,
    ) == ("jwt.typ_not_allowed", False, False, True)


def test_crypto_library_error_becomes_a_typed_rejection(
    verifier: JwtSvidVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: if PyJWT ever raises instead of returning False, it is still a 401."""

    def explode(msg: bytes, key: object, sig: bytes) -> bool:
        raise ValueError("boom")

    monkeypatch.setattr(jwtsvid._SIGNERS["ES256"], "verify", explode)

    assert rejected(verifier, token(signer_es256_a())).reason == "jwt.signature_invalid"


def test_verifier_exposes_its_audience(verifier: JwtSvidVerifier) -> None:
    assert verifier.audience == AUDIENCE


def test_naive_now_is_a_programming_error(verifier: JwtSvidVerifier) -> None:
    with pytest.raises(TypeError):
        verifier.verify(token(signer_es256_a()), now=NOW.replace(tzinfo=None))


def test_stale_bundle_fails_closed(store: CountingTrustStore, verifier: JwtSvidVerifier) -> None:
    later = NOW + timedelta(hours=1, seconds=1)
    jwt = token(signer_es256_a(), claims=default_claims(now=later))

    error = rejected(verifier, jwt, now=later)

    assert (BundleUnavailableError, "bundle.stale") == (type(error), error.reason)


# ---------------------------------------------------------------------------------------------
# SECURITY 18: replay


def test_without_replay_cache_the_same_token_is_accepted_again_until_exp(
    verifier: JwtSvidVerifier,
) -> None:
    """The documented limit: a JWT-SVID is a bearer token, replayable within its lifetime."""
    jwt = token(signer_es256_a())

    first = verifier.verify(jwt, now=NOW)
    again = verifier.verify(jwt, now=NOW + timedelta(seconds=200))

    assert first == again


@pytest.fixture
def cached(store: CountingTrustStore) -> tuple[JwtSvidVerifier, JtiReplayCache]:
    cache = JtiReplayCache(max_entries=3)
    return JwtSvidVerifier(audience=AUDIENCE, trust_store=store, replay_cache=cache), cache


def test_replay_cache_rejects_a_second_use_of_the_same_jti(
    cached: tuple[JwtSvidVerifier, JtiReplayCache],
) -> None:
    verifier, _ = cached
    jwt = token(signer_es256_a(), claims={"jti": "j-1"})
    verifier.verify(jwt, now=NOW)

    error = rejected(verifier, jwt, now=NOW + timedelta(seconds=1))

    assert (JwtSvidRejectedError, "jwt.replayed") == (type(error), error.reason)


def test_replay_cache_rejects_same_jti_in_a_fresh_token(
    cached: tuple[JwtSvidVerifier, JtiReplayCache],
) -> None:
    verifier, _ = cached
    verifier.verify(token(signer_es256_a(), claims={"jti": "j-1"}), now=NOW)
    reissued = token(signer_rs256_a(), claims={"jti": "j-1", "exp": T0 + 301})

    assert rejected(verifier, reissued).reason == "jwt.replayed"


@pytest.mark.parametrize(
    ("jti", "reason"),
    [
        (DROP, "jwt.jti_missing"),
        ("", "jwt.jti_malformed"),
        (17, "jwt.jti_malformed"),
        ("j" * 257, "jwt.jti_malformed"),
    ],
    ids=repr,
)
def test_replay_cache_requires_a_well_formed_jti(
    cached: tuple[JwtSvidVerifier, JtiReplayCache], jti: object, reason: str
) -> None:
    verifier, _ = cached
    claims = {} if jti is DROP else {"jti": jti}

    assert reason == rejected(verifier, token(signer_es256_a(), claims=claims)).reason


def test_forged_token_does_not_poison_the_replay_cache(
    cached: tuple[JwtSvidVerifier, JtiReplayCache],
) -> None:
    verifier, cache = cached
    forged = token(signer_es256_a(), claims={"jti": "victim"}, signature=b"\x00" * 64)
    assert rejected(verifier, forged).reason == "jwt.signature_invalid"

    verifier.verify(token(signer_es256_a(), claims={"jti": "victim"}), now=NOW)

    assert len(cache) == 1


def test_replay_cache_entry_lives_until_exp_plus_leeway() -> None:
    cache = JtiReplayCache(max_entries=10)
    expires = NOW + timedelta(seconds=330)
    cache.remember("a.test", "j", expires_at=expires, now=NOW)

    with pytest.raises(JwtSvidRejectedError):
        cache.remember("a.test", "j", expires_at=expires, now=expires - timedelta(seconds=1))
    cache.remember("a.test", "j", expires_at=expires + timedelta(seconds=5), now=expires)

    assert len(cache) == 1


def test_replay_cache_scopes_jti_by_issuer() -> None:
    cache = JtiReplayCache(max_entries=10)
    expires = NOW + timedelta(minutes=5)
    cache.remember("a.test", "j", expires_at=expires, now=NOW)
    cache.remember("b.test", "j", expires_at=expires, now=NOW)

    assert len(cache) == 2


def test_full_replay_cache_fails_closed_instead_of_forgetting(
    cached: tuple[JwtSvidVerifier, JtiReplayCache],
) -> None:
    verifier, _ = cached
    for n in range(3):
        verifier.verify(token(signer_es256_a(), claims={"jti": f"j-{n}"}), now=NOW)

    error = rejected(verifier, token(signer_es256_a(), claims={"jti": "j-3"}))

    assert (UnavailableError, "jwt.replay_cache_full") == (type(error), error.reason)


def test_full_replay_cache_frees_expired_entries(
    cached: tuple[JwtSvidVerifier, JtiReplayCache],
) -> None:
    verifier, cache = cached
    for n in range(3):
        verifier.verify(token(signer_es256_a(), claims={"jti": f"j-{n}", "exp": T0 + 60}), now=NOW)
    later = NOW + timedelta(seconds=91)  # past exp + 30 s leeway of all three

    verifier.verify(
        token(signer_es256_a(), claims=default_claims(now=later) | {"jti": "j-3"}), now=later
    )

    assert len(cache) == 1


@pytest.mark.parametrize("size", [0, -1, True], ids=repr)
def test_replay_cache_size_must_be_positive(size: int) -> None:
    with pytest.raises(ConfigurationError):
        JtiReplayCache(max_entries=size)


# ---------------------------------------------------------------------------------------------
# Property: any input only ever raises the typed errors


_VERIFIER = JwtSvidVerifier(audience=AUDIENCE, trust_store=make_store())

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_header_values = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["ES256", "RS256", "PS256", "none", "HS256"]) | _json,
        "kid": st.sampled_from(["a-ec-1", "a-rsa-1", "../x"]) | _json,
        "typ": st.sampled_from(["JWT", "JOSE"]) | _json,
    },
)
_claim_values = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.sampled_from([SUB_A, SUB_B, "spiffe://a.test"]) | _json,
        "aud": st.sampled_from([AUDIENCE, [AUDIENCE]]) | _json,
        "exp": st.integers(min_value=T0 - 100, max_value=T0 + 5000) | _json,
        "nbf": st.integers(min_value=T0 - 100, max_value=T0 + 100) | _json,
        "iat": st.integers(min_value=T0 - 5000, max_value=T0 + 100) | _json,
        "jti": _json,
    },
)


def _only_typed_errors(candidate: object) -> None:
    with contextlib.suppress(TaskleaseError):
        _VERIFIER.verify(candidate, now=NOW)  # type: ignore[arg-type]


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_only_raises_typed_errors(candidate: str) -> None:
    _only_typed_errors(candidate)


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    header=_header_values,
    claims=_claim_values,
    signature=st.binary(max_size=80),
    dots=st.sampled_from(["", ".", "..", "...", "...."]),
)
def test_arbitrary_well_shaped_tokens_only_raise_typed_errors(
    header: dict[str, object], claims: dict[str, object], signature: bytes, dots: str
) -> None:
    signing_input = b64url(encode_json(header)) + "." + b64url(encode_json(claims))
    _only_typed_errors(f"{signing_input}.{b64url(signature)}")
    _only_typed_errors(signing_input + dots + b64url(signature))


@settings(max_examples=40, derandomize=True, deadline=None)
@given(claims=_claim_values)
def test_arbitrary_claims_correctly_signed_only_raise_typed_errors(
    claims: dict[str, object],
) -> None:
    signer = signer_es256_a()
    signing_input = (
        b64url(encode_json({"alg": "ES256", "kid": signer.kid})) + "." + b64url(encode_json(claims))
    )
    signature = sign(signer.key, "ES256", signing_input.encode())
    _only_typed_errors(f"{signing_input}.{b64url(signature)}")


def test_property_helpers_still_accept_a_good_token() -> None:
    """Guards the property tests above: the shared verifier does accept valid tokens."""
    assert SpiffeId.parse(SUB_A) == _VERIFIER.verify(token(signer_es256_a()), now=NOW).spiffe_id


def test_ca_entry_in_bundle_is_not_a_jwt_authority() -> None:
    """An x509-svid entry's key never verifies a JWT-SVID, even if a kid matches."""
    ca_key = ec_key("P-256", "ca-a.test")
    entry = x509_jwk(ca_cert(TD_A), kid="ca")
    store = TrustStore()
    store.replace(parse_spiffe_bundle(TD_A, bundle_json([entry])), NOW)
    verifier = JwtSvidVerifier(audience=AUDIENCE, trust_store=store)

    error = rejected(verifier, token(Signer("ca", ca_key, "ES256")))

    assert error.reason == "jwt.kid_unknown"
