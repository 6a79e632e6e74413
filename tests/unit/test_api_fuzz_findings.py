"""What the schemathesis run against the live broker found (tests/integration/test_openapi.py),
and what writing the document against the routes found, pinned here as fast regressions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict
from pydantic import ValidationError

from broker.adapters.config_files import load_policy_engine, load_target_catalog
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.memory_ledger import InMemoryLedger
from broker.core.authn import Caller, CallerAuthenticator
from broker.core.bundle import TrustStore
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.model import QuarantineKind
from broker.core.ports import MintedCredential, MintSpec, RevokeOutcome
from broker.core.roles import Role, RoleMap
from broker.core.spiffe_id import SpiffeId
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.errors import BadRequestError, VaultUnavailableError
from broker.http.app import create_app
from broker.http.problems import problem_middleware
from broker.http.query_routes import _selector
from broker.http.wire import StartWorkflowBody
from broker.service import CredentialBroker, Readiness

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ADMIN = Caller(
    WorkloadIdentity(
        SpiffeId.parse("spiffe://tasklease.test/admin/demo"),
        NOW + timedelta(hours=1),
        AuthMethod.X509_SVID,
    ),
    frozenset({Role.ADMIN}),
)


class _Clock:
    def now(self) -> datetime:
        return NOW


class _NoMinter:
    async def mint(self, spec: MintSpec) -> MintedCredential:
        raise AssertionError("nothing is minted here")

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        raise AssertionError("nothing is revoked here")


def _broker(audit: MemoryAuditTrail) -> CredentialBroker:
    ledger = InMemoryLedger()
    return CredentialBroker(
        policy=load_policy_engine(Path("config/policies")),
        minter=_NoMinter(),
        ledger=ledger,
        targets=load_target_catalog(Path("config/targets.toml")),
        clock=_Clock(),
        quarantines=ledger,
        audit=audit,
    )


def _no_auth() -> CallerAuthenticator:
    """Trusts nothing: the request below goes to a public path."""
    store = TrustStore()
    return CallerAuthenticator(
        x509_svids=TrustStoreX509Authenticator(trust_store=store),
        jwt_svids=JwtSvidVerifier(audience="tasklease", trust_store=store),
        oidc=None,
        roles=RoleMap((), ()),
    )


async def test_a_405_problem_lists_the_allowed_methods() -> None:
    """RFC 9110 §15.5.6: a 405 carries Allow; the problem+json answer kept aiohttp's."""
    app = create_app(
        readiness=Readiness(checks=[], clock=_Clock(), timeout_seconds=1),
        authenticator=_no_auth(),
        now=_Clock().now,
    )
    async with TestClient(TestServer(app)) as client:
        response = await client.request("TRACE", "/healthz")
        assert response.status == 405
        assert response.content_type == "application/problem+json"
        assert "GET" in response.headers["Allow"].split(",")


async def test_a_503_problem_says_when_to_ask_again_and_a_refusal_does_not() -> None:
    """An unavailable dependency (nothing handed out) is worth a retry: Retry-After says when;
    a refusal is final and says nothing of the kind."""

    async def unavailable(_: web.Request) -> web.Response:
        raise VaultUnavailableError("OpenBao is sealed", reason="vault.sealed")

    async def refused(_: web.Request) -> web.Response:
        raise BadRequestError("no", reason="request.invalid")

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/down", unavailable)
    app.router.add_get("/no", refused)
    async with TestClient(TestServer(app)) as client:
        down = await client.get("/down")
        assert (down.status, down.headers["Retry-After"]) == (503, "1")
        assert (await down.json())["reason"] == "vault.sealed"
        no = await client.get("/no")
        assert no.status == 400
        assert "Retry-After" not in no.headers


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (QuarantineKind.WORKFLOW, "wf 1"),
        (QuarantineKind.WORKFLOW, "w" * 2048),
        (QuarantineKind.WORKFLOW, "wf/1"),
        (QuarantineKind.TARGET, "demo db"),
        (QuarantineKind.TARGET, "-demo-db"),
    ],
)
async def test_a_run_or_target_quarantine_names_an_identifier(
    kind: QuarantineKind, value: str
) -> None:
    """A value that cannot be a run id or a target name would block nothing (and named a
    per-run audit stream after arbitrary text): 400, nothing stored or audited."""
    audit = MemoryAuditTrail()
    broker = _broker(audit)
    with pytest.raises(BadRequestError) as refused:
        await broker.set_quarantine(ADMIN, kind=kind, value=value, reason="INC-1", ttl=timedelta(1))
    assert refused.value.reason == f"invalid.quarantined_{kind.value}"
    assert await broker.list_quarantines(ADMIN) == []
    assert audit.events == []


async def test_a_run_quarantine_with_a_run_id_is_set() -> None:
    """The identifier-shaped value is accepted as before."""
    broker = _broker(MemoryAuditTrail())
    set_ = await broker.set_quarantine(
        ADMIN, kind=QuarantineKind.WORKFLOW, value="wf-1", reason="INC-1", ttl=timedelta(1)
    )
    assert [q.value for q in await broker.list_quarantines(ADMIN)] == [set_.value]


@pytest.mark.parametrize("value", ["yes", "", "TRUE1", "on"])
def test_the_all_flag_of_the_lease_query_is_true_or_false(value: str) -> None:
    """``all`` other than true/false/1/0 is a 400, not silently false (found reading the
    document's boolean against the route)."""
    with pytest.raises(BadRequestError) as refused:
        _selector(MultiDict({"owner": "alice@example.test", "all": value}))
    assert refused.value.reason == "query.invalid"


@pytest.mark.parametrize(("value", "everything"), [("true", True), ("1", True), ("false", False)])
def test_the_all_flag_still_reads_true_and_false(value: str, everything: bool) -> None:
    """The documented values keep their meaning."""
    selector, _ = _selector(
        MultiDict({"all": value} if everything else {"owner": "a", "all": value})
    )
    assert selector.everything is everything


@pytest.mark.parametrize(
    "deadline", ["1893456000", 1893456000, "2030-01-01T00:00:00", "2030-01-01", "tomorrow"]
)
def test_a_deadline_is_an_rfc3339_time_with_its_offset(deadline: object) -> None:
    """pydantic alone takes a Unix time (or digits in a string) and naive times; the API
    documents RFC 3339 with an offset, and that is all it accepts."""
    body = {"id": "wf-1", "owner": "o", "purpose": "p", "deadline": deadline}
    with pytest.raises(ValidationError):
        StartWorkflowBody.model_validate_json(json.dumps(body))
    body["deadline"] = "2030-01-01T00:00:00+02:00"
    parsed = StartWorkflowBody.model_validate_json(json.dumps(body))
    assert parsed.deadline == datetime(2030, 1, 1, tzinfo=UTC) - timedelta(hours=2)
