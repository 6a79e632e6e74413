"""OIDC ID-token verification (OIDC Core §3.1.3.7; SECURITY 11-17 and 38 in spirit).

One defect per row, exact reason codes. Rows that must be judged before any key lookup are
also run against a verifier whose issuers have no keys installed: that verifier answers
``oidc.keys_unavailable`` as soon as it looks a key up, so any other reason proves the check
ran first.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
import tomllib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core import oidc
from broker.core.bundle import SkippedKey
from broker.core.identity import HumanIdentity
from broker.core.oidc import (
    OidcIssuerConfig,
    OidcKeySet,
    OidcVerifier,
    parse_oidc_issuers,
    parse_oidc_jwks,
)
from broker.core.roles import Role, parse_role_map
from broker.errors import (
    ConfigurationError,
    OidcTokenRejectedError,
    TaskleaseError,
    UnavailableError,
)
from tests.jwt_tokens import (
    DROP,
    NOW,
    Signer,
    b64url,
    ec_key,
    ed25519_key,
    encode_json,
    public_jwk,
    rsa_key,
    token,
)

T0 = int(NOW.timestamp())
ISS_A = "https://idp-a.example.test/realms/ops"
ISS_B = "https://login.idp-b.example.test/tenant-1/v2.0"
CLIENT_A = "tasklease-broker"
CLIENT_B = "7f0c7a1e-tasklease"
SUB = "248289761001"

RS_A = Signer("a-rsa", rsa_key(2048, "a"), "RS256")
ES_A = Signer("a-ec", ec_key("P-256", "a"), "ES256")
RS_B = Signer("b-rsa", rsa_key(2048, "b"), "RS256")
# Issuer B publishes a key under the same kid as A's EC key.
ES_B_COLLIDING = Signer("a-ec", ec_key("P-256", "b"), "ES256")


def config_a(**overrides: Any) -> OidcIssuerConfig:
    settings_a: dict[str, Any] = {
        "issuer": ISS_A,
        "audience": CLIENT_A,
        "algorithms": frozenset({"RS256", "ES256"}),
        "jwks_url": f"{ISS_A}/protocol/openid-connect/certs",
        "leeway": timedelta(seconds=30),
    }
    return OidcIssuerConfig(**(settings_a | overrides))


def config_b() -> OidcIssuerConfig:
    return OidcIssuerConfig(
        issuer=ISS_B,
        audience=CLIENT_B,
        algorithms=frozenset({"RS256", "ES256"}),
        jwks_file="/etc/tasklease/idp-b-jwks.json",
        leeway=timedelta(seconds=30),
    )


def jwk(signer: Signer, **overrides: object) -> dict[str, object]:
    """The public JWK of ``signer`` as an IdP publishes it (``use: sig``)."""
    entry: dict[str, object] = {"kid": signer.kid, "use": "sig", **public_jwk(signer.public_key)}
    for name, value in overrides.items():
        if value is DROP:
            entry.pop(name, None)
        else:
            entry[name] = value
    return entry


def jwks(*entries: Mapping[str, object]) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


def key_set(*signers: Signer) -> OidcKeySet:
    return parse_oidc_jwks(ISS_A, jwks(*(jwk(s) for s in signers)))


def make_verifier(*, with_keys: bool = True) -> OidcVerifier:
    verifier = OidcVerifier(issuers=[config_a(), config_b()])
    if with_keys:
        fetched = NOW - timedelta(minutes=1)
        verifier.install_keys(ISS_A, key_set(RS_A, ES_A), fetched_at=fetched)
        verifier.install_keys(ISS_B, key_set(RS_B, ES_B_COLLIDING), fetched_at=fetched)
    return verifier


@pytest.fixture
def verifier() -> OidcVerifier:
    return make_verifier()


def id_claims(**overrides: object) -> dict[str, object]:
    """A valid ID token's claims from issuer A, issued at NOW for five minutes."""
    claims: dict[str, object] = {
        "iss": ISS_A,
        "aud": CLIENT_A,
        "sub": SUB,
        "exp": T0 + 300,
        "iat": T0,
        "email": "alice@example.test",
        "groups": ["tasklease-approvers"],
    }
    return claims | overrides


def id_token(
    signer: Signer = RS_A,
    *,
    header: Mapping[str, object] | None = None,
    claims: Mapping[str, object] | None = None,
    **kwargs: Any,
) -> str:
    """A compact JWS with :func:`id_claims` updated by ``claims`` (``DROP`` removes one)."""
    return token(signer, header=header, claims=id_claims(**(claims or {})), **kwargs)


def hs256_with_public_key(signer: Signer) -> str:
    """The classic confusion attack: HMAC-SHA256 keyed with the issuer's public key PEM."""
    pem = signer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = (
        b64url(encode_json({"alg": "HS256", "kid": signer.kid, "typ": "JWT"}))
        + "."
        + b64url(encode_json(id_claims()))
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def rejected(verifier: OidcVerifier, jwt: object, *, now: datetime = NOW) -> TaskleaseError:
    with pytest.raises(TaskleaseError) as info:
        verifier.verify(jwt, now=now)  # type: ignore[arg-type]
    return info.value


def reasons(jwt: object) -> tuple[str, str]:
    """The reason with keys installed, and the reason with no keys anywhere."""
    return rejected(make_verifier(), jwt).reason, rejected(KEYLESS, jwt).reason


KEYLESS = make_verifier(with_keys=False)
NO_KEYS = "oidc.keys_unavailable"


# ---------------------------------------------------------------------------------------------
# Happy paths


@pytest.mark.parametrize("signer", [RS_A, ES_A], ids=lambda s: s.alg)
def test_valid_id_token_is_accepted_with_identity_and_claims(
    verifier: OidcVerifier, signer: Signer
) -> None:
    identity, claims = verifier.verify(id_token(signer), now=NOW)

    expected = HumanIdentity(
        issuer=ISS_A,
        subject=SUB,
        display="alice@example.test",
        expires_at=datetime.fromtimestamp(T0 + 300, UTC),
        groups=("tasklease-approvers",),
    )
    assert (expected, id_claims()) == (identity, dict(claims))


def test_token_of_issuer_b_verifies_against_b_keys(verifier: OidcVerifier) -> None:
    jwt = id_token(RS_B, claims={"iss": ISS_B, "aud": CLIENT_B})

    identity, _ = verifier.verify(jwt, now=NOW)

    assert (ISS_B, f"oidc:{ISS_B}#{SUB}") == (identity.issuer, identity.principal_id)


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        ({"typ": DROP}, {}),
        ({"x5t": "bm90LWEtdGh1bWJwcmludA"}, {}),  # Entra ID adds x5t; its value is ignored
        ({"x5t": 42}, {}),
        ({}, {"aud": [CLIENT_A]}),
        ({}, {"aud": ["other-client", CLIENT_A], "azp": CLIENT_A}),
        ({}, {"azp": "android-client-id"}),  # one audience: cross-client azp is accepted
        ({}, {"nbf": T0 - 10}),
        ({}, {"exp": T0 + 3600}),  # lifetime exactly at the maximum
    ],
    ids=repr,
)
def test_acceptable_variations_verify(
    verifier: OidcVerifier, header: dict[str, object], claims: dict[str, object]
) -> None:
    identity, _ = verifier.verify(id_token(header=header, claims=claims), now=NOW)

    assert identity.subject == SUB


