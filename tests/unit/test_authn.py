"""CallerAuthenticator: exactly one identity per request, mapped to roles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509

from broker.core.authn import MAX_AUTHORIZATION_CHARS, Caller, CallerAuthenticator
from broker.core.identity import AuthMethod, HumanIdentity, WorkloadIdentity
from broker.core.roles import Role, parse_role_map
from broker.core.spiffe_id import SpiffeId
from broker.errors import AuthenticationError, ForbiddenError
from tests.pki import make_root

NOW = datetime(2030, 1, 1, tzinfo=UTC)
AGENT = "spiffe://a.test/agents/x"
ROLES = parse_role_map(
    {
        "workload": [{"pattern": "spiffe://a.test/agents/*", "roles": ["agent"]}],
        "human": [
            {"issuer": "https://idp.test", "claim": "groups", "value": "sec", "roles": ["admin"]}
        ],
    }
)


class FakeX509:
    def __init__(self, spiffe_id: str = AGENT) -> None:
        self.spiffe_id = spiffe_id
        self.calls = 0

    def authenticate(self, chain: Sequence[x509.Certificate], *, now: datetime) -> WorkloadIdentity:
        self.calls += 1
        return WorkloadIdentity(SpiffeId.parse(self.spiffe_id), now, AuthMethod.X509_SVID)


class FakeJwt:
    def __init__(self, spiffe_id: str = AGENT) -> None:
        self.spiffe_id = spiffe_id
        self.tokens: list[str] = []

    def verify(self, token: str, *, now: datetime) -> WorkloadIdentity:
        self.tokens.append(token)
        return WorkloadIdentity(SpiffeId.parse(self.spiffe_id), now, AuthMethod.JWT_SVID)


class FakeOidc:
    def __init__(self, groups: list[str]) -> None:
        self.groups = groups

    def issuer_of(self, token: str) -> str | None:
        return "https://idp.test" if token.startswith("oidc") else None

    def verify(self, token: str, *, now: datetime) -> tuple[HumanIdentity, Mapping[str, Any]]:
        human = HumanIdentity("https://idp.test", "u-1", "alice@x.test", now)
        return human, {"groups": self.groups}


def authenticator(
    *, x509_id: str = AGENT, jwt_id: str = AGENT, groups: list[str] | None = None
) -> CallerAuthenticator:
    return CallerAuthenticator(
        x509_svids=FakeX509(x509_id),
        jwt_svids=FakeJwt(jwt_id),
        oidc=FakeOidc(groups or ["sec"]),
        roles=ROLES,
    )


CHAIN = [make_root("a.test").cert]


def test_mtls_peer_is_a_workload_caller_with_its_roles() -> None:
    caller = authenticator().authenticate(peer_chain=CHAIN, authorization=None, now=NOW)
    assert caller == Caller(
        WorkloadIdentity(SpiffeId.parse(AGENT), NOW, AuthMethod.X509_SVID), frozenset({Role.AGENT})
    )
    assert (caller.principal_id, caller.is_workload) == (AGENT, True)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive_and_routes_jwt_svids(scheme: str) -> None:
    caller = authenticator().authenticate(peer_chain=[], authorization=f"{scheme} a.b.c", now=NOW)
    assert caller.principal_id == AGENT


def test_an_oidc_token_is_a_human_caller() -> None:
    caller = authenticator().authenticate(peer_chain=[], authorization="Bearer oidc.x.y", now=NOW)
    assert (caller.principal_id, caller.roles, caller.is_workload) == (
        "oidc:https://idp.test#u-1",
        frozenset({Role.ADMIN}),
        False,
    )


@pytest.mark.parametrize(
    ("chain", "authorization", "reason"),
    [
        (CHAIN, "Bearer a.b.c", "auth.ambiguous"),
        ([], None, "auth.missing"),
        ([], "Basic dXNlcg==", "auth.bad_authorization_header"),
        ([], "Bearer", "auth.bad_authorization_header"),
        ([], "Bearer  a.b.c", "auth.bad_authorization_header"),
        ([], "Bearer a.b.c\r\nX-Evil: 1", "auth.bad_authorization_header"),
        ([], "Bearer " + "a" * MAX_AUTHORIZATION_CHARS, "auth.header_too_large"),
    ],
)
def test_bad_presentations_are_401(
    chain: list[x509.Certificate], authorization: str | None, reason: str
) -> None:
    with pytest.raises(AuthenticationError) as caught:
        authenticator().authenticate(peer_chain=chain, authorization=authorization, now=NOW)
    assert caught.value.reason == reason
    assert "\n" not in caught.value.detail


@pytest.mark.parametrize(
    ("kwargs", "authorization", "chain"),
    [
        ({"x509_id": "spiffe://a.test/other/x"}, None, CHAIN),
        ({"jwt_id": "spiffe://b.test/agents/x"}, "Bearer a.b.c", []),
        ({"groups": ["dev"]}, "Bearer oidc.x.y", []),
    ],
)
def test_an_identity_without_a_role_is_403(
    kwargs: dict[str, Any], authorization: str | None, chain: list[x509.Certificate]
) -> None:
    with pytest.raises(ForbiddenError) as caught:
        authenticator(**kwargs).authenticate(peer_chain=chain, authorization=authorization, now=NOW)
    assert caught.value.reason == "auth.no_role"


def test_has_any() -> None:
    caller = Caller(HumanIdentity("https://idp.test", "u", "d", NOW), frozenset({Role.ADMIN}))
    assert (caller.has_any([Role.ADMIN, Role.AGENT]), caller.has_any([Role.AGENT])) == (True, False)
