"""The OpenAPI 3.1 document of the broker's HTTP API, generated from the wire models.

Request bodies come from the pydantic wire models the routes parse with
(``model_json_schema`` through :meth:`pydantic.TypeAdapter.json_schemas`), response bodies
from the typed dicts in :mod:`broker.http.responses`, errors are RFC 9457
``application/problem+json`` with the stable ``code`` of :mod:`broker.errors` and a finer
``reason``. :data:`OPERATIONS` is the table of every route the broker serves, with the roles
that may call it, its parameters and its answers; a test compares it with the routes the
running broker has registered, both ways, and schemathesis checks the live broker against it.

``GET /v1/openapi.json`` is served **without authentication**, like ``/healthz``, ``/readyz``
and ``/metrics`` (``broker.http.auth.PUBLIC_PATHS``): a client generator or a fuzzer should not
need a role to read the contract, and the document holds nothing but what the README already
says — no target, policy, identity or configuration of this broker.

Security schemes: ``svid`` (mutual TLS with an X.509-SVID; OpenAPI 3.1 ``mutualTLS``) or
``bearer`` (``Authorization: Bearer`` with a JWT-SVID, or an OIDC ID token from a configured
issuer). Exactly one per request: both at once is refused as ambiguous.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from broker import __version__
from broker.core.approvals import APPROVAL_ID, ApprovalStatus
from broker.core.audit import MAX_PAGE, EventType
from broker.core.model import LeaseState, RunState, Sensitivity
from broker.core.roles import Role
from broker.http import responses
from broker.http.approval_routes import DecisionBody, WithdrawBody
from broker.http.audit_routes import ReportEventBody
from broker.http.problems import PROBLEM_JSON
from broker.http.query_routes import RUN_CURSOR_PATTERN
from broker.http.revocation_routes import CompleteWorkflowBody, ForceRevocationBody
from broker.http.wire import (
    ID_PATTERN,
    MAX_BODY,
    CredentialRequestBody,
    LiftQuarantineBody,
    QuarantineBody,
    StartWorkflowBody,
)

OPENAPI_PATH: Final = "/v1/openapi.json"
OPENAPI_VERSION: Final = "3.1.0"
_REF = "#/components/schemas/{model}"
_JSON = "application/json"
_PROMETHEUS_TEXT = "text/plain"

Shape = type[BaseModel] | type[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented response: what it means, its body's shape and media type, its headers."""

    description: str
    shape: Shape | None = None
    media_type: str = _JSON
    # Headers always sent with it: name → (description, JSON Schema of the value).
    headers: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: method, path template (aiohttp's and OpenAPI's syntax agree), who may call
    it (``roles`` None: public, no authentication), parameters, body and answers."""

    method: Literal["get", "post", "delete"]
    path: str
    operation_id: str
    summary: str
    tag: str
    roles: tuple[Role, ...] | None
    answers: Mapping[int, Answer]
    # Problem statuses this route can answer beyond 401/403 (every authenticated route).
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True
    parameters: Sequence[Mapping[str, Any]] = ()
    description: str = ""


# aiohttp's HTTP parser refuses longer request lines and headers itself (its default limit).
MAX_LINE: Final = 8190
_HTTP_LAYER: Final = {"text/plain": {"schema": {"type": "string"}}}

# Problem answers shared by many routes (components.responses).
_PROBLEMS: Final[Mapping[int, tuple[str, str]]] = {
    400: (
        "BadRequest",
        "The body, a query parameter or an identifier is invalid (``body.invalid``, "
        "``body.too_large``, ``query.invalid``, ``invalid.<field>``); nothing was done. A "
        f"request line or header longer than {MAX_LINE} bytes is refused before the API by "
        "the HTTP layer (aiohttp), in ``text/plain``.",
    ),
    401: (
        "Unauthenticated",
        "No identity, two at once, or one that failed verification; ``reason`` says which "
        "check (e.g. ``x509.leaf_is_ca``, ``jwt.aud_mismatch``, ``trust_domain.untrusted``, "
        "``bundle.stale``).",
    ),
    403: (
        "Forbidden",
        "Authenticated but not allowed: no role (``auth.no_role``), another role needed "
        "(``auth.role_required``), the policy (``policy.deny``, with ``policy_ids``), a "
        "quarantine (``quarantine.active``), or an approval refused (``approval.*``).",
    ),
    404: (
        "NotFound",
        "No such resource, or the caller may not know it exists (``workflow.not_found``, "
        "``target.unknown``, ``approval.not_found``, …).",
    ),
    409: (
        "Conflict",
        "The request conflicts with the current state (``workflow.not_active``, "
        "``idempotency.replayed`` with ``credential_id``, ``approval.expired``, "
        "``approval.used``, …).",
    ),
    413: (
        "PayloadTooLarge",
        f"A body larger than {MAX_BODY} bytes sent without ``Content-Length`` (``http_413``); "
        "with it, the answer is 400 ``body.too_large``.",
    ),
    429: (
        "LimitExceeded",
        "The caller holds as many live credentials as it may (``limit.live_per_identity``, "
        "``limit.live_per_target``) or was issued them faster than it may "
        "(``limit.rate_per_identity``), or started runs faster than it may "
        "(``limit.runs_per_identity``), with ``limit`` and ``retry_after_seconds``; nothing "
        "was issued or started. ``Retry-After`` says when a slot frees by itself; releasing a "
        "live credential frees one at once.",
    ),
    503: (
        "Unavailable",
        "A dependency is unavailable (``ledger_unavailable``, ``vault_unavailable``, "
        "``audit_unavailable``, ``bundle_unavailable``); nothing was issued. ``Retry-After`` "
        "says how many seconds to wait before asking again.",
    ),
}
_WITH_BODY = (400, 413)


def _path_id(name: str, what: str, pattern: str) -> dict[str, Any]:
    # A value of another shape is refused with 400 before any lookup.
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": what,
        "schema": {"type": "string", "pattern": pattern},
    }


_WORKFLOW_ID = _path_id("workflow_id", "The run's id.", ID_PATTERN)
_CREDENTIAL_ID = _path_id("credential_id", "The credential's id.", ID_PATTERN)
_APPROVAL_ID = _path_id("approval_id", "The approval's id.", f"^{APPROVAL_ID.pattern}$")


def _states_query(states: str, what: str) -> dict[str, Any]:
    """``state``: a comma-separated list of ``states`` (``a|b|c``)."""
    pattern = f"^({states})(,({states}))*$"
    return _query(
        "state",
        {"type": "string", "pattern": pattern},
        f"Only {what} in these states (comma-separated).",
    )


def _limit_query(maximum: int, what: str) -> dict[str, Any]:
    """``limit``: 1 to ``maximum``, 100 by default."""
    return _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": maximum, "default": 100},
        f"At most this many {what}.",
    )


def _query(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": dict(schema),
    }


def _text(max_length: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length}


def _enum(values: Sequence[str], default: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "enum": list(values)}
    if default is not None:
        schema["default"] = default
    return schema


_BOOLEAN = {"type": "string", "enum": ["true", "false", "1", "0"], "default": "false"}
_LEASE_STATES = "|".join(s.value for s in LeaseState)
_RUN_STATES = "|".join(s.value for s in RunState)
_EVENT_TYPES = [t.value for t in EventType]
_REPORT = Answer(
    "Every addressed credential is confirmed revoked (``complete: true``).",
    responses.RevocationReport,
)
_REPORT_PARTIAL = Answer(
    "At least one credential is still live (listed in ``still_live`` with the reason; the "
    "broker keeps retrying). Not a success: look at ``complete``.",
    responses.RevocationReport,
)
_AUTHENTICATED: Final = (401, 403)

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "get",
        "/healthz",
        "healthz",
        "Liveness",
        "health",
        None,
        {200: Answer("The process serves requests; no dependency is touched.", responses.Health)},
    ),
    Operation(
        "get",
        "/readyz",
        "readyz",
        "Readiness",
        "health",
        None,
        {
            200: Answer(
                "Ready: Redis durable, OpenBao unsealed with a valid session, trust "
                "bundles fresh, policy and audit trail working.",
                responses.Readiness,
            ),
            503: Answer("Not ready; each failing check says why.", responses.Readiness),
        },
    ),
    Operation(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics",
        "health",
        None,
        {
            200: Answer(
                "The Prometheus text format (prometheus-client).", media_type=_PROMETHEUS_TEXT
            )
        },
    ),
    Operation(
        "get",
        OPENAPI_PATH,
        "openapi",
        "This document",
        "health",
        None,
        {200: Answer("The OpenAPI 3.1 document of this API.", media_type=_JSON)},
    ),
    Operation(
        "get",
        "/v1/whoami",
        "whoami",
        "The caller's verified identity and roles",
        "identity",
        tuple(Role),
        {200: Answer("The caller as the broker verified it.", responses.WhoAmI)},
    ),
    Operation(
        "post",
        "/v1/workflows",
        "startWorkflow",
        "Start a workflow run",
        "workflows",
        (Role.ORCHESTRATOR,),
        {201: Answer("The run, active.", responses.RunView)},
        errors=(*_WITH_BODY, 409, 429, 503),
        body=StartWorkflowBody,
        description="Give exactly one of ``deadline`` (RFC 3339 with an offset) and "
        "``ttl_seconds``. A run id names one run: an id the ledger holds answers 409 "
        "``workflow.exists``, the id of a purged run whose records the audit trail still keeps "
        "under it 409 ``workflow.id_retired``.",
    ),
    Operation(
        "get",
        "/v1/workflows",
        "listWorkflows",
        "List workflow runs",
        "workflows",
        (Role.ADMIN, Role.ORCHESTRATOR),
        {200: Answer("One page of runs, latest over first.", responses.RunList)},
        errors=(400, 503),
        parameters=(
            _query("owner", _text(256), "Only runs of this accountable owner."),
            _query("started_by", _text(2048), "Only runs this orchestrator started."),
            _states_query(_RUN_STATES, "runs"),
            {
                **_query(
                    "label",
                    {
                        "type": "array",
                        "items": {
                            "type": "string",
                            "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}=.{0,256}$",
                        },
                        "maxItems": 32,
                    },
                    "Only runs with this label (``key=value``); repeat it: all must match.",
                ),
                "style": "form",
                "explode": True,
            },
            _limit_query(500, "runs"),
            _query(
                "cursor",
                {"type": "string", "pattern": f"^{RUN_CURSOR_PATTERN}$"},
                "The previous page's ``next_cursor``.",
            ),
        ),
        description="Latest over first: by deadline, by end when a run ended earlier, or by "
        "the expiry of a credential that outlives both. An admin sees every run; an "
        "orchestrator only those it started (naming another ``started_by`` is a 403). A page "
        "reads a bounded stretch of the runs, so a selective filter may answer fewer runs "
        "than ``limit``, even none, with a ``next_cursor`` to go on from; ``null``: no more.",
    ),
    Operation(
        "get",
        "/v1/workflows/{workflow_id}",
        "getWorkflow",
        "A run and its credentials",
        "workflows",
        (Role.ORCHESTRATOR, Role.ADMIN),
        {200: Answer("The run and its credentials' metadata.", responses.RunWithCredentials)},
        errors=(400, 404, 503),
        parameters=(_WORKFLOW_ID,),
        description="For the run's orchestrator or an admin (404 for anyone else).",
    ),
    Operation(
        "post",
        "/v1/workflows/{workflow_id}/complete",
        "completeWorkflow",
        "End a run and revoke its credentials",
        "workflows",
        (Role.ORCHESTRATOR, Role.ADMIN),
        {
            200: Answer(
                "With ``wait=true``: every credential confirmed revoked.",
                responses.CompletionReport,
            ),
            202: Answer(
                "Without ``wait``: the run ended; its credentials are due now.",
                responses.CompletionScheduled,
            ),
            207: Answer(
                "With ``wait=true``: at least one credential is still live.",
                responses.CompletionReport,
            ),
        },
        errors=(*_WITH_BODY, 404, 409, 503),
        body=CompleteWorkflowBody,
        parameters=(
            _WORKFLOW_ID,
            _query("wait", _BOOLEAN, "Revoke inline and answer with the report."),
        ),
        description="Idempotent. For the run's orchestrator or an admin.",
    ),
    Operation(
        "post",
        "/v1/credentials",
        "requestCredential",
        "A credential for one task",
        "credentials",
        (Role.AGENT,),
        {
            201: Answer(
                "Issued: the secret, exactly once (``Cache-Control: no-store``).",
                responses.IssuedCredential,
                headers={
                    "Cache-Control": (
                        "The secret must not be cached.",
                        {"type": "string", "const": "no-store"},
                    )
                },
            ),
            202: Answer(
                "The request waits for an approval: poll ``Location``, then retry the "
                "same request with ``approval_id``.",
                responses.ApprovalPending,
                headers={
                    "Location": (
                        "The approval to poll.",
                        {"type": "string", "pattern": "^/v1/approvals/"},
                    ),
                    "Retry-After": (
                        "Seconds to wait before polling again.",
                        {"type": "string", "pattern": "^[0-9]+$"},
                    ),
                    "Cache-Control": ("Not to be cached.", {"type": "string", "const": "no-store"}),
                },
            ),
        },
        errors=(*_WITH_BODY, 404, 409, 429, 503),
        body=CredentialRequestBody,
        parameters=(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Per caller: a retried request with the same key never mints "
                "twice (409 ``idempotency.replayed``).",
                "schema": {"type": "string", "pattern": ID_PATTERN},
            },
        ),
    ),
    Operation(
        "get",
        "/v1/credentials/{credential_id}",
        "getCredential",
        "A credential's metadata and revocation progress",
        "credentials",
        tuple(Role),
        {200: Answer("The credential's metadata (never its secret).", responses.CredentialView)},
        errors=(400, 404, 503),
        parameters=(_CREDENTIAL_ID,),
        description="For its holder or an admin (404 for anyone else).",
    ),
    Operation(
        "delete",
        "/v1/credentials/{credential_id}",
        "releaseCredential",
        "Release a credential early",
        "credentials",
        tuple(Role),
        {200: _REPORT, 207: _REPORT_PARTIAL},
        errors=(400, 404, 503),
        parameters=(_CREDENTIAL_ID,),
        description="By its holder or an admin (404 for anyone else).",
    ),
    Operation(
        "post",
        "/v1/revocations",
        "forceRevocation",
        "Forced revocation by selector",
        "revocation",
        (Role.ADMIN,),
        {200: _REPORT, 207: _REPORT_PARTIAL},
        errors=(*_WITH_BODY, 503),
        body=ForceRevocationBody,
        description="Every given selector field must match; at least one, or ``everything: true``. "
        "Every matching live lease's task is tombstoned and the lease made due now "
        "(``scheduled`` counts them; an SSH certificate ends at its expiry instead); the "
        "first 10 000 are revoked inline and reported, and when more matched (``truncated``) "
        "the sweeper revokes the rest: one call reaches them all.",
    ),
    Operation(
        "post",
        "/v1/quarantines",
        "setQuarantine",
        "Block new issuance",
        "revocation",
        (Role.ADMIN,),
        {
            201: Answer(
                "The quarantine, in force until it expires or is lifted.", responses.QuarantineView
            )
        },
        errors=(*_WITH_BODY, 503),
        body=QuarantineBody,
    ),
    Operation(
        "get",
        "/v1/quarantines",
        "listQuarantines",
        "The quarantines in force",
        "revocation",
        (Role.ADMIN,),
        {200: Answer("The quarantines in force.", responses.QuarantineList)},
        errors=(503,),
    ),
    Operation(
        "delete",
        "/v1/quarantines",
        "liftQuarantine",
        "Lift a quarantine",
        "revocation",
        (Role.ADMIN,),
        {200: Answer("Lifted (also when there was none).", responses.QuarantineLifted)},
        errors=(*_WITH_BODY, 404, 503),
        body=LiftQuarantineBody,
    ),
    Operation(
        "get",
        "/v1/targets",
        "listTargets",
        "The target catalog",
        "queries",
        tuple(Role),
        {200: Answer("Every target, by name.", responses.TargetList)},
    ),
    Operation(
        "get",
        "/v1/leases",
        "listLeases",
        "Query the lease ledger",
        "queries",
        (Role.ADMIN,),
        {200: Answer("The leases that match, up to ``limit``.", responses.LeaseList)},
        errors=(400, 503),
        parameters=(
            *(
                _query(name, _text(2048), f"Only leases with this {name.replace('_', ' ')}.")
                for name in ("workflow_id", "task_id", "holder", "owner", "target")
            ),
            _query("holder_prefix", _text(2048), "Only leases whose holder starts so."),
            _query(
                "sensitivity",
                _enum([s.value for s in Sensitivity]),
                "Only leases of targets this sensitive.",
            ),
            _states_query(_LEASE_STATES, "leases"),
            _limit_query(1000, "leases"),
            _query("all", _BOOLEAN, "List every lease (when no filter is given)."),
        ),
        description="At least one filter, or ``all=true``; unknown parameters are refused.",
    ),
    Operation(
        "post",
        "/v1/events",
        "reportEvent",
        "Report a tool call or a side effect",
        "audit",
        (Role.AGENT, Role.ORCHESTRATOR),
        {201: Answer("The audit event recorded.", responses.ReportedEventView)},
        errors=(*_WITH_BODY, 404, 503),
        body=ReportEventBody,
        description="``type`` is ``agent.tool_call`` (with ``tool``) or ``agent.side_effect`` "
        "(with ``effect``).",
    ),
    Operation(
        "get",
        "/v1/audit",
        "queryAudit",
        "Query the audit stream",
        "audit",
        (Role.ADMIN,),
        {200: Answer("One page of the audit stream, oldest first.", responses.AuditPageView)},
        errors=(400, 503),
        parameters=(
            _query("workflow_id", _text(128), "Events of this run."),
            _query(
                "credential_id",
                _text(128),
                "Events of this credential: the steps of the approval it was issued with, the "
                "decision that allowed it, its issuance, reported tool calls and side effects, "
                "its revocation.",
            ),
            _query("actor", _text(2048), "Events by this principal."),
            {
                "name": "type",
                "in": "query",
                "required": False,
                "style": "form",
                "explode": True,
                "description": "Event types (repeated or comma-separated).",
                "schema": {"type": "array", "items": _enum(_EVENT_TYPES)},
            },
            _query(
                "since",
                {"type": "string", "format": "date-time"},
                "From this time (RFC 3339 with an offset).",
            ),
            _query(
                "until",
                {"type": "string", "format": "date-time"},
                "Before this time (exclusive); after ``since``.",
            ),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
                "At most this many events.",
            ),
            _query("cursor", _text(48), "The previous page's ``next_cursor`` (same filters)."),
            _query(
                "format",
                _enum(["tasklease", "ocsf"], "tasklease"),
                "Records as chained, or in OCSF API Activity form.",
            ),
        ),
        description="Unknown parameters are refused.",
    ),
    Operation(
        "get",
        "/v1/reports/legacy",
        "legacyReport",
        "Burn-down of legacy targets",
        "reports",
        (Role.ADMIN,),
        {
            200: Answer(
                "Every target the catalog in force marks ``legacy`` (a standing static "
                "secret), with who still gets credentials for it, from the ledger (about the "
                "last ``ledger_retention_days`` days, and live runs): most recently used "
                "first, unused ones (candidates to retire) last.",
                responses.LegacyReportView,
            )
        },
        errors=(400, 503),
        parameters=(
            _query(
                "since",
                {"type": "string", "format": "date-time"},
                "Only credentials issued from this time (RFC 3339 with an offset; not in the "
                "future).",
            ),
        ),
        description="Unknown parameters are refused.",
    ),
    Operation(
        "get",
        "/v1/approvals",
        "listApprovals",
        "Approvals in a state",
        "approvals",
        tuple(Role),
        {200: Answer("Approvals, newest first.", responses.ApprovalList)},
        errors=(400, 503),
        parameters=(
            _query(
                "state",
                _enum([*(s.value for s in ApprovalStatus), "all"], "pending"),
                "Which approvals.",
            ),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                "At most this many.",
            ),
        ),
        description="For approvers and admins.",
    ),
    Operation(
        "get",
        "/v1/approvals/{approval_id}",
        "getApproval",
        "One approval",
        "approvals",
        tuple(Role),
        {200: Answer("The approval.", responses.ApprovalView)},
        errors=(400, 404, 503),
        parameters=(_APPROVAL_ID,),
        description="For its requester (who polls it), approvers and admins (404 for anyone else).",
    ),
    Operation(
        "post",
        "/v1/approvals/{approval_id}/decision",
        "decideApproval",
        "Approve or deny",
        "approvals",
        tuple(Role),
        {200: Answer("The approval after the decision.", responses.ApprovalView)},
        errors=(*_WITH_BODY, 404, 409, 503),
        body=DecisionBody,
        parameters=(_APPROVAL_ID,),
        description="By an approver who is neither the requester nor the run's owner.",
    ),
    Operation(
        "post",
        "/v1/approvals/{approval_id}/withdraw",
        "withdrawApproval",
        "Withdraw an approval",
        "approvals",
        tuple(Role),
        {200: Answer("The approval, withdrawn.", responses.ApprovalView)},
        errors=(*_WITH_BODY, 404, 409, 503),
        body=WithdrawBody,
        body_required=False,
        parameters=(_APPROVAL_ID,),
        description="By its requester, an approver or an admin; the body is optional.",
    ),
)


def _schemas(operations: Sequence[Operation]) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """JSON Schemas of every body shape: a ``$ref`` per shape (by id) and the definitions.
    Request bodies as the routes validate them, answers as the routes serialise them."""
    modes: dict[int, tuple[Literal["validation", "serialization"], Shape]] = {
        id(responses.Problem): ("serialization", responses.Problem)
    }
    for op in operations:
        if op.body is not None:
            modes[id(op.body)] = ("validation", op.body)
        for answer in op.answers.values():
            if answer.shape is not None:
                modes[id(answer.shape)] = ("serialization", answer.shape)
    adapters = [(key, mode, TypeAdapter(shape)) for key, (mode, shape) in modes.items()]
    refs, definitions = TypeAdapter.json_schemas(adapters, ref_template=_REF)
    return {key: refs[(key, mode)] for key, mode, _ in adapters}, definitions.get("$defs", {})


def _answer(answer: Answer, refs: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {"description": answer.description}
    if answer.shape is not None:
        body["content"] = {answer.media_type: {"schema": refs[id(answer.shape)]}}
    elif answer.media_type == _PROMETHEUS_TEXT:
        body["content"] = {_PROMETHEUS_TEXT: {"schema": {"type": "string"}}}
    else:
        body["content"] = {answer.media_type: {"schema": {"type": "object"}}}
    if answer.headers:
        body["headers"] = {
            name: {"description": text, "required": True, "schema": dict(schema)}
            for name, (text, schema) in answer.headers.items()
        }
    return body


def _operation(op: Operation, refs: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    description = op.description
    if op.roles is not None:
        roles = ", ".join(r.value for r in op.roles)
        description = f"Roles: {roles}. {description}".strip()
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "description": description,
    }
    if op.roles is None:
        out["security"] = []
    else:
        out["x-tasklease-roles"] = [r.value for r in op.roles]
    if op.parameters:
        out["parameters"] = [dict(p) for p in op.parameters]
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {_JSON: {"schema": refs[id(op.body)]}},
        }
    answers: dict[str, Any] = {
        str(status): _answer(answer, refs) for status, answer in sorted(op.answers.items())
    }
    errors = (*_AUTHENTICATED, *op.errors) if op.roles is not None else op.errors
    for status in sorted(set(errors)):
        answers[str(status)] = {"$ref": f"#/components/responses/{_PROBLEMS[status][0]}"}
    out["responses"] = answers
    return out


def build_openapi(operations: Sequence[Operation] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` (by default every route of the broker)."""
    refs, definitions = _schemas(operations)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs)
    problem = {PROBLEM_JSON: {"schema": refs[id(responses.Problem)]}}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "tasklease",
            "version": __version__,
            "summary": "Just-in-time credentials for AI-agent and machine workflows.",
            "description": (
                "SPIFFE identity in, per-task OpenBao/Vault credentials out, revoked when the "
                "work ends. Errors are RFC 9457 problems (`application/problem+json`) with a "
                "stable `code` and a finer `reason`. Every `/v1` request carries exactly one "
                "identity: an X.509-SVID over mutual TLS, or a bearer JWT-SVID / OIDC ID token."
            ),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": [{"svid": []}, {"bearer": []}],
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in operations)],
        "paths": paths,
        "components": {
            "schemas": definitions,
            "responses": {
                name: {
                    "description": text,
                    "content": {**problem, **_HTTP_LAYER} if status == 400 else problem,
                }
                for status, (name, text) in _PROBLEMS.items()
            },
            "securitySchemes": {
                "svid": {
                    "type": "mutualTLS",
                    "description": "An X.509-SVID presented in the TLS handshake, verified "
                    "against the bundle of its own trust domain; roles from the SPIFFE ID.",
                },
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT-SVID (audience `spiffe.jwt_audience`), or an OIDC ID "
                    "token of a configured issuer (people: approvers, admins).",
                },
            },
        },
    }


def register_openapi_route(app: web.Application) -> None:
    """Serve the document at ``GET /v1/openapi.json`` (public; built once, here)."""
    document = json.dumps(build_openapi(), sort_keys=False).encode()

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type=_JSON)

    app.router.add_get(OPENAPI_PATH, openapi)
