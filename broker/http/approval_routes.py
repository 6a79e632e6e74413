"""Approvals over HTTP.

* ``GET /v1/approvals?state=pending&limit=100`` (approver, admin): a list; ``state`` is
  pending (default), approved, denied, withdrawn, used, expired or all.
* ``GET /v1/approvals/{id}`` (the requester, approver, admin): one approval; the requester
  polls it. Anyone else gets 404.
* ``POST /v1/approvals/{id}/decision`` (approver): ``{"decision": "approve" | "deny",
  "comment": "..."}``.
* ``POST /v1/approvals/{id}/withdraw`` (the requester, approver, admin): ``{"comment":
  "..."}``, body optional.

``POST /v1/credentials`` answers **202** (JSON, not problem+json) when the request waits for
an approval; ``Location`` and ``poll_url`` name the approval, and the agent retries the same
request with ``approval_id``::

    {"status": "approval_pending", "approval_id": "apr_…", "state": "pending",
     "poll_url": "/v1/approvals/apr_…", "quorum": 1, "approver_count": 0,
     "expires_at": "…", "policy_ids": [...], "reused": false, "detail": "…"}
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broker.approvals import Approvals, poll_path
from broker.core.approvals import Approval, ApprovalStatus, Verdict, approval_view
from broker.core.ports import Clock
from broker.core.roles import Role
from broker.errors import ApprovalPendingError, BadRequestError
from broker.http.auth import require_roles
from broker.http.problems import REQUEST_ID_KEY
from broker.http.wire import parse_body

APPROVALS_KEY = web.AppKey("approvals", Approvals)
APPROVALS_CLOCK_KEY = web.AppKey("approvals_clock", Clock)

# How long an agent should wait before polling again (seconds; a hint).
POLL_AFTER_SECONDS = 5
_MAX_LIMIT = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)


class DecisionBody(_Strict):
    """POST /v1/approvals/{id}/decision"""

    decision: Literal["approve", "deny"]
    comment: str = Field(default="", max_length=1024)


class WithdrawBody(_Strict):
    """POST /v1/approvals/{id}/withdraw"""

    comment: str = Field(default="", max_length=1024)


def approval_json(approval: Approval, request: web.Request) -> dict[str, Any]:
    """An approval as the API shows it, with its links."""
    path = poll_path(approval.id)
    return {
        **approval_view(approval, request.app[APPROVALS_CLOCK_KEY].now()),
        "links": {"self": path, "decision": f"{path}/decision", "withdraw": f"{path}/withdraw"},
    }


def approval_pending_response(pending: ApprovalPendingError) -> web.Response:
    """The 202 answer of a credential request that waits for an approval."""
    path = poll_path(pending.approval_id)
    response = web.json_response(
        {
            "status": "approval_pending",
            **pending.extra(),
            "poll_url": path,
            "detail": pending.detail,
        },
        status=202,
    )
    response.headers["Location"] = path
    response.headers["Retry-After"] = str(POLL_AFTER_SECONDS)
    response.headers["Cache-Control"] = "no-store"
    return response


def _state(request: web.Request) -> ApprovalStatus | None:
    raw = request.query.get("state", "pending")
    if raw == "all":
        return None
    try:
        return ApprovalStatus(raw)
    except ValueError:
        raise BadRequestError(
            f"state must be one of {[s.value for s in ApprovalStatus] + ['all']}",
            reason="query.invalid",
        ) from None


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_LIMIT:
        raise BadRequestError(f"limit must be 1..{_MAX_LIMIT}", reason="query.invalid")
    return int(raw)


async def list_approvals(request: web.Request) -> web.Response:
    """GET /v1/approvals: approvals in a state (default pending), newest first."""
    caller = require_roles(request, *Role)
    found = await request.app[APPROVALS_KEY].list_approvals(
        caller, state=_state(request), limit=_limit(request)
    )
    return web.json_response({"approvals": [approval_json(a, request) for a in found]})


async def get_approval(request: web.Request) -> web.Response:
    """GET /v1/approvals/{id}: one approval (the requester polls it)."""
    caller = require_roles(request, *Role)
    approval = await request.app[APPROVALS_KEY].get(caller, request.match_info["approval_id"])
    return web.json_response(approval_json(approval, request))


async def decide_approval(request: web.Request) -> web.Response:
    """POST /v1/approvals/{id}/decision: an approver approves or denies."""
    caller = require_roles(request, *Role)
    body = await parse_body(request, DecisionBody)
    approval = await request.app[APPROVALS_KEY].decide(
        caller,
        request.match_info["approval_id"],
        Verdict(body.decision),
        comment=body.comment,
        request_id=request.get(REQUEST_ID_KEY, ""),
    )
    return web.json_response(approval_json(approval, request))


async def withdraw_approval(request: web.Request) -> web.Response:
    """POST /v1/approvals/{id}/withdraw: the requester, an approver or an admin withdraws."""
    caller = require_roles(request, *Role)
    comment = ""
    if request.can_read_body:
        comment = (await parse_body(request, WithdrawBody)).comment
    approval = await request.app[APPROVALS_KEY].withdraw(
        caller,
        request.match_info["approval_id"],
        comment=comment,
        request_id=request.get(REQUEST_ID_KEY, ""),
    )
    return web.json_response(approval_json(approval, request))


def register_approval_routes(app: web.Application, approvals: Approvals, clock: Clock) -> None:
    """Add the approval endpoints to ``app`` (before it starts serving)."""
    app[APPROVALS_KEY] = approvals
    app[APPROVALS_CLOCK_KEY] = clock
    app.router.add_get("/v1/approvals", list_approvals)
    app.router.add_get("/v1/approvals/{approval_id}", get_approval)
    app.router.add_post("/v1/approvals/{approval_id}/decision", decide_approval)
    app.router.add_post("/v1/approvals/{approval_id}/withdraw", withdraw_approval)
