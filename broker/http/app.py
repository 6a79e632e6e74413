"""The aiohttp application: routes and wiring of the request-scoped pieces."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

from aiohttp import web

from broker.core.authn import CallerAuthenticator
from broker.core.bundle import TrustStore
from broker.core.identity import WorkloadIdentity
from broker.core.model import CredentialRequest
from broker.core.ports import Clock
from broker.core.roles import Role
from broker.errors import ApprovalPendingError, BadRequestError
from broker.http.approval_routes import approval_pending_response
from broker.http.audit_rejections import RejectionAuditor
from broker.http.auth import CALLER_KEY, make_auth_middleware, require_roles
from broker.http.problems import problem_middleware
from broker.http.wire import (
    CredentialRequestBody,
    LiftQuarantineBody,
    QuarantineBody,
    StartWorkflowBody,
    lease_json,
    parse_body,
    quarantine_json,
    run_json,
)
from broker.service import CredentialBroker, Readiness

READINESS_KEY = web.AppKey("readiness", Readiness)
BROKER_KEY = web.AppKey("broker", CredentialBroker)
CLOCK_KEY = web.AppKey("clock", Clock)


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the process serves requests. Never touches a dependency."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis durable and reachable, OpenBao unsealed with a valid broker session,
    trust bundles fresh. 200 when all are, 503 with each failing check's reason otherwise."""
    report = await request.app[READINESS_KEY].report()
    body = {
        "status": "ready" if report.ready else "not_ready",
        "checks": {
            r.name: {"ok": r.ok, "detail": r.detail, **({"alarm": True} if r.alarm else {})}
            for r in report.results
        },
    }
    return web.Response(
        status=200 if report.ready else 503,
        text=json.dumps(body),
        content_type="application/json",
    )


async def whoami(request: web.Request) -> web.Response:
    """The caller's verified identity and roles, as the broker sees them."""
    caller = require_roles(request, *Role)
    identity = caller.identity
    body: dict[str, object] = {
        "principal": caller.principal_id,
        "roles": sorted(r.value for r in caller.roles),
        "expires_at": identity.expires_at.isoformat(),
    }
    if isinstance(identity, WorkloadIdentity):
        body["method"] = identity.method.value
        body["trust_domain"] = identity.spiffe_id.trust_domain.name
    else:
        body["method"] = "oidc"
        body["display"] = identity.display
    return web.json_response(body)


async def start_workflow(request: web.Request) -> web.Response:
    """POST /v1/workflows: an orchestrator starts a run for an accountable owner."""
    body = await parse_body(request, StartWorkflowBody)
    now = request.app[CLOCK_KEY].now()
    if (body.deadline is None) == (body.ttl_seconds is None):
        raise BadRequestError("give exactly one of deadline and ttl_seconds", reason="body.invalid")
    if body.deadline is not None and body.deadline.utcoffset() is None:
        raise BadRequestError("deadline needs a timezone (RFC 3339)", reason="body.invalid")
    deadline = body.deadline or now + timedelta(seconds=body.ttl_seconds or 0)
    run = await request.app[BROKER_KEY].start_workflow(
        request[CALLER_KEY],
        workflow_id=body.id,
        owner=body.owner,
        purpose=body.purpose,
        deadline=deadline,
        labels=body.labels,
        participants=body.participants,
    )
    return web.json_response(run_json(run), status=201)


async def get_workflow(request: web.Request) -> web.Response:
    """GET /v1/workflows/{id}: the run and its credentials' metadata."""
    run, leases = await request.app[BROKER_KEY].get_workflow(
        request[CALLER_KEY], request.match_info["workflow_id"]
    )
    return web.json_response({**run_json(run), "credentials": [lease_json(x) for x in leases]})


