"""The audit use cases: agents and orchestrators report what they did; admins read the trail.

Reported events (``POST /v1/events``) are ``agent.tool_call`` and ``agent.side_effect``, each
bound to something the caller holds, checked against the ledger:

* a **credential** the caller holds (its ``holder``): the event carries the credential's run,
  task, approval and delegation chain;
* or a **run** the caller started (its orchestrator).

A credential or run that is unknown or not the caller's is the same 404 (no probing of ids);
one that ended more than ``report_grace`` ago is a 409 (``event.binding_expired``); other event
types, or no binding at all, are a 400. Free text is escaped and bounded, then recorded; the
trail redacts anything shaped like a secret before it is chained.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import structlog

from broker.core.audit import (
    AgentSideEffect,
    AgentToolCall,
    AuditEvent,
    AuditPage,
    AuditQuery,
    AuditReader,
    AuditTrail,
    EventType,
    Payload,
    current_request_id,
)
from broker.core.authn import Caller
from broker.core.model import DelegationChain, check_id, check_text
from broker.core.ports import Clock, Ledger
from broker.core.roles import Role
from broker.core.untrusted import printable
from broker.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    UnavailableError,
)

_log = structlog.get_logger("broker.audit")

REPORTABLE: Final = frozenset({EventType.AGENT_TOOL_CALL, EventType.AGENT_SIDE_EFFECT})
MAX_DETAILS: Final = 16
MAX_SUMMARY: Final = 1024


def new_event_id() -> str:
    """A fresh audit event id."""
    return f"evt_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class ReportedEvent:
    """What an agent or orchestrator says it did."""

    type: str
    name: str  # the tool, or the kind of side effect
    credential_id: str | None = None
    workflow_id: str | None = None
    task_id: str | None = None
    summary: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Binding:
    workflow_id: str
    task_id: str
    credential_id: str
    approval_id: str
    chain: DelegationChain


class AuditService:
    """Reported events and audit queries."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        audit: AuditTrail,
        clock: Clock,
        reader: AuditReader | None = None,
        report_grace: timedelta = timedelta(minutes=5),
    ) -> None:
        self._ledger = ledger
        self._audit = audit
        self._clock = clock
        self._reader = reader
        self._grace = report_grace

    async def report(self, caller: Caller, reported: ReportedEvent) -> AuditEvent:
        """Record a tool call or side effect bound to a credential or run of the caller's."""
        if not caller.has_any((Role.AGENT, Role.ORCHESTRATOR)):
            raise ForbiddenError(
                f"{printable(caller.principal_id)} needs the agent or orchestrator role to "
                "report events",
                reason="auth.role_required",
            )
        try:
            kind = EventType(reported.type)
        except ValueError:
            kind = None
        if kind not in REPORTABLE:
            raise BadRequestError(
                f"only {sorted(t.value for t in REPORTABLE)} can be reported, got "
                f"{printable(reported.type, 64)!r}",
                reason="event.type_not_reportable",
            )
        name = check_text(
            reported.name, "tool" if kind is EventType.AGENT_TOOL_CALL else "effect", limit=256
        )
        if len(reported.details) > MAX_DETAILS:
            raise BadRequestError(f"at most {MAX_DETAILS} details", reason="invalid.details")
        details = {
            check_id(key, "detail key"): printable(value, MAX_SUMMARY)
            for key, value in reported.details.items()
        }
        summary = printable(reported.summary, MAX_SUMMARY) if reported.summary else ""
        now = self._clock.now()
        binding = await self._binding(caller, reported, now)
        payload: Payload = (
            AgentToolCall(tool=name, summary=summary, details=details)
            if kind is EventType.AGENT_TOOL_CALL
            else AgentSideEffect(effect=name, summary=summary, details=details)
        )
        event = AuditEvent(
            event_id=new_event_id(),
            time=now,
            actor=caller.principal_id,
            payload=payload,
            chain=binding.chain,
            workflow_id=binding.workflow_id,
            task_id=binding.task_id,
            credential_id=binding.credential_id,
            approval_id=binding.approval_id,
            request_id=current_request_id(),
        )
        await self._audit.record(event)
        return event

    async def _binding(self, caller: Caller, reported: ReportedEvent, now: datetime) -> _Binding:
        if reported.credential_id is not None:
            credential_id = check_id(reported.credential_id, "credential id")
            lease = await self._ledger.get_lease(credential_id)
            if lease is None or lease.holder != caller.principal_id:
                raise NotFoundError(
                    f"no credential {credential_id!r} held by you", reason="credential.not_found"
                )
            for given, actual, what in (
                (reported.workflow_id, lease.workflow_id, "workflow_id"),
                (reported.task_id, lease.task_id, "task_id"),
            ):
                if given is not None and given != actual:
                    raise BadRequestError(
                        f"{what} {printable(given, 128)!r} is not the credential's ({actual!r})",
                        reason="event.binding_mismatch",
                    )
            ended = lease.revoked_at or (lease.expires_at if lease.is_expired(now) else None)
            self._within_grace(ended, now, f"credential {credential_id}")
            return _Binding(
                workflow_id=lease.workflow_id,
                task_id=lease.task_id,
                credential_id=lease.credential_id,
                approval_id=lease.approval_id or "",
                chain=lease.chain,
            )
        if reported.workflow_id is not None:
            workflow_id = check_id(reported.workflow_id, "workflow id")
            run = await self._ledger.get_run(workflow_id)
            if run is None or run.started_by != caller.principal_id:
                raise NotFoundError(
                    f"no workflow run {workflow_id!r} started by you",
                    reason="workflow.not_found",
                )
            task_id = check_id(reported.task_id, "task id") if reported.task_id else ""
            ended = run.ended_at or (run.deadline if now >= run.deadline else None)
            self._within_grace(ended, now, f"workflow run {workflow_id}")
            return _Binding(
                workflow_id=run.id,
                task_id=task_id,
                credential_id="",
                approval_id="",
                chain=run.chain,
            )
        raise BadRequestError(
            "a reported event names the credential_id it used, or the workflow_id of a run "
            "you started",
            reason="event.unbound",
        )

    def _within_grace(self, ended: datetime | None, now: datetime, what: str) -> None:
        if ended is not None and now - ended > self._grace:
            raise ConflictError(
                f"{what} ended at {ended.isoformat()}; events are accepted up to "
                f"{int(self._grace.total_seconds())} s after the end",
                reason="event.binding_expired",
            )

    async def query(self, caller: Caller, query: AuditQuery) -> AuditPage:
        """One page of the audit stream (admins only)."""
        if Role.ADMIN not in caller.roles:
            raise ForbiddenError(
                f"{printable(caller.principal_id)} needs the admin role to read the audit trail",
                reason="auth.role_required",
            )
        if self._reader is None:
            raise UnavailableError(
                "audit queries need the Redis stream sink (audit.redis.enabled)",
                reason="audit.queries_unavailable",
            )
        if query.credential_id is not None and query.workflow_id is None:
            # A credential's events are in its run's stream (its forced revocation too); the
            # ledger knows the run. A credential it no longer knows is searched for in the
            # whole stream (bounded scan).
            lease = await self._ledger.get_lease(check_id(query.credential_id, "credential id"))
            if lease is not None:
                # The approval it was issued with is part of its story.
                query = dataclasses.replace(
                    query, workflow_id=lease.workflow_id, approval_id=lease.approval_id or None
                )
        return await self._reader.query(query)