@pytest.mark.parametrize(
    ("claims", "display"),
    [
        ({}, "alice@example.test"),
        ({"email": DROP, "preferred_username": "alice"}, "alice"),
        ({"email": 7, "preferred_username": "alice"}, "alice"),
        ({"email": "", "preferred_username": "alice"}, "alice"),
        ({"email": DROP}, SUB),
        ({"email": "evil\r\n\x1b[31m@x"}, "evil\\r\\n\\x1b[31m@x"),
        ({"email": "e" * 500}, "e" * 128 + "…(+372 chars)"),
    ],
    ids=repr,
)
def test_display_is_the_first_display_claim_escaped_and_truncated(
    verifier: OidcVerifier, claims: dict[str, object], display: str
) -> None:
    identity, _ = verifier.verify(id_token(claims=claims), now=NOW)

    assert display == identity.display


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        (["a", "b"], ("a", "b")),
        ([], ()),
        (DROP, ()),
        ("a", ()),
        (["a", 7], ()),
        ({"a": 1}, ()),
    ],
    ids=repr,
)
def test_groups_come_from_the_groups_claim_only_when_a_list_of_strings(
    verifier: OidcVerifier, groups: object, expected: tuple[str, ...]
) -> None:
    identity, _ = verifier.verify(id_token(claims={"groups": groups}), now=NOW)

    assert expected == identity.groups


def test_configured_display_and_groups_claims_are_used() -> None:
    verifier = OidcVerifier(
        issuers=[config_a(display_claims=("name",), groups_claim="roles")],
    )
    verifier.install_keys(ISS_A, key_set(RS_A), fetched_at=NOW)
    jwt = id_token(claims={"name": "Alice A.", "roles": ["TaskleaseAdmin"]})

    identity, _ = verifier.verify(jwt, now=NOW)

    assert (identity.display, identity.groups) == ("Alice A.", ("TaskleaseAdmin",))


def test_verified_claims_are_read_only(verifier: OidcVerifier) -> None:
    _, claims = verifier.verify(id_token(), now=NOW)

    with pytest.raises(TypeError):
        claims["sub"] = "someone-else"  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Role mapping from verified claims


ROLE_MAP = parse_role_map(
    {
        "human": [
            {
                "issuer": ISS_A,
                "claim": "groups",
                "value": "tasklease-approvers",
                "roles": ["approver"],
            },
            {"issuer": ISS_A, "claim": "sub", "value": "root-1", "roles": ["admin"]},
            {
                "issuer": ISS_B,
                "claim": "groups",
                "value": "tasklease-approvers",
                "roles": ["admin"],
            },
        ]
    }
)


@pytest.mark.parametrize(
    ("jwt", "roles"),
    [
        (id_token, {Role.APPROVER}),
        (lambda: id_token(claims={"sub": "root-1"}), {Role.APPROVER, Role.ADMIN}),
        (lambda: id_token(claims={"groups": ["other"]}), set()),
        (lambda: id_token(claims={"groups": DROP}), set()),
        (lambda: id_token(RS_B, claims={"iss": ISS_B, "aud": CLIENT_B}), {Role.ADMIN}),
    ],
    ids=["approver-group", "admin-sub", "other-group", "no-groups", "same-group-issuer-b"],
)
def test_roles_for_human_from_verified_claims(
    verifier: OidcVerifier, jwt: Callable[[], str], roles: set[Role]
) -> None:
    identity, claims = verifier.verify(jwt(), now=NOW)

    assert frozenset(roles) == ROLE_MAP.roles_for_human(identity, claims)


# ---------------------------------------------------------------------------------------------
# Header: alg allow-list (global, then the issuer's) before any key lookup


def _alg_rows() -> list[tuple[str, Callable[[], str], str]]:
    return [
        ("none", lambda: id_token(header={"alg": "none"}, signature=b""), "oidc.alg_not_allowed"),
        ("None", lambda: id_token(header={"alg": "None"}, signature=b""), "oidc.alg_not_allowed"),
        (
            "HS256 keyed with public key",
            lambda: hs256_with_public_key(RS_A),
            "oidc.alg_not_allowed",
        ),
        (
            "EdDSA",
            lambda: id_token(header={"alg": "EdDSA"}, signature=b"\x01" * 64),
            "oidc.alg_not_allowed",
        ),
        (
            "ES256K",
            lambda: id_token(Signer("a-ec", ec_key("secp256k1"), "ES256K")),
            "oidc.alg_not_allowed",
        ),
        ("lowercase rs256", lambda: id_token(header={"alg": "rs256"}), "oidc.alg_not_allowed"),
        ("alg is a list", lambda: id_token(header={"alg": ["RS256"]}), "oidc.alg_not_allowed"),
        ("alg is null", lambda: id_token(header={"alg": None}), "oidc.alg_not_allowed"),
        ("alg missing", lambda: id_token(header={"alg": DROP}), "oidc.alg_missing"),
        (
            "PS256 not configured for A",
            lambda: id_token(Signer("a-rsa", RS_A.key, "PS256")),
            "oidc.alg_not_allowed_for_issuer",
        ),
        (
            "ES384 not configured for A",
            lambda: id_token(Signer("a-ec", ec_key("P-384", "a"), "ES384")),
            "oidc.alg_not_allowed_for_issuer",
        ),
    ]


@pytest.mark.parametrize(("case", "build", "reason"), _alg_rows(), ids=[r[0] for r in _alg_rows()])
def test_alg_outside_allow_list_is_rejected_before_key_lookup(
    case: str, build: Callable[[], str], reason: str
) -> None:
    assert (reason, reason) == reasons(build())


@pytest.mark.parametrize(
    ("header_alg", "signer"),
    [("ES256", RS_A), ("RS256", ES_A)],
    ids=["rsa-key-es256", "ec-key-rs256"],
)
def test_alg_not_fitting_the_key_is_rejected(header_alg: str, signer: Signer) -> None:
    jwt = id_token(signer, header={"alg": header_alg}, sign_alg=signer.alg)

    assert reasons(jwt) == ("oidc.alg_key_mismatch", NO_KEYS)


def test_alg_other_than_the_one_the_jwk_declares_is_rejected() -> None:
    verifier = OidcVerifier(issuers=[config_a(algorithms=frozenset({"RS256", "PS256"}))])
    verifier.install_keys(
        ISS_A, parse_oidc_jwks(ISS_A, jwks(jwk(RS_A, alg="RS256"))), fetched_at=NOW
    )
    assert verifier.verify(id_token(RS_A), now=NOW)[0].subject == SUB

    pss = id_token(Signer("a-rsa", RS_A.key, "PS256"))

    assert rejected(verifier, pss).reason == "oidc.alg_key_mismatch"


