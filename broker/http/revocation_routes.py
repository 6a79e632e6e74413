"""Revocation over HTTP: workflow completion, credential metadata and early release, forced
revocation by selector.

Status codes of a revocation report (completion with ``?wait=true``, release, forced
revocation): **200** when every addressed lease is confirmed revoked (``complete: true``),
**207** when at least one is still live — the body lists each one with the reason (not
revocable before its expiry, mint in flight, retrying with backoff, revoke_failed) and the
broker keeps retrying it. A 207 is never a success: clients that only look at "2xx" must look
at ``complete``. Completion without ``wait`` answers **202** with what it made due.

A report lists at most 10 000 leases. A completion or a forced revocation that matched more
made every one of them due now all the same: ``truncated`` says the others are not listed and
the sweeper revokes them; a forced revocation's ``scheduled`` counts every lease it made due.

Report body::

    {"complete": bool, "truncated": bool, "scheduled": k (forced revocation only),
     "counts": {"confirmed_revoked": n, "still_live": m},
     "confirmed_revoked": [{credential_id, workflow_id, task_id, target, kind, holder,
                            state: "revoked", reason, revoked_at}],
     "still_live": [{credential_id, workflow_id, task_id, target, kind, holder, state,
                     reason, detail, attempts, last_error, expires_at, next_attempt_at}]}
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broker.core.model import Lease, Sensitivity
from broker.core.ports import LeaseSelector
from broker.core.roles import Role
from broker.errors import BadRequestError
from broker.http.auth import require_roles
from broker.http.wire import lease_json, parse_body, run_json
from broker.revocation import (
    CompletionResult,
    LeaseResult,
    RevocationReport,
    Revoker,
    RunOutcome,
)

REVOKER_KEY = web.AppKey("revoker", Revoker)

_MAX_ID = 128
_MAX_SPIFFE_ID = 2048


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)


class CompleteWorkflowBody(_Strict):
    """POST /v1/workflows/{id}/complete"""

    outcome: Literal["completed", "failed", "cancelled"]


class SelectorBody(_Strict):
    """Which leases a forced revocation addresses: every given field must match; at least one
    field, or ``everything: true``."""

    workflow_id: str | None = Field(default=None, min_length=1, max_length=_MAX_ID)
    task_id: str | None = Field(default=None, min_length=1, max_length=_MAX_ID)
    holder: str | None = Field(default=None, min_length=1, max_length=_MAX_SPIFFE_ID)
    holder_prefix: str | None = Field(default=None, min_length=1, max_length=_MAX_SPIFFE_ID)
    owner: str | None = Field(default=None, min_length=1, max_length=256)
    target: str | None = Field(default=None, min_length=1, max_length=_MAX_ID)
    sensitivity: Sensitivity | None = None
    everything: bool = False


class ForceRevocationBody(_Strict):
    """POST /v1/revocations"""

    selector: SelectorBody
    reason: str = Field(min_length=1, max_length=1024, description="why; an incident reference")


def _wait(request: web.Request) -> bool:
    raw = request.query.get("wait", "false").lower()
    if raw not in {"true", "false", "1", "0"}:
        raise BadRequestError("wait must be true or false", reason="query.invalid")
    return raw in {"true", "1"}


def _result_json(result: LeaseResult) -> dict[str, Any]:
    body: dict[str, Any] = {"credential_id": result.credential_id}
    lease = result.lease
    if lease is not None:
        body.update(
            workflow_id=lease.workflow_id,
            task_id=lease.task_id,
            target=lease.target,
            kind=lease.kind.value,
            holder=lease.holder,
            state=lease.state.value,
        )
    if result.confirmed_revoked:
        body["reason"] = lease.revoke_reason if lease is not None else ""
        body["revoked_at"] = (
            lease.revoked_at.isoformat() if lease is not None and lease.revoked_at else None
        )
        return body
    body["reason"] = result.outcome.value
    body["detail"] = result.detail
    if lease is not None:
        body["attempts"] = lease.attempts
        body["last_error"] = lease.last_error
        body["expires_at"] = lease.expires_at.isoformat()
    body["next_attempt_at"] = (
        result.next_attempt_at.isoformat() if result.next_attempt_at is not None else None
    )
    return body


def report_json(report: RevocationReport) -> dict[str, Any]:
    """A revocation report as the API shows it (never a secret)."""
    confirmed = [_result_json(r) for r in report.confirmed_revoked]
    live = [_result_json(r) for r in report.still_live]
    body: dict[str, Any] = {
        "complete": report.complete,
        "truncated": report.truncated,
        "counts": {"confirmed_revoked": len(confirmed), "still_live": len(live)},
        "confirmed_revoked": confirmed,
        "still_live": live,
    }
    if report.scheduled is not None:
        body["scheduled"] = report.scheduled
    return body


def _report_status(report: RevocationReport) -> int:
    return 200 if report.complete else 207


def credential_json(lease: Lease) -> dict[str, Any]:
    """A credential's metadata, with its revocation progress."""
    return {
        **lease_json(lease),
        "attempts": lease.attempts,
        "last_error": lease.last_error,
        "revoked_at": lease.revoked_at.isoformat() if lease.revoked_at else None,
    }


