"""The OpenAPI document (broker/http/openapi.py): a valid OpenAPI 3.1 document, and response
schemas true to the functions the routes build their bodies with.

The live broker is checked against the same document by schemathesis
(tests/integration/test_openapi.py); here each body-building function gets real domain
objects, in each variant, and its result must validate against the typed dict the document
generates its schema from (unknown keys refused)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema_rs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from pydantic import TypeAdapter, ValidationError
from schemathesis.specs.openapi.definitions import OPENAPI_31

from broker.core.approvals import Approval, ApprovalSubject, Verdict
from broker.core.authn import CallerAuthenticator
from broker.core.bundle import TrustStore
from broker.core.jwtsvid import JwtSvidVerifier
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Quarantine,
    QuarantineKind,
    RunState,
    Sensitivity,
    Target,
    TargetKind,
    WorkflowRun,
    check_id,
)
from broker.core.ports import CheckResult
from broker.core.roles import RoleMap
from broker.core.x509svid import TrustStoreX509Authenticator
from broker.errors import (
    ApprovalPendingError,
    BadRequestError,
    IdempotentReplayError,
    PolicyDeniedError,
    TaskleaseError,
)
from broker.http import responses
from broker.http.app import create_app
from broker.http.approval_routes import (
    APPROVALS_CLOCK_KEY,
    approval_json,
    approval_pending_response,
)
from broker.http.openapi import OPERATIONS, build_openapi
from broker.http.problems import problem_response
from broker.http.query_routes import target_json
from broker.http.revocation_routes import credential_json, report_json
from broker.http.wire import ID_PATTERN, lease_json, quarantine_json, run_json
from broker.revocation import LeaseResult, RevocationReport, SettleOutcome
from broker.service import Readiness

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
ORCH = "spiffe://tasklease.test/orchestrator/demo"
CHAIN = DelegationChain(
    (
        DelegationHop("owner", "alice@example.test", verified=False),
        DelegationHop("orchestrator", ORCH, verified=True),
        DelegationHop("agent", AGENT, verified=True),
    )
)


def _valid(shape: Any, body: object) -> None:
    """``body`` as JSON on the wire validates against ``shape``."""
    TypeAdapter(shape).validate_json(json.dumps(body))


class _Clock:
    def now(self) -> datetime:
        return NOW


def _run(**changes: Any) -> WorkflowRun:
    fields: dict[str, Any] = {
        "id": "wf-1",
        "owner": "alice@example.test",
        "purpose": "nightly OPS-1234",
        "started_by": ORCH,
        "created_at": NOW,
        "deadline": NOW + timedelta(hours=1),
        "labels": {"ticket": "OPS-1234"},
        "participants": ("spiffe://tasklease.test/agent/*",),
    }
    fields.update(changes)
    return WorkflowRun(**fields)


def _lease(**changes: Any) -> Lease:
    fields: dict[str, Any] = {
        "credential_id": "cred_0123456789abcdef01234567",
        "workflow_id": "wf-1",
        "task_id": "t-1",
        "target": "demo-db",
        "kind": TargetKind.DATABASE,
        "sensitivity": Sensitivity.INTERNAL,
        "holder": AGENT,
        "owner": "alice@example.test",
        "chain": CHAIN,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(minutes=5),
        "state": LeaseState.ACTIVE,
        "token_accessor": "acc-1",
    }
    fields.update(changes)
    return Lease(**fields)


def _approval() -> Approval:
    return Approval.open(
        subject=ApprovalSubject(
            workflow_id="wf-1",
            task_id="t-1",
            target="prod-db",
            ttl_seconds=300,
            holder=AGENT,
            params={"public_key": "ssh-ed25519 AAAA"},
        ),
        owner="alice@example.test",
        chain=CHAIN,
        now=NOW,
        validity=timedelta(hours=1),
        policy_ids=("restricted-needs-approval",),
        reasons=("restricted targets need an approval",),
    )


# ----------------------------------------------------------------------------- the document


def test_the_document_is_valid_openapi_3_1() -> None:
    """It validates against the OpenAPI 3.1 schema, and each component is a valid JSON Schema
    (2020-12)."""
    document = build_openapi()
    assert document["openapi"] == "3.1.0"
    jsonschema_rs.validator_for(OPENAPI_31).validate(document)
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_the_document_is_plain_json() -> None:
    """What is served is what is built: it survives a JSON round trip unchanged."""
    document = build_openapi()
    assert json.loads(json.dumps(document)) == document


def test_operation_ids_are_unique_and_routes_are_listed_once() -> None:
    """One operation per method and path, each with its own operationId."""
    assert len({op.operation_id for op in OPERATIONS}) == len(OPERATIONS)
    assert len({(op.method, op.path) for op in OPERATIONS}) == len(OPERATIONS)


def test_every_authenticated_operation_documents_401_and_403_as_problems() -> None:
    """Routes that need an identity document 401 and 403 with problem+json; public ones
    declare no security."""
    document = build_openapi()
    problems = document["components"]["responses"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if operation.get("security") == []:
                assert "401" not in operation["responses"], (method, path)
                continue
            for status in ("401", "403"):
                ref = operation["responses"][status]["$ref"].rsplit("/", 1)[-1]
                assert "application/problem+json" in problems[ref]["content"], (method, path)


def test_the_problem_code_lists_every_error_class_but_the_202() -> None:
    """The documented ``code`` values are exactly those of the error tree, less
    approval_pending (answered as 202 JSON)."""
    codes: set[str] = set()
    pending = [TaskleaseError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        codes.add(cls.code)
    assert set(responses.problem_codes()) == codes - {"approval_pending"}


@pytest.mark.parametrize(
    "value",
    ["wf-1", "A.b:c_d-e", "x" * 128, "x" * 129, "-x", ".x", "x y", "x/y", "ü", "x\n", ""],
)
def test_the_identifier_pattern_is_the_domains(value: str) -> None:
    """The pattern the document gives identifiers accepts what check_id accepts."""
    try:
        check_id(value, "workflow id")
        accepted = True
    except BadRequestError:
        accepted = False
    assert accepted == (re.fullmatch(ID_PATTERN.strip("^$"), value) is not None)


# ----------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "run",
    [
        _run(),
        _run(state=RunState.COMPLETED, ended_at=NOW + timedelta(minutes=1), outcome="completed"),
    ],
)
def test_run_json_is_a_run_view(run: WorkflowRun) -> None:
    """An active and an ended run."""
    _valid(responses.RunView, run_json(run))
    _valid(responses.RunWithCredentials, {**run_json(run), "credentials": [lease_json(_lease())]})


@pytest.mark.parametrize(
    "lease",
    [
        _lease(),
        _lease(state=LeaseState.ISSUING, token_accessor="", approval_id="apr_" + "0" * 24),
        _lease(
            state=LeaseState.REVOKED,
            revoke_reason="run_completed",
            revoked_at=NOW + timedelta(minutes=1),
            attempts=1,
        ),
        _lease(state=LeaseState.REVOKE_FAILED, attempts=8, last_error="vault sealed"),
    ],
)
def test_lease_and_credential_json_are_views(lease: Lease) -> None:
    """A lease in each state, as metadata and with its revocation progress."""
    _valid(responses.LeaseView, lease_json(lease))
    _valid(responses.CredentialView, credential_json(lease))


def test_an_issued_credential_is_an_issued_credential_view() -> None:
    """The 201 body: the lease, the TTL, the policy ids, the secret (and, when not revocable,
    the note) — assembled as request_credential does."""
    lease = _lease(kind=TargetKind.SSH, revocable=False)
    body = {
        **lease_json(lease),
        "ttl_seconds": 300,
        "policy_ids": ["agent-request"],
        "secret": {"signed_key": "ssh-ed25519-cert-v01 AAAA", "serial_number": "1"},
        "note": "this credential cannot be revoked early",
    }
    _valid(responses.IssuedCredential, body)
    with pytest.raises(ValidationError):
        _valid(responses.IssuedCredential, {**body, "surprise": 1})


def test_revocation_reports_are_report_views() -> None:
    """Confirmed and still-live entries, with and without the lease."""
    report = RevocationReport(
        results=(
            LeaseResult(
                "cred_a",
                SettleOutcome.REVOKED,
                _lease(
                    credential_id="cred_a",
                    state=LeaseState.REVOKED,
                    revoke_reason="released",
                    revoked_at=NOW,
                ),
            ),
            LeaseResult("cred_b", SettleOutcome.EXPIRED, None),
            LeaseResult(
                "cred_c",
                SettleOutcome.RETRYING,
                _lease(credential_id="cred_c", state=LeaseState.REVOKING, attempts=2),
                detail="OpenBao answered 503",
                next_attempt_at=NOW + timedelta(seconds=4),
            ),
            LeaseResult("cred_d", SettleOutcome.MISSING, None, detail="no such lease"),
            LeaseResult(
                "cred_e",
                SettleOutcome.NOT_REVOCABLE,
                _lease(credential_id="cred_e", kind=TargetKind.SSH, revocable=False),
            ),
        ),
        truncated=True,
    )
    body = report_json(report)
    assert body["counts"] == {"confirmed_revoked": 2, "still_live": 3}
    _valid(responses.RevocationReport, body)
    _valid(responses.CompletionReport, {"workflow": run_json(_run()), "report": body})
    _valid(responses.CompletionScheduled, {"workflow": run_json(_run()), "scheduled": ["cred_a"]})


def test_quarantines_and_targets_are_views() -> None:
    """A quarantine and a target, as listed."""
    quarantine = Quarantine(
        kind=QuarantineKind.IDENTITY_PREFIX,
        value="spiffe://tasklease.test/agent/",
        reason="incident INC-7",
        created_by="spiffe://tasklease.test/admin/demo",
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )
    _valid(responses.QuarantineList, {"quarantines": [quarantine_json(quarantine)]})
    target = Target(
        name="demo-db",
        kind=TargetKind.DATABASE,
        policies=("demo-db",),
        system="postgres",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(hours=1),
        mount="database",
        role="demo-readonly",
        description="the demo database",
    )
    _valid(responses.TargetList, {"targets": [target_json(target)]})


def test_approvals_are_approval_views() -> None:
    """Pending, decided and withdrawn, with their links — through approval_json."""
    app = web.Application()
    app[APPROVALS_CLOCK_KEY] = _Clock()
    request = make_mocked_request("GET", "/v1/approvals", app=app)
    pending = _approval()
    decided = pending.decide(
        approver="oidc:https://idp.test#bob",
        display="bob@example.test",
        verdict=Verdict.APPROVE,
        now=NOW,
        comment="checked OPS-1234",
    )
    withdrawn = decided.withdraw(by=AGENT, now=NOW, comment="not needed")
    views = [approval_json(a, request) for a in (pending, decided, withdrawn)]
    _valid(responses.ApprovalList, {"approvals": views})


def test_the_approval_pending_answer_is_an_approval_pending_view() -> None:
    """The 202 of POST /v1/credentials, with Location, Retry-After and no-store."""
    approval = _approval()
    response = approval_pending_response(
        ApprovalPendingError(
            "waiting for an approver",
            approval_id=approval.id,
            state="pending",
            quorum=1,
            approver_count=0,
            expires_at=approval.expires_at.isoformat(),
            policy_ids=["restricted-needs-approval"],
            reused=False,
        )
    )
    assert response.status == 202
    assert response.text is not None
    _valid(responses.ApprovalPending, json.loads(response.text))
    assert response.headers["Location"] == f"/v1/approvals/{approval.id}"
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    "error",
    [
        PolicyDeniedError("denied", policy_ids=["production-needs-ticket"]),
        IdempotentReplayError("cred_0123456789abcdef01234567"),
    ],
)
def test_problems_are_problem_views(error: TaskleaseError) -> None:
    """A problem with the extra members a client can act on."""
    response = problem_response(
        status=error.status,
        code=error.code,
        title=error.title,
        detail=error.detail,
        reason=error.reason,
        request_id="r-1",
        extra=error.extra(),
    )
    assert response.text is not None
    body: Mapping[str, Any] = json.loads(response.text)
    _valid(responses.Problem, body)
    assert body["code"] in responses.problem_codes()


class _Check:
    def __init__(self, name: str, ok: bool, *, alarm: bool = False) -> None:
        self.name = name
        self._result = CheckResult(name, ok=ok, detail="fine" if ok else "down", alarm=alarm)

    async def check(self, now: datetime) -> CheckResult:
        return self._result


def _no_auth() -> CallerAuthenticator:
    """Trusts nothing: these requests only touch public paths."""
    store = TrustStore()
    return CallerAuthenticator(
        x509_svids=TrustStoreX509Authenticator(trust_store=store),
        jwt_svids=JwtSvidVerifier(audience="tasklease", trust_store=store),
        oidc=None,
        roles=RoleMap((), ()),
    )


@pytest.mark.parametrize("ok", [True, False])
async def test_healthz_and_readyz_answer_their_views(ok: bool) -> None:
    """GET /healthz, and GET /readyz ready (200) and not (503, with an alarm)."""
    readiness = Readiness(
        checks=[_Check("redis", ok=True), _Check("policy", ok=ok, alarm=not ok)],
        clock=_Clock(),
        timeout_seconds=1,
    )
    app = create_app(readiness=readiness, authenticator=_no_auth(), now=_Clock().now)
    async with TestClient(TestServer(app)) as client:
        health = await client.get("/healthz")
        _valid(responses.Health, await health.json())
        ready = await client.get("/readyz")
        assert ready.status == (200 if ok else 503)
        _valid(responses.Readiness, await ready.json())