# ---------------------------------------------------------------------------------------------
# Header: kid and forbidden parameters


@pytest.mark.parametrize(
    ("kid", "reason"),
    [
        (DROP, "oidc.kid_missing"),
        ("../../etc/passwd", "oidc.kid_malformed"),
        ("/etc/passwd", "oidc.kid_malformed"),
        ("..", "oidc.kid_malformed"),
        ("https://evil.example/jwks.json", "oidc.kid_malformed"),
        ("a-rsa' OR '1'='1", "oidc.kid_malformed"),
        ("a-rsa%2F..", "oidc.kid_malformed"),
        ("a-rsa\n", "oidc.kid_malformed"),
        ("", "oidc.kid_malformed"),
        ("k" * 129, "oidc.kid_malformed"),
        (7, "oidc.kid_malformed"),
        (None, "oidc.kid_malformed"),
    ],
    ids=repr,
)
def test_missing_or_shaped_kid_is_rejected_before_key_lookup(kid: object, reason: str) -> None:
    assert (reason, reason) == reasons(id_token(header={"kid": kid}))


def test_unknown_kid_is_rejected() -> None:
    assert reasons(id_token(header={"kid": "no-such-kid"})) == ("oidc.kid_unknown", NO_KEYS)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"jku": "https://evil.example/jwks"}, "oidc.header_not_allowed"),
        ({"x5u": "https://evil.example/cert"}, "oidc.header_not_allowed"),
        ({"jwk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}}, "oidc.header_not_allowed"),
        ({"x5c": ["MIIB"]}, "oidc.header_not_allowed"),
        ({"crit": ["exp"]}, "oidc.header_not_allowed"),
        ({"x5t#S256": "AA"}, "oidc.header_not_allowed"),
        ({"cty": "JWT"}, "oidc.header_not_allowed"),
        ({"b64": False}, "oidc.header_not_allowed"),
        ({"nonce": "x"}, "oidc.header_not_allowed"),
        ({"typ": "at+jwt"}, "oidc.typ_not_allowed"),
        ({"typ": "logout+jwt"}, "oidc.typ_not_allowed"),
        ({"typ": "jwt"}, "oidc.typ_not_allowed"),
        ({"typ": ""}, "oidc.typ_not_allowed"),
        ({"typ": None}, "oidc.typ_not_allowed"),
        ({"typ": ["JWT"]}, "oidc.typ_not_allowed"),
    ],
    ids=repr,
)
def test_header_outside_allow_list_is_rejected_before_key_lookup(
    header: dict[str, object], reason: str
) -> None:
    assert (reason, reason) == reasons(id_token(header=header))


# ---------------------------------------------------------------------------------------------
# iss: exact match, and only the keys of the token's own issuer


@pytest.mark.parametrize(
    ("iss", "reason"),
    [
        (DROP, "oidc.iss_missing"),
        ("https://evil.example.test/realms/ops", "oidc.iss_unknown"),
        (ISS_A + "/", "oidc.iss_unknown"),
        (ISS_A.upper(), "oidc.iss_unknown"),
        (ISS_A.replace("https://", "http://"), "oidc.iss_unknown"),
        (ISS_A + "\n", "oidc.iss_unknown"),
        ("", "oidc.iss_unknown"),
        ([ISS_A], "oidc.iss_malformed"),
        (None, "oidc.iss_malformed"),
        (7, "oidc.iss_malformed"),
    ],
    ids=repr,
)
def test_iss_not_exactly_a_configured_issuer_is_rejected_before_key_lookup(
    iss: object, reason: str
) -> None:
    assert (reason, reason) == reasons(id_token(claims={"iss": iss}))


@pytest.mark.parametrize(
    ("case", "build", "reason"),
    [
        # iss says A, signed with B's key and kid: A's keys do not have that kid.
        ("iss A, key of B", lambda: id_token(RS_B), "oidc.kid_unknown"),
        # B's key shares a kid with A's: A's key with that kid is used, so the signature fails.
        (
            "iss A, B's key under A's kid",
            lambda: id_token(ES_B_COLLIDING),
            "oidc.signature_invalid",
        ),
        (
            "iss B, key of A",
            lambda: id_token(RS_A, claims={"iss": ISS_B, "aud": CLIENT_B}),
            "oidc.kid_unknown",
        ),
        (
            "iss B, A's key under the colliding kid",
            lambda: id_token(ES_A, claims={"iss": ISS_B, "aud": CLIENT_B}),
            "oidc.signature_invalid",
        ),
        # Each issuer has its own client id: A's audience is not good at B.
        (
            "iss B, audience of A",
            lambda: id_token(RS_B, claims={"iss": ISS_B}),
            "oidc.aud_mismatch",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_keys_and_audience_of_another_issuer_never_count(
    verifier: OidcVerifier, case: str, build: Callable[[], str], reason: str
) -> None:
    error = rejected(verifier, build())

    assert (OidcTokenRejectedError, reason) == (type(error), error.reason)


# ---------------------------------------------------------------------------------------------
# aud and azp


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": DROP}, "oidc.aud_missing"),
        ({"aud": "other-client"}, "oidc.aud_mismatch"),
        ({"aud": ["other-a", "other-b"]}, "oidc.aud_mismatch"),
        ({"aud": CLIENT_A.upper()}, "oidc.aud_mismatch"),
        ({"aud": CLIENT_A + " "}, "oidc.aud_mismatch"),
        ({"aud": ""}, "oidc.aud_malformed"),
        ({"aud": []}, "oidc.aud_malformed"),
        ({"aud": [""]}, "oidc.aud_malformed"),
        ({"aud": [CLIENT_A, 7]}, "oidc.aud_malformed"),
        ({"aud": None}, "oidc.aud_malformed"),
        ({"aud": {"aud": CLIENT_A}}, "oidc.aud_malformed"),
        ({"aud": [CLIENT_A, "other-client"]}, "oidc.azp_missing"),
        ({"aud": [CLIENT_A, "other-client"], "azp": "other-client"}, "oidc.azp_mismatch"),
        ({"azp": 7}, "oidc.azp_malformed"),
        ({"azp": None}, "oidc.azp_malformed"),
    ],
    ids=repr,
)
def test_bad_aud_or_azp_is_rejected_before_key_lookup(
    claims: dict[str, object], reason: str
) -> None:
    assert (reason, reason) == reasons(id_token(claims=claims))


# ---------------------------------------------------------------------------------------------
# sub


@pytest.mark.parametrize(
    ("sub", "reason"),
    [
        (DROP, "oidc.sub_missing"),
        ("", "oidc.sub_invalid"),
        ("s" * 256, "oidc.sub_invalid"),
        ("alice\n", "oidc.sub_invalid"),
        ("\x1b[31malice", "oidc.sub_invalid"),
        ("alicé", "oidc.sub_invalid"),
        (12345, "oidc.sub_invalid"),
        (None, "oidc.sub_invalid"),
        ([SUB], "oidc.sub_invalid"),
    ],
    ids=repr,
)
def test_bad_sub_is_rejected_before_key_lookup(sub: object, reason: str) -> None:
    assert (reason, reason) == reasons(id_token(claims={"sub": sub}))


def test_sub_of_255_characters_is_accepted(verifier: OidcVerifier) -> None:
    identity, _ = verifier.verify(id_token(claims={"sub": "s" * 255}), now=NOW)

    assert len(identity.subject) == 255


# ---------------------------------------------------------------------------------------------
# exp, iat, nbf, lifetime


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": DROP}, "oidc.exp_missing"),
        ({"exp": T0 - 31, "iat": T0 - 100}, "oidc.expired"),
        ({"exp": str(T0 + 300)}, "oidc.exp_not_integer"),
        ({"exp": float(T0 + 300)}, "oidc.exp_not_integer"),
        ({"exp": 1e30}, "oidc.exp_not_integer"),
        ({"exp": True}, "oidc.exp_not_integer"),
        ({"exp": None}, "oidc.exp_not_integer"),
        ({"exp": 10**30}, "oidc.exp_out_of_range"),
        ({"exp": -1}, "oidc.exp_out_of_range"),
        ({"iat": DROP}, "oidc.iat_missing"),
        ({"iat": T0 + 31}, "oidc.iat_in_future"),
        ({"iat": float(T0)}, "oidc.iat_not_integer"),
        ({"iat": str(T0)}, "oidc.iat_not_integer"),
        ({"iat": -5}, "oidc.iat_out_of_range"),
        ({"nbf": T0 + 31}, "oidc.not_yet_valid"),
        ({"nbf": str(T0)}, "oidc.nbf_not_integer"),
        ({"nbf": 10**30}, "oidc.nbf_out_of_range"),
        ({"exp": T0 + 3601}, "oidc.lifetime_too_long"),
        ({"exp": T0 + 3000, "iat": T0 - 1000}, "oidc.lifetime_too_long"),
        ({"exp": T0 + 5, "nbf": T0 + 20}, "oidc.exp_before_start"),
        ({"exp": T0 + 5, "iat": T0 + 10}, "oidc.exp_before_start"),
    ],
    ids=repr,
)
def test_bad_time_claim_is_rejected_before_key_lookup(
    claims: dict[str, object], reason: str
) -> None:
    assert (reason, reason) == reasons(id_token(claims=claims))