async def complete_workflow(request: web.Request) -> web.Response:
    """POST /v1/workflows/{id}/complete: end the run and revoke its credentials.
    200/207 with the report (``?wait=true``), else 202 with what was made due."""
    caller = require_roles(request, Role.ORCHESTRATOR, Role.ADMIN)
    body = await parse_body(request, CompleteWorkflowBody)
    wait = _wait(request)
    result: CompletionResult = await request.app[REVOKER_KEY].complete_workflow(
        caller, request.match_info["workflow_id"], RunOutcome(body.outcome), wait=wait
    )
    if result.report is None:
        return web.json_response(
            {"workflow": run_json(result.run), "scheduled": list(result.scheduled)}, status=202
        )
    return web.json_response(
        {"workflow": run_json(result.run), "report": report_json(result.report)},
        status=_report_status(result.report),
    )


async def get_credential(request: web.Request) -> web.Response:
    """GET /v1/credentials/{id}: metadata, for the holder or an admin (404 for others)."""
    caller = require_roles(request, *Role)
    lease = await request.app[REVOKER_KEY].get_credential(
        caller, request.match_info["credential_id"]
    )
    return web.json_response(credential_json(lease))


async def release_credential(request: web.Request) -> web.Response:
    """DELETE /v1/credentials/{id}: early release by the holder (or an admin); the report."""
    caller = require_roles(request, *Role)
    report = await request.app[REVOKER_KEY].release(caller, request.match_info["credential_id"])
    return web.json_response(report_json(report), status=_report_status(report))


async def force_revocation(request: web.Request) -> web.Response:
    """POST /v1/revocations: an admin revokes every lease a selector matches; the report."""
    caller = require_roles(request, Role.ADMIN)
    body = await parse_body(request, ForceRevocationBody)
    given = body.selector
    selector = LeaseSelector(
        workflow_id=given.workflow_id,
        task_id=given.task_id,
        holder=given.holder,
        holder_prefix=given.holder_prefix,
        owner=given.owner,
        target=given.target,
        sensitivity=given.sensitivity,
        everything=given.everything,
    )
    report = await request.app[REVOKER_KEY].force(caller, selector, body.reason)
    return web.json_response(report_json(report), status=_report_status(report))


def register_revocation_routes(app: web.Application, revoker: Revoker) -> None:
    """Add the revocation endpoints to ``app`` (before it starts serving)."""
    app[REVOKER_KEY] = revoker
    app.router.add_post("/v1/workflows/{workflow_id}/complete", complete_workflow)
    app.router.add_get("/v1/credentials/{credential_id}", get_credential)
    app.router.add_delete("/v1/credentials/{credential_id}", release_credential)
    app.router.add_post("/v1/revocations", force_revocation)
