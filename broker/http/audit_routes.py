"""The audit trail over HTTP: reported events and admin queries.

``POST /v1/events`` (agent, orchestrator)::

    {"type": "agent.tool_call", "tool": "psql", "credential_id": "cred_…",
     "summary": "SELECT count(*) FROM orders", "details": {"rows": "3"}}
    {"type": "agent.side_effect", "effect": "ticket.comment", "workflow_id": "wf-42", …}
    → 201 {"event_id", "type", "time", "workflow_id", "task_id", "credential_id"}

``GET /v1/audit`` (admin), every parameter optional: ``workflow_id``, ``credential_id``,
``actor``, ``type`` (repeated or comma-separated), ``since``/``until`` (RFC 3339, ``until``
exclusive), ``limit`` (1-500, default 100), ``cursor`` (the previous page's ``next_cursor``,
with the same filters), ``format`` (``tasklease`` or ``ocsf``)::

    → 200 {"events": [...], "next_cursor": "…" | null, "scanned": n, "format": "tasklease"}
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broker.audit import AuditService, ReportedEvent
from broker.core.audit import MAX_PAGE, AuditQuery, EventType
from broker.core.audit_ocsf import to_ocsf
from broker.core.roles import Role
from broker.core.untrusted import printable
from broker.errors import BadRequestError
from broker.http.auth import require_roles
from broker.http.wire import one_query_value, parse_body, query_time, refuse_unknown_params

AUDIT_SERVICE_KEY = web.AppKey("audit_service", AuditService)

_QUERY_PARAMS = frozenset(
    {"workflow_id", "credential_id", "actor", "type", "since", "until", "limit", "cursor", "format"}
)


class ReportEventBody(BaseModel):
    """POST /v1/events"""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)

    # Any other type is refused with 400 event.type_not_reportable (broker.audit.REPORTABLE).
    type: str = Field(
        min_length=1,
        max_length=64,
        json_schema_extra={
            "enum": [EventType.AGENT_TOOL_CALL.value, EventType.AGENT_SIDE_EFFECT.value]
        },
    )
    tool: str | None = Field(default=None, min_length=1, max_length=256)
    effect: str | None = Field(default=None, min_length=1, max_length=256)
    credential_id: str | None = Field(default=None, min_length=1, max_length=128)
    workflow_id: str | None = Field(default=None, min_length=1, max_length=128)
    task_id: str | None = Field(default=None, min_length=1, max_length=128)
    summary: str = Field(default="", max_length=4096)
    details: dict[str, str] = Field(default_factory=dict, max_length=16)


async def report_event(request: web.Request) -> web.Response:
    """POST /v1/events: an agent or orchestrator reports a tool call or a side effect."""
    caller = require_roles(request, Role.AGENT, Role.ORCHESTRATOR)
    body = await parse_body(request, ReportEventBody)
    name = body.tool if body.type == EventType.AGENT_TOOL_CALL else body.effect
    if body.type in (EventType.AGENT_TOOL_CALL, EventType.AGENT_SIDE_EFFECT) and not name:
        field = "tool" if body.type == EventType.AGENT_TOOL_CALL else "effect"
        raise BadRequestError(f"a {body.type} names its {field}", reason=f"invalid.{field}")
    event = await request.app[AUDIT_SERVICE_KEY].report(
        caller,
        ReportedEvent(
            type=body.type,
            name=name or "",
            credential_id=body.credential_id,
            workflow_id=body.workflow_id,
            task_id=body.task_id,
            summary=body.summary,
            details=body.details,
        ),
    )
    return web.json_response(
        {
            "event_id": event.event_id,
            "type": event.type.value,
            "time": event.time.isoformat(),
            "workflow_id": event.workflow_id,
            "task_id": event.task_id,
            "credential_id": event.credential_id,
        },
        status=201,
    )


def _types(request: web.Request) -> frozenset[EventType]:
    names = [n.strip() for raw in request.query.getall("type", []) for n in raw.split(",")]
    types = set()
    for name in filter(None, names):
        try:
            types.add(EventType(name))
        except ValueError:
            raise BadRequestError(
                f"unknown event type {printable(name, 64)!r} (known: "
                f"{sorted(t.value for t in EventType)})",
                reason="query.invalid",
            ) from None
    return frozenset(types)


async def query_audit(request: web.Request) -> web.Response:
    """GET /v1/audit: one page of the audit stream (admin)."""
    caller = require_roles(request, Role.ADMIN)
    refuse_unknown_params(request.query, _QUERY_PARAMS)
    raw_limit = one_query_value(request.query, "limit", 4) or "100"
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise BadRequestError(f"limit must be 1..{MAX_PAGE}", reason="query.invalid")
    output: Literal["tasklease", "ocsf"]
    wanted = one_query_value(request.query, "format", 16) or "tasklease"
    if wanted == "ocsf":
        output = "ocsf"
    elif wanted == "tasklease":
        output = "tasklease"
    else:
        raise BadRequestError("format must be tasklease or ocsf", reason="query.invalid")
    since, until = query_time(request, "since"), query_time(request, "until")
    if since is not None and until is not None and until <= since:
        raise BadRequestError("until must be after since", reason="query.invalid")
    query = AuditQuery(
        workflow_id=one_query_value(request.query, "workflow_id", 128),
        credential_id=one_query_value(request.query, "credential_id", 128),
        actor=one_query_value(request.query, "actor", 2048),
        types=_types(request),
        since=since,
        until=until,
        cursor=one_query_value(request.query, "cursor", 48),
        limit=int(raw_limit),
    )
    page = await request.app[AUDIT_SERVICE_KEY].query(caller, query)
    events = [to_ocsf(r) if output == "ocsf" else dict(r) for r in page.records]
    return web.json_response(
        {
            "events": events,
            "next_cursor": page.next_cursor,
            "scanned": page.scanned,
            "format": output,
        }
    )


def register_audit_routes(app: web.Application, service: AuditService) -> None:
    """Add the audit endpoints to ``app`` (before it starts serving)."""
    app[AUDIT_SERVICE_KEY] = service
    app.router.add_post("/v1/events", report_event)
    app.router.add_get("/v1/audit", query_audit)