@pytest.mark.parametrize(
    ("now_offset", "accepted"),
    [(29, True), (30, False), (31, False)],
    ids=["1s-inside", "at-boundary", "1s-outside"],
)
def test_exp_leeway_boundary(verifier: OidcVerifier, now_offset: int, accepted: bool) -> None:
    """exp + leeway (30 s) must be strictly after now."""
    jwt = id_token(claims={"exp": T0, "iat": T0 - 60})
    now = NOW + timedelta(seconds=now_offset)

    if accepted:
        assert int(verifier.verify(jwt, now=now)[0].expires_at.timestamp()) == T0
    else:
        assert rejected(verifier, jwt, now=now).reason == "oidc.expired"


@pytest.mark.parametrize(
    ("claim", "offset", "reason"),
    [
        ("nbf", 29, None),
        ("nbf", 30, None),
        ("nbf", 31, "oidc.not_yet_valid"),
        ("iat", 29, None),
        ("iat", 30, None),
        ("iat", 31, "oidc.iat_in_future"),
    ],
    ids=repr,
)
def test_nbf_and_iat_leeway_boundary(
    verifier: OidcVerifier, claim: str, offset: int, reason: str | None
) -> None:
    """nbf - leeway and iat - leeway (30 s) must not be after now."""
    jwt = id_token(claims={claim: T0 + offset})

    if reason is None:
        assert verifier.verify(jwt, now=NOW)[0].subject == SUB
    else:
        assert reason == rejected(verifier, jwt).reason


def test_configured_max_lifetime_applies_per_issuer() -> None:
    verifier = OidcVerifier(issuers=[config_a(max_lifetime=timedelta(hours=10))])
    verifier.install_keys(ISS_A, key_set(RS_A), fetched_at=NOW)
    ten_hours = id_token(claims={"exp": T0 + 36_000})

    assert verifier.verify(ten_hours, now=NOW)[0].subject == SUB
    assert rejected(make_verifier(), ten_hours).reason == "oidc.lifetime_too_long"


# ---------------------------------------------------------------------------------------------
# Serialization, encoding, budget, signature


def _segments() -> list[str]:
    return id_token().split(".")


def _replace_segment(index: int, value: str) -> str:
    parts = _segments()
    parts[index] = value
    return ".".join(parts)


_CLAIMS = encode_json(id_claims())


def _structure_rows() -> list[tuple[str, Callable[[], object], str]]:
    h, p, s = 0, 1, 2
    return [
        ("empty", lambda: "", "oidc.segment_count"),
        ("bytes not str", lambda: id_token().encode(), "oidc.not_a_string"),
        ("None", lambda: None, "oidc.not_a_string"),
        (
            "JWS JSON serialization",
            lambda: '{"payload":"e30","protected":"e30","signature":"AA"}',
            "oidc.json_serialization",
        ),
        ("two segments", lambda: ".".join(_segments()[:2]), "oidc.segment_count"),
        ("four segments", lambda: id_token() + ".AAAA", "oidc.segment_count"),
        ("five segments (JWE)", lambda: id_token() + ".AA.AA", "oidc.segment_count"),
        ("only dots", lambda: "..", "oidc.header_malformed"),
        ("padded header", lambda: _replace_segment(h, _segments()[h] + "=="), "oidc.bad_base64"),
        (
            "plus in payload",
            lambda: _replace_segment(p, "+" + _segments()[p][1:]),
            "oidc.bad_base64",
        ),
        ("slash in sig", lambda: _replace_segment(s, "/" + _segments()[s][1:]), "oidc.bad_base64"),
        ("space before header", lambda: " " + id_token(), "oidc.bad_base64"),
        ("non-ascii", lambda: _replace_segment(p, "é" + _segments()[p][1:]), "oidc.bad_base64"),
        (
            "non-canonical trailing bits",
            lambda: _replace_segment(s, _segments()[s][:-1] + "B"),
            "oidc.bad_base64",
        ),
        ("header not JSON", lambda: id_token(header_bytes=b"{alg:RS256}"), "oidc.header_malformed"),
        ("header array", lambda: id_token(header_bytes=b'["RS256"]'), "oidc.header_malformed"),
        (
            "header duplicate alg",
            lambda: id_token(header_bytes=b'{"alg":"none","alg":"RS256","kid":"a-rsa"}'),
            "oidc.duplicate_member",
        ),
        ("payload not JSON", lambda: id_token(payload_bytes=b"not json"), "oidc.payload_malformed"),
        ("payload string", lambda: id_token(payload_bytes=b'"sub"'), "oidc.payload_malformed"),
        (
            "payload deep nesting",
            lambda: id_token(payload_bytes=b"[" * 3000 + b"]" * 3000),
            "oidc.payload_malformed",
        ),
        (
            "payload duplicate iss",
            lambda: id_token(payload_bytes=_CLAIMS[:-1] + f',"iss":"{ISS_B}"}}'.encode()),
            "oidc.duplicate_member",
        ),
        (
            "payload duplicate sub",
            lambda: id_token(payload_bytes=_CLAIMS[:-1] + b',"sub":"admin"}'),
            "oidc.duplicate_member",
        ),
        (
            "payload nested duplicate",
            lambda: id_token(payload_bytes=_CLAIMS[:-1] + b',"ctx":{"a":1,"a":2}}'),
            "oidc.duplicate_member",
        ),
    ]