async def request_credential(request: web.Request) -> web.Response:
    """POST /v1/credentials: 201 with the secret, exactly once; 202 when it waits for an
    approval."""
    body = await parse_body(request, CredentialRequestBody)
    idempotency_key = request.headers.get("Idempotency-Key")
    try:
        issued = await request.app[BROKER_KEY].request_credential(
            request[CALLER_KEY],
            CredentialRequest(
                workflow_id=body.workflow_id,
                task_id=body.task_id,
                target=body.target,
                ttl=timedelta(seconds=body.ttl_seconds),
                justification=body.justification,
                tool=body.tool,
                approval_id=body.approval_id,
                idempotency_key=idempotency_key,
            ),
            params=body.params,
        )
    except ApprovalPendingError as pending:
        # Not a failure: 202 with the approval to wait for (approval_routes).
        return approval_pending_response(pending)
    lease = issued.lease
    ttl = int((lease.expires_at - lease.issued_at).total_seconds())
    payload = {
        **lease_json(lease),
        "ttl_seconds": ttl,
        "policy_ids": list(issued.decision.policy_ids),
        "secret": dict(issued.secret),
    }
    if not lease.revocable:
        payload["note"] = (
            "this credential cannot be revoked early; its lifetime is clamped to the task TTL"
        )
    response = web.json_response(payload, status=201)
    # The secret must not be cached anywhere on its way.
    response.headers["Cache-Control"] = "no-store"
    return response


async def set_quarantine(request: web.Request) -> web.Response:
    """POST /v1/quarantines: block new issuance (admin)."""
    body = await parse_body(request, QuarantineBody)
    quarantine = await request.app[BROKER_KEY].set_quarantine(
        request[CALLER_KEY],
        kind=body.kind,
        value=body.value,
        reason=body.reason,
        ttl=timedelta(seconds=body.ttl_seconds),
    )
    return web.json_response(quarantine_json(quarantine), status=201)


async def lift_quarantine(request: web.Request) -> web.Response:
    """DELETE /v1/quarantines: lift a quarantine early (admin)."""
    body = await parse_body(request, LiftQuarantineBody)
    await request.app[BROKER_KEY].lift_quarantine(
        request[CALLER_KEY], kind=body.kind, value=body.value
    )
    return web.json_response({"lifted": {"kind": body.kind.value, "value": body.value}})


async def list_quarantines(request: web.Request) -> web.Response:
    """GET /v1/quarantines: the active quarantines (admin)."""
    found = await request.app[BROKER_KEY].list_quarantines(request[CALLER_KEY])
    return web.json_response({"quarantines": [quarantine_json(q) for q in found]})


def create_app(
    *,
    readiness: Readiness,
    authenticator: CallerAuthenticator,
    now: Callable[[], datetime],
    broker: CredentialBroker | None = None,
    clock: Clock | None = None,
    rejections: RejectionAuditor | None = None,
    trust_store: TrustStore | None = None,
) -> web.Application:
    """The broker's HTTP application (``rejections`` records ``identity.rejected``;
    ``trust_store``, the authenticator's, lets keep-alive mTLS connections reuse their
    verified caller while it holds: ``broker.http.auth.PeerIdentityCache``)."""
    app = web.Application(
        middlewares=[
            problem_middleware,
            make_auth_middleware(
                authenticator=authenticator,
                now=now,
                rejections=rejections,
                trust_store=trust_store,
            ),
        ],
        client_max_size=64 * 1024,
    )
    app[READINESS_KEY] = readiness
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/whoami", whoami)
    if broker is not None and clock is not None:
        app[BROKER_KEY] = broker
        app[CLOCK_KEY] = clock
        app.router.add_post("/v1/workflows", start_workflow)
        app.router.add_get("/v1/workflows/{workflow_id}", get_workflow)
        app.router.add_post("/v1/credentials", request_credential)
        app.router.add_post("/v1/quarantines", set_quarantine)
        app.router.add_delete("/v1/quarantines", lift_quarantine)
        app.router.add_get("/v1/quarantines", list_quarantines)
    return app