@pytest.mark.parametrize(
    ("case", "build", "reason"), _structure_rows(), ids=[r[0] for r in _structure_rows()]
)
def test_malformed_serialization_is_rejected_before_key_lookup(
    case: str, build: Callable[[], object], reason: str
) -> None:
    assert (reason, reason) == reasons(build())


def _signature_rows() -> list[tuple[str, Callable[[], str]]]:
    good = id_token()
    return [
        ("RSA zero signature", lambda: id_token(signature=b"\x00" * 256)),
        ("RSA short signature", lambda: id_token(signature=b"\x01" * 8)),
        ("empty signature", lambda: id_token(signature=b"")),
        ("ECDSA r=s=0", lambda: id_token(ES_A, signature=b"\x00" * 64)),
        ("another key under A's kid", lambda: id_token(Signer("a-rsa", RS_B.key, "RS256"))),
        ("RS256 header, PS256 signature", lambda: id_token(sign_alg="PS256")),
        (
            "payload swapped after signing",
            lambda: ".".join(
                [
                    good.split(".")[0],
                    b64url(encode_json(id_claims(sub="root-1"))),
                    good.split(".")[2],
                ]
            ),
        ),
    ]


@pytest.mark.parametrize(
    ("case", "build"), _signature_rows(), ids=[r[0] for r in _signature_rows()]
)
def test_bad_signature_is_rejected(
    verifier: OidcVerifier, case: str, build: Callable[[], str]
) -> None:
    error = rejected(verifier, build())

    assert (OidcTokenRejectedError, "oidc.signature_invalid") == (type(error), error.reason)


def test_one_megabyte_token_is_rejected_fast_without_parsing(verifier: OidcVerifier) -> None:
    huge = "A" * (1024 * 1024 - 2) + ".."
    started = time.perf_counter()
    error = rejected(verifier, huge)
    elapsed = time.perf_counter() - started

    assert error.reason == "oidc.too_large"
    assert elapsed < 0.05


def test_ten_thousand_dots_are_rejected_fast() -> None:
    verifier = OidcVerifier(issuers=[config_a()], max_token_bytes=64 * 1024)
    started = time.perf_counter()
    error = rejected(verifier, "." * 10_000)
    elapsed = time.perf_counter() - started

    assert error.reason == "oidc.segment_count"
    assert elapsed < 0.05


def test_crypto_library_error_becomes_a_typed_rejection(
    verifier: OidcVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: if PyJWT ever raises instead of returning False, it is still a 401."""

    def explode(msg: bytes, key: object, sig: bytes) -> bool:
        raise ValueError("boom")

    monkeypatch.setattr(oidc._SIGNERS["RS256"], "verify", explode)

    assert rejected(verifier, id_token()).reason == "oidc.signature_invalid"


def test_rejection_detail_never_contains_the_token(verifier: OidcVerifier) -> None:
    jwt = id_token(RS_B)

    error = rejected(verifier, jwt)

    assert (jwt in error.detail, jwt.split(".")[2] in error.detail) == (False, False)


@pytest.mark.parametrize(
    ("header", "claims", "reason"),
    [
        ({"typ": "evil\r\n\x1b[31m" + "x" * 3000}, {}, "oidc.typ_not_allowed"),
        ({}, {"iss": "evil\r\n\x1b[31m" + "x" * 100_000}, "oidc.iss_unknown"),
        ({}, {"aud": ["evil\r\n\x1b[31m" + "x" * 100_000]}, "oidc.aud_mismatch"),
        ({}, {"sub": "evil\r\n\x1b[31m" + "x" * 100_000}, "oidc.sub_invalid"),
    ],
    ids=["typ", "iss", "aud", "sub"],
)
def test_untrusted_values_in_details_are_escaped_and_truncated(
    header: dict[str, object], claims: dict[str, object], reason: str
) -> None:
    verifier = OidcVerifier(issuers=[config_a()], max_token_bytes=1024 * 1024)
    error = rejected(verifier, id_token(header=header, claims=claims))

    assert (reason, False, False, True) == (
        error.reason,
        "\n" in error.detail,
        "\x1b" in error.detail,
        len(error.detail) < 500,
    )


def test_naive_now_is_a_programming_error(verifier: OidcVerifier) -> None:
    with pytest.raises(TypeError):
        verifier.verify(id_token(), now=NOW.replace(tzinfo=None))


# ---------------------------------------------------------------------------------------------
# Installed keys: fail closed before the first install and once stale; replaced whole


def test_issuer_without_installed_keys_fails_closed() -> None:
    error = rejected(KEYLESS, id_token())

    assert (UnavailableError, "oidc.keys_unavailable") == (type(error), error.reason)


@pytest.mark.parametrize(
    ("age", "reason"),
    [(timedelta(minutes=60), None), (timedelta(minutes=60, seconds=1), "oidc.keys_stale")],
    ids=["at-limit", "past-limit"],
)
def test_keys_older_than_max_key_age_fail_closed(age: timedelta, reason: str | None) -> None:
    verifier = OidcVerifier(issuers=[config_a(max_key_age=timedelta(hours=1))])
    verifier.install_keys(ISS_A, key_set(RS_A), fetched_at=NOW - age)

    if reason is None:
        assert verifier.verify(id_token(), now=NOW)[0].subject == SUB
    else:
        error = rejected(verifier, id_token())
        assert (UnavailableError, reason) == (type(error), error.reason)


def test_installing_a_key_set_without_a_key_stops_it_verifying(verifier: OidcVerifier) -> None:
    assert verifier.verify(id_token(ES_A), now=NOW)[0].subject == SUB

    verifier.install_keys(ISS_A, key_set(RS_A), fetched_at=NOW)

    assert rejected(verifier, id_token(ES_A)).reason == "oidc.kid_unknown"
    assert verifier.verify(id_token(RS_A), now=NOW)[0].subject == SUB


def test_empty_key_set_rejects_every_token_of_that_issuer(verifier: OidcVerifier) -> None:
    verifier.install_keys(ISS_A, parse_oidc_jwks(ISS_A, b'{"keys":[]}'), fetched_at=NOW)

    assert rejected(verifier, id_token()).reason == "oidc.kid_unknown"
    assert (
        verifier.verify(id_token(RS_B, claims={"iss": ISS_B, "aud": CLIENT_B}), now=NOW)[0].subject
        == SUB
    )


def test_issuer_snapshot_exposes_installed_keys_and_fetch_time(verifier: OidcVerifier) -> None:
    state = verifier.issuers[ISS_A]

    assert (ISS_A, {"a-rsa", "a-ec"}, NOW - timedelta(minutes=1)) == (
        state.issuer,
        set(state.keys),
        state.keys_fetched_at,
    )
    assert dict(KEYLESS.issuers[ISS_A].keys) == {}


@pytest.mark.parametrize(
    "build",
    [
        lambda: OidcVerifier(issuers=[config_a(), config_a()]),
        lambda: OidcVerifier(issuers=[config_a()], max_token_bytes=100),
        lambda: OidcVerifier(issuers=[config_a()], max_token_bytes=True),
        lambda: OidcVerifier(issuers=[ISS_A]),  # type: ignore[list-item]
        lambda: OidcVerifier(issuers=[config_a()]).install_keys(
            ISS_B, key_set(RS_B), fetched_at=NOW
        ),
    ],
    ids=[
        "issuer-twice",
        "budget-too-small",
        "budget-bool",
        "issuer-not-a-config",
        "install-for-unknown-issuer",
    ],
)
def test_verifier_misconfiguration_is_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError):
        build()


# ---------------------------------------------------------------------------------------------
# issuer_of: the unverified routing peek


@pytest.mark.parametrize(
    ("jwt", "expected"),
    [
        (id_token, ISS_A),
        (lambda: id_token(RS_B, claims={"iss": ISS_B}), ISS_B),
        (lambda: id_token(signature=b"\x00"), ISS_A),  # unverified: routing only
        (lambda: id_token(claims={"iss": DROP}), None),  # a JWT-SVID has no iss
        (lambda: id_token(claims={"iss": "https://spire.example.test"}), None),
        (lambda: id_token(claims={"iss": [ISS_A]}), None),
        (lambda: id_token(payload_bytes=b"[1]"), None),
        (lambda: id_token(payload_bytes=_CLAIMS[:-1] + b',"iss":"x"}'), None),
        (lambda: "A" * (1024 * 1024), None),
        (lambda: "." * 10_000, None),
        (lambda: "", None),
        (lambda: b"bytes", None),
        (lambda: None, None),
        (lambda: "a.%%%.c", None),
    ],
    ids=[
        "issuer-a",
        "issuer-b",
        "bad-signature",
        "no-iss",
        "other-iss",
        "iss-list",
        "payload-array",
        "duplicate-member",
        "1MB",
        "dots",
        "empty",
        "bytes",
        "None",
        "bad-base64",
    ],
)
def test_issuer_of_names_only_configured_issuers_and_never_raises(
    verifier: OidcVerifier, jwt: Callable[[], object], expected: str | None
) -> None:
    assert expected == verifier.issuer_of(jwt())


# ---------------------------------------------------------------------------------------------
# Properties: any input only ever raises the typed errors


_VERIFIER = make_verifier()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=600) | st.from_regex(r"[A-Za-z0-9_\-]{0,80}(\.[A-Za-z0-9_\-=]{0,80}){0,4}"))
def test_arbitrary_text_only_raises_the_typed_error(candidate: str) -> None:
    with contextlib.suppress(OidcTokenRejectedError):
        _VERIFIER.verify(candidate, now=NOW)
        pytest.fail("an arbitrary string verified")  # pragma: no cover


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=600) | st.binary(max_size=200) | st.none() | st.integers())
def test_issuer_of_garbage_returns_none(candidate: object) -> None:
    assert _VERIFIER.issuer_of(candidate) is None


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
        "alg": st.sampled_from(["RS256", "ES256", "PS256", "none", "HS256"]) | _json,
        "kid": st.sampled_from(["a-rsa", "a-ec", "b-rsa", "../x"]) | _json,
        "typ": st.sampled_from(["JWT", "at+jwt"]) | _json,
        "x5t": _json,
    },
)
_claim_values = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.sampled_from([ISS_A, ISS_B, ISS_A + "/"]) | _json,
        "aud": st.sampled_from([CLIENT_A, [CLIENT_A, CLIENT_B], CLIENT_B]) | _json,
        "azp": st.sampled_from([CLIENT_A, CLIENT_B]) | _json,
        "sub": st.sampled_from([SUB, "", "x" * 300]) | _json,
        "exp": st.integers(min_value=T0 - 100, max_value=T0 + 5000) | _json,
        "nbf": st.integers(min_value=T0 - 100, max_value=T0 + 100) | _json,
        "iat": st.integers(min_value=T0 - 5000, max_value=T0 + 100) | _json,
        "email": _json,
        "groups": _json,
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_header_values, claims=_claim_values, signer=st.sampled_from([RS_A, ES_A, RS_B]))
def test_structured_fuzz_only_raises_the_typed_error_or_verifies(
    header: dict[str, object], claims: dict[str, object], signer: Signer
) -> None:
    full_header = {name: header.get(name, DROP) for name in ("alg", "kid", "typ")} | {
        k: v for k, v in header.items() if k == "x5t"
    }
    # Start from nothing: every claim present is one hypothesis chose.
    jwt = token(
        signer,
        header=full_header,
        claims={"sub": DROP, "aud": DROP, "exp": DROP, "iat": DROP} | claims,
    )
    try:
        identity, verified = _VERIFIER.verify(jwt, now=NOW)
    except OidcTokenRejectedError:
        return
    # Whatever got through is internally consistent.
    assert (identity.issuer, identity.subject) == (verified["iss"], verified["sub"])


# ---------------------------------------------------------------------------------------------
# JWKS parsing


def test_jwks_keeps_signing_keys_and_ignores_x5c_and_x5t() -> None:
    entries = [
        jwk(RS_A, x5c=["bm90IGEgY2VydA=="], x5t="AAAA", issuer=ISS_A),
        jwk(ES_A, use=DROP, alg="ES256"),
    ]

    parsed = parse_oidc_jwks(ISS_A, jwks(*entries))

    assert ({"a-rsa", "a-ec"}, {"a-ec": "ES256"}, ()) == (
        set(parsed.keys),
        dict(parsed.algorithms),
        parsed.skipped,
    )


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (lambda: jwk(RS_A, use="enc"), "oidc_jwk.not_for_signatures"),
        (lambda: jwk(RS_A, use="jwt-svid"), "oidc_jwk.not_for_signatures"),
        (lambda: jwk(RS_A, use=DROP, key_ops=["sign"]), "oidc_jwk.not_for_signatures"),
        (lambda: jwk(RS_A, use=DROP, key_ops="verify"), "oidc_jwk.not_for_signatures"),
        (lambda: jwk(RS_A, kid=DROP), "oidc_jwk.kid_missing"),
        (lambda: jwk(RS_A, kid="../keys/a"), "oidc_jwk.kid_malformed"),
        (lambda: jwk(RS_A, kid="abc+/=="), "oidc_jwk.kid_malformed"),
        (lambda: jwk(RS_A, kty=DROP), "oidc_jwk.kty_missing"),
        (
            lambda: {"kid": "s", "use": "sig", "kty": "oct", "k": "c2VjcmV0"},
            "oidc_jwk.kty_unsupported",
        ),
        (
            lambda: {"kid": "o", "kty": "OKP", "crv": "Ed25519", "x": "AA"},
            "oidc_jwk.kty_unsupported",
        ),
        (lambda: jwk(RS_A, d="AQAB"), "oidc_jwk.private_material"),
        (lambda: jwk(Signer("small", rsa_key(1024), "RS256")), "oidc_jwk.rsa_too_small"),
        (lambda: jwk(RS_A, n="AQAB="), "oidc_jwk.rsa_malformed"),
        (lambda: jwk(RS_A, e=DROP), "oidc_jwk.rsa_malformed"),
        (lambda: jwk(RS_A, e="AA"), "oidc_jwk.rsa_malformed"),
        (
            lambda: jwk(RS_A, n=b64url((2**8200 - 1).to_bytes(1025, "big"))),
            "oidc_jwk.rsa_too_large",
        ),
        (lambda: jwk(ES_A, crv="secp256k1"), "oidc_jwk.ec_curve_unsupported"),
        (lambda: jwk(ES_A, crv=DROP), "oidc_jwk.ec_curve_unsupported"),
        (lambda: jwk(ES_A, x="AAAA"), "oidc_jwk.ec_malformed"),
        (lambda: jwk(ES_A, y=b64url(b"\x00" * 31 + b"\x01")), "oidc_jwk.ec_malformed"),
        (lambda: jwk(RS_A, alg="HS256"), "oidc_jwk.alg_mismatch"),
        (lambda: jwk(RS_A, alg="ES256"), "oidc_jwk.alg_mismatch"),
        (lambda: jwk(ES_A, alg="ES384"), "oidc_jwk.alg_mismatch"),
    ],
    ids=[
        "use-enc",
        "use-jwt-svid",
        "key_ops-sign-only",
        "key_ops-not-a-list",
        "kid-missing",
        "kid-path",
        "kid-base64-std",
        "kty-missing",
        "kty-oct",
        "kty-okp",
        "private-d",
        "rsa-1024",
        "rsa-n-padded",
        "rsa-e-missing",
        "rsa-e-zero",
        "rsa-8200-bits",
        "ec-secp256k1",
        "ec-crv-missing",
        "ec-x-short",
        "ec-point-off-curve",
        "alg-hs256",
        "alg-es256-on-rsa",
        "alg-es384-on-p256",
    ],
)
def test_unusable_jwk_is_skipped_with_a_reason_and_never_trusted(
    entry: Callable[[], dict[str, object]], reason: str
) -> None:
    parsed = parse_oidc_jwks(ISS_A, jwks(entry(), jwk(RS_B)))

    assert ({"b-rsa"}, [reason]) == (set(parsed.keys), [s.reason for s in parsed.skipped])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"x" * (oidc.DEFAULT_MAX_JWKS_BYTES + 1), "oidc_jwks.too_large"),
        (b"not json", "oidc_jwks.malformed_json"),
        ("{}", "oidc_jwks.malformed_json"),
        (b'{"keys":[],"keys":[]}', "oidc_jwks.duplicate_member"),
        (b"[]", "oidc_jwks.not_an_object"),
        (b"{}", "oidc_jwks.keys_missing"),
        (b'{"keys":{}}', "oidc_jwks.keys_missing"),
        (b'{"keys":["x"]}', "oidc_jwks.key_not_an_object"),
        (json.dumps({"keys": [{"kty": "oct"}] * 101}).encode(), "oidc_jwks.too_many_keys"),
        (jwks(jwk(RS_A), jwk(RS_B, kid="a-rsa")), "oidc_jwks.duplicate_kid"),
        (jwks(jwk(RS_A), jwk(RS_A, use=DROP)), "oidc_jwks.duplicate_kid"),
    ],
    ids=[
        "too-large",
        "not-json",
        "str-not-bytes",
        "duplicate-member",
        "array",
        "no-keys",
        "keys-object",
        "key-string",
        "too-many",
        "duplicate-kid",
        "duplicate-kid-use-absent",
    ],
)
def test_unusable_jwks_document_is_rejected_whole(data: object, reason: str) -> None:
    with pytest.raises(UnavailableError) as info:
        parse_oidc_jwks(ISS_A, data)  # type: ignore[arg-type]

    assert reason == info.value.reason


def test_same_kid_for_a_signing_and_an_encryption_key_is_not_ambiguous() -> None:
    parsed = parse_oidc_jwks(ISS_A, jwks(jwk(RS_A), jwk(RS_B, kid="a-rsa", use="enc")))

    assert (
        list(parsed.keys),
        [s.reason for s in parsed.skipped],
    ) == (["a-rsa"], ["oidc_jwk.not_for_signatures"])


@pytest.mark.parametrize(
    "build",
    [
        lambda: OidcKeySet(keys={"../a": RS_A.public_key}),
        lambda: OidcKeySet(keys={"small": rsa_key(1024).public_key()}),
        lambda: OidcKeySet(keys={"k1": ec_key("secp256k1").public_key()}),
        lambda: OidcKeySet(keys={"a-rsa": RS_A.public_key}, algorithms={"a-rsa": "ES256"}),
        lambda: OidcKeySet(keys={}, algorithms={"ghost": "RS256"}),
        lambda: OidcKeySet(keys={"ed": ed25519_key().public_key()}),  # type: ignore[dict-item]
    ],
    ids=["kid", "rsa-1024", "secp256k1", "alg-mismatch", "alg-without-key", "ed25519"],
)
def test_key_set_outside_key_policy_cannot_be_built(build: Callable[[], OidcKeySet]) -> None:
    with pytest.raises(UnavailableError) as info:
        build()

    assert info.value.reason == "oidc_jwks.invalid_key"


def test_skipped_entries_keep_their_position() -> None:
    parsed = parse_oidc_jwks(ISS_A, jwks(jwk(RS_A), jwk(ES_A, use="enc")))

    assert (SkippedKey(1, "oidc_jwk.not_for_signatures", "entry has use enc, not sig"),) == (
        parsed.skipped
    )


# ---------------------------------------------------------------------------------------------
# Configuration: [[oidc_issuer]] in identities.toml


IDENTITIES_TOML = """
[[human]]
issuer = "https://login.example.test/realms/ops"
claim = "groups"
value = "tasklease-approvers"
roles = ["approver"]

[[oidc_issuer]]
issuer = "https://login.example.test/realms/ops"
audience = "tasklease"
algorithms = ["RS256", "ES256"]
jwks_url = "https://login.example.test/realms/ops/protocol/openid-connect/certs"
leeway_seconds = 30
max_lifetime_seconds = 3600

[[oidc_issuer]]
issuer = "https://login.microsoftonline.com/0b1c2d3e-tenant/v2.0"
audience = "6f1e2d3c-client"
algorithms = ["RS256"]
jwks_file = "/etc/tasklease/entra-jwks.json"
refresh_seconds = 600
max_key_age_seconds = 7200
display_claims = ["preferred_username", "name"]
groups_claim = "roles"
"""


def test_identities_toml_issuers_parse_into_configs() -> None:
    document = tomllib.loads(IDENTITIES_TOML)

    configs = parse_oidc_issuers(document["oidc_issuer"])

    assert [
        OidcIssuerConfig(
            issuer="https://login.example.test/realms/ops",
            audience="tasklease",
            algorithms=frozenset({"RS256", "ES256"}),
            jwks_url="https://login.example.test/realms/ops/protocol/openid-connect/certs",
            leeway=timedelta(seconds=30),
            max_lifetime=timedelta(hours=1),
        ),
        OidcIssuerConfig(
            issuer="https://login.microsoftonline.com/0b1c2d3e-tenant/v2.0",
            audience="6f1e2d3c-client",
            algorithms=frozenset({"RS256"}),
            jwks_file="/etc/tasklease/entra-jwks.json",
            refresh=timedelta(minutes=10),
            max_key_age=timedelta(hours=2),
            display_claims=("preferred_username", "name"),
            groups_claim="roles",
        ),
    ] == configs
    # The role map accepts the same document (it ignores the oidc_issuer section).
    assert len(parse_role_map(document).human_rules) == 1


def test_no_oidc_issuers_is_an_empty_list() -> None:
    assert parse_oidc_issuers([]) == []


_GOOD_ENTRY: dict[str, object] = {
    "issuer": "https://idp.example.test",
    "audience": "tasklease",
    "algorithms": ["RS256"],
    "jwks_url": "https://idp.example.test/jwks",
}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"issuer": "http://idp.example.test"}, "issuer"),
        ({"issuer": "HTTPS://idp.example.test"}, "issuer"),
        ({"issuer": "https://idp.example.test?tenant=1"}, "issuer"),
        ({"issuer": "https://idp.example.test#x"}, "issuer"),
        ({"issuer": "https://user@idp.example.test"}, "issuer"),
        ({"issuer": "https:///realms/ops"}, "issuer"),
        ({"issuer": "https://idp.example.test:99999"}, "issuer"),
        ({"issuer": "https://idp.example.test:0"}, "issuer"),
        ({"issuer": "https://idp.example.test/a b"}, "issuer"),
        ({"issuer": "https://idp.example.test/\n"}, "issuer"),
        ({"issuer": "https://idp.exämple.test"}, "issuer"),
        ({"issuer": ""}, "issuer"),
        ({"issuer": 7}, "issuer"),
        ({"issuer": DROP}, "issuer"),
        ({"audience": ""}, "audience"),
        ({"audience": "   "}, "audience"),
        ({"audience": " tasklease"}, "audience"),
        ({"audience": DROP}, "audience"),
        ({"audience": ["tasklease"]}, "audience"),
        ({"algorithms": ["HS256"]}, "algorithms"),
        ({"algorithms": ["RS256", "hs512"]}, "algorithms"),
        ({"algorithms": ["none"]}, "algorithms"),
        ({"algorithms": ["EdDSA"]}, "algorithms"),
        ({"algorithms": ["ES256K"]}, "algorithms"),
        ({"algorithms": []}, "algorithms"),
        ({"algorithms": "RS256"}, "algorithms"),
        ({"algorithms": ["RS256", "RS256"]}, "algorithms"),
        ({"algorithms": [256]}, "algorithms"),
        ({"algorithms": DROP}, "algorithms"),
        ({"jwks_file": "/etc/jwks.json"}, "jwks_file/jwks_url"),
        ({"jwks_url": DROP}, "jwks_file/jwks_url"),
        ({"jwks_url": "http://idp.example.test/jwks"}, "jwks_url"),
        ({"jwks_url": "https://u:p@idp.example.test/jwks"}, "jwks_url"),
        ({"jwks_url": "https://idp.example.test/a b"}, "jwks_url"),
        ({"jwks_url": "https://idp.example.test:x/jwks"}, "jwks_url"),
        ({"jwks_url": "file:///etc/jwks.json"}, "jwks_url"),
        ({"jwks_url": DROP, "jwks_file": ""}, "jwks_file"),
        ({"jwks_url": DROP, "jwks_file": 7}, "jwks_file"),
        ({"leeway_seconds": 301}, "leeway_seconds"),
        ({"leeway_seconds": -1}, "leeway_seconds"),
        ({"leeway_seconds": "60"}, "leeway_seconds"),
        ({"leeway_seconds": True}, "leeway_seconds"),
        ({"leeway_seconds": 1.5}, "leeway_seconds"),
        ({"max_lifetime_seconds": 0}, "max_lifetime_seconds"),
        ({"max_lifetime_seconds": 86_401}, "max_lifetime_seconds"),
        ({"max_lifetime_seconds": 10**30}, "max_lifetime_seconds"),
        ({"refresh_seconds": 1}, "refresh_seconds"),
        ({"refresh_seconds": 3600, "max_key_age_seconds": 3600}, "refresh_seconds"),
        ({"max_key_age_seconds": 30}, "max_key_age_seconds"),
        ({"display_claims": []}, "display_claims"),
        ({"display_claims": ["email", 7]}, "display_claims"),
        ({"display_claims": ["a b"]}, "display_claims"),
        ({"groups_claim": ""}, "groups_claim"),
        ({"jku": "https://evil.example/jwks"}, "jku"),
    ],
    ids=repr,
)
def test_bad_oidc_issuer_entry_names_the_entry_and_key(change: dict[str, object], key: str) -> None:
    entry = {name: value for name, value in (_GOOD_ENTRY | change).items() if value is not DROP}

    with pytest.raises(ConfigurationError) as info:
        parse_oidc_issuers([_GOOD_ENTRY, entry])

    assert ("oidc_issuer[1]" in info.value.detail, key in info.value.detail) == (True, True)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"issuer": "https://idp.example.test"}, "array of tables"),
        ("https://idp.example.test", "array of tables"),
        (["https://idp.example.test"], "oidc_issuer[0] must be a table"),
        ([_GOOD_ENTRY, _GOOD_ENTRY], "already configured by oidc_issuer[0]"),
    ],
    ids=["table-not-array", "string", "entry-string", "duplicate-issuer"],
)
def test_bad_oidc_issuer_section_is_refused(entries: object, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_oidc_issuers(entries)

    assert expected in info.value.detail


@pytest.mark.parametrize(
    "change",
    [
        {"issuer": None},
        {"audience": None},
        {"algorithms": 7},
        {"algorithms": "RS256"},
        {"leeway": 30},
        {"groups_claim": None},
    ],
    ids=repr,
)
def test_direct_construction_with_wrong_types_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        config_a(**change)


def test_naive_fetch_time_is_a_programming_error(verifier: OidcVerifier) -> None:
    with pytest.raises(TypeError):
        verifier.install_keys(ISS_A, key_set(RS_A), fetched_at=NOW.replace(tzinfo=None))


def test_hmac_algorithm_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_oidc_issuers([_GOOD_ENTRY | {"algorithms": ["RS256", "HS256"]}])

    assert "HMAC" in info.value.detail
