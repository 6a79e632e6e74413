"""The audit event catalogue: one constant and one payload type per event. Pure data.

An :class:`AuditEvent` answers *who* (``actor`` and the delegation ``chain``), *what*
(``type`` and its typed ``payload``), *about what* (run, task, credential, approval and request
ids, so events correlate) and *when*. The :class:`AuditTrail` port records it; the adapters add
the tamper-evidence fields (writer, sequence number, ``prev_hash``, ``hash``) and deliver it to
the sinks. Nothing here may ever carry a secret: payloads hold identifiers, decisions and
metadata, never a token, password, private key or whole JWT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Final, Protocol

from broker.core.model import DelegationChain


class EventType(StrEnum):
    """Every audit event type, with its wire name."""

    WORKFLOW_STARTED = "workflow.started"
    WORKFLOW_COMPLETED = "workflow.completed"
    IDENTITY_REJECTED = "identity.rejected"
    POLICY_DECISION = "policy.decision"
    APPROVAL_REQUESTED = "approval.requested"
    APPROVAL_DECIDED = "approval.decided"
    CREDENTIAL_ISSUED = "credential.issued"
    CREDENTIAL_DENIED = "credential.denied"
    CREDENTIAL_REVOKED = "credential.revoked"
    CREDENTIAL_REVOKE_FAILED = "credential.revoke_failed"
    AGENT_TOOL_CALL = "agent.tool_call"
    AGENT_SIDE_EFFECT = "agent.side_effect"
    REVOCATION_FORCED = "revocation.forced"
    QUARANTINE_CHANGED = "quarantine.changed"
    WORKFLOW_PURGED = "workflow.purged"


class Payload:
    """Base of the typed payloads; ``TYPE`` names the event each one belongs to."""

    __slots__ = ()
    TYPE: ClassVar[EventType]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (datetimes as ISO 8601 strings)."""
        # Field by field, not dataclasses.asdict: no deep copy (values are converted anyway).
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class WorkflowStarted(Payload):
    """An orchestrator started a run for an accountable owner."""

    TYPE: ClassVar[EventType] = EventType.WORKFLOW_STARTED
    owner: str
    purpose: str
    deadline: datetime
    labels: Mapping[str, str] = field(default_factory=dict)
    participants: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkflowCompleted(Payload):
    """A run ended (completed, failed, cancelled by its orchestrator, or expired)."""

    TYPE: ClassVar[EventType] = EventType.WORKFLOW_COMPLETED
    state: str
    outcome: str = ""
    leases_due: int = 0


@dataclass(frozen=True, slots=True)
class IdentityRejected(Payload):
    """A caller's credential (SVID, OIDC token) was refused. ``detail`` is sanitized text."""

    TYPE: ClassVar[EventType] = EventType.IDENTITY_REJECTED
    method: str
    reason: str
    detail: str = ""
    path: str = ""
    remote: str = ""
    # Rejections not recorded since the previous recorded one (rate limit).
    suppressed: int = 0


@dataclass(frozen=True, slots=True)
class PolicyDecision(Payload):
    """A Cedar decision at request time, with the policy ids and the context evaluated."""

    TYPE: ClassVar[EventType] = EventType.POLICY_DECISION
    action: str
    target: str
    outcome: str
    policy_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    context: Mapping[str, Any] = field(default_factory=dict)
    max_ttl_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class ApprovalRequested(Payload):
    """A request needs a human decision; the approval is bound to the request's digest."""

    TYPE: ClassVar[EventType] = EventType.APPROVAL_REQUESTED
    target: str
    request_digest: str
    ttl_seconds: int
    quorum: int
    expires_at: datetime
    policy_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ApprovalDecided(Payload):
    """One step of an approval: approve, deny, withdraw, use, release or expiry."""

    TYPE: ClassVar[EventType] = EventType.APPROVAL_DECIDED
    decision: str
    state: str
    approvers: tuple[str, ...] = ()
    comment: str = ""


@dataclass(frozen=True, slots=True)
class CredentialIssued(Payload):
    """A credential left the broker (the secret itself is never recorded)."""

    TYPE: ClassVar[EventType] = EventType.CREDENTIAL_ISSUED
    target: str
    kind: str
    expires_at: datetime
    ttl_seconds: int
    token_accessor: str = ""
    vault_lease_count: int = 0
    policy_ids: tuple[str, ...] = ()
    revocable: bool = True


@dataclass(frozen=True, slots=True)
class CredentialDenied(Payload):
    """A credential request was refused (policy, quarantine, run state, approval, ...)."""

    TYPE: ClassVar[EventType] = EventType.CREDENTIAL_DENIED
    target: str
    reason: str
    detail: str = ""
    policy_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CredentialRevoked(Payload):
    """OpenBao confirmed the credential's token and leases are gone."""

    TYPE: ClassVar[EventType] = EventType.CREDENTIAL_REVOKED
    cause: str
    target: str = ""
    reason: str = ""
    # Who asked for it (the holder releasing, the orchestrator completing, an admin forcing);
    # empty for the broker's own TTL sweeps.
    initiated_by: str = ""


@dataclass(frozen=True, slots=True)
class CredentialRevokeFailed(Payload):
    """Revocation could not be confirmed after its attempts; still retried slowly."""

    TYPE: ClassVar[EventType] = EventType.CREDENTIAL_REVOKE_FAILED
    attempts: int
    error: str
    still_live: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentToolCall(Payload):
    """An agent reported a tool call made with a credential it holds."""

    TYPE: ClassVar[EventType] = EventType.AGENT_TOOL_CALL
    tool: str
    summary: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentSideEffect(Payload):
    """An agent or orchestrator reported a side effect (a change in a target system)."""

    TYPE: ClassVar[EventType] = EventType.AGENT_SIDE_EFFECT
    effect: str
    summary: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RevocationForced(Payload):
    """A security team forced revocation by a selector."""

    TYPE: ClassVar[EventType] = EventType.REVOCATION_FORCED
    selector: Mapping[str, Any]
    reason: str
    # Of the leases it revoked inline (the first 10 000 it matched).
    confirmed: int = 0
    still_live: int = 0
    # Every live lease it matched, and how many of them it made due now (those not revoked
    # inline are revoked by the sweeper).
    matched: int = 0
    scheduled: int = 0
    # The credentials and runs it addressed (bounded), so each run's story shows it.
    credential_ids: tuple[str, ...] = ()
    workflow_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QuarantineChanged(Payload):
    """A quarantine was set or lifted."""

    TYPE: ClassVar[EventType] = EventType.QUARANTINE_CHANGED
    action: str
    kind: str
    value: str
    reason: str = ""
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WorkflowPurged(Payload):
    """The ledger deletes a run that is over, with its leases (``leases``, by state), past
    its retention; recorded before the deletion, so no record leaves the ledger unaccounted
    (a purge that finds the run changed records it again when it next tries)."""

    TYPE: ClassVar[EventType] = EventType.WORKFLOW_PURGED
    state: str
    over_at: datetime
    retention_days: int
    leases: int = 0
    lease_states: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event before it is chained. Correlation ids are empty strings when not applicable."""

    event_id: str
    time: datetime
    actor: str
    payload: Payload
    chain: DelegationChain | None = None
    workflow_id: str = ""
    task_id: str = ""
    credential_id: str = ""
    approval_id: str = ""
    request_id: str = ""

    @property
    def type(self) -> EventType:
        """The event type, from the payload."""
        return self.payload.TYPE

    def as_dict(self) -> dict[str, Any]:
        """The canonical JSON-ready form (what is hashed, stored and queried)."""
        return {
            "event_id": self.event_id,
            "time": self.time.isoformat(),
            "type": self.type.value,
            "actor": self.actor,
            "chain": self.chain.as_list() if self.chain is not None else [],
            "workflow_id": self.workflow_id,
            "task_id": self.task_id,
            "credential_id": self.credential_id,
            "approval_id": self.approval_id,
            "request_id": self.request_id,
            "payload": self.payload.as_dict(),
        }


class AuditTrail(Protocol):
    """Records audit events in order. ``record`` returns once every sink configured as durable
    has the event; it raises ``AuditUnavailableError`` when one cannot take it, and the caller
    fails closed (a credential is not handed out without its ``credential.issued`` event)."""

    async def record(self, event: AuditEvent) -> None:
        """Chain and deliver ``event``."""
        ...

    async def record_all(self, events: Sequence[AuditEvent]) -> None:
        """Chain and deliver ``events`` in order, together (one group commit)."""
        ...


# The id of the HTTP request being served, set by the HTTP layer for the request's task (and
# the tasks it starts), so events recorded deep inside a use case correlate with the request
# and its problem+json answer without threading the id through every call.
REQUEST_ID: Final[ContextVar[str]] = ContextVar("tasklease_request_id", default="")


def current_request_id() -> str:
    """The id of the HTTP request being served; empty outside a request (sweeps, start-up)."""
    return REQUEST_ID.get()


def record_runs(record: Mapping[str, Any]) -> list[str]:
    """The runs a chained record belongs to: its ``workflow_id``, and for a forced revocation
    every run it addressed."""
    runs: list[str] = []
    own = record.get("workflow_id")
    if isinstance(own, str) and own:
        runs.append(own)
    payload = record.get("payload")
    extra = payload.get("workflow_ids") if isinstance(payload, Mapping) else None
    if isinstance(extra, list):
        runs.extend(r for r in extra if isinstance(r, str) and r and r not in runs)
    return runs


# --------------------------------------------------------------------------- queries


MAX_PAGE: Final = 500
_APPROVAL_STEPS: Final = frozenset({"approval.requested", "approval.decided"})


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """What an admin asks the audit stream: every given filter must match; ``cursor`` continues
    a previous page (valid only with the same filters)."""

    workflow_id: str | None = None
    credential_id: str | None = None
    # With ``credential_id``: the approval the credential was issued with, whose own steps
    # (``approval.requested``, ``approval.decided``) belong to the credential's story too,
    # except those naming another credential (a use released after a failed mint). Set by
    # the use case from the ledger, not by callers.
    approval_id: str | None = None
    actor: str | None = None
    types: frozenset[EventType] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    cursor: str | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}, got {self.limit}")
        for moment in (self.since, self.until):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError("since and until must be timezone-aware")

    def matches(self, record: Mapping[str, Any]) -> bool:
        """True when the chained ``record`` passes every filter."""
        if self.workflow_id is not None and self.workflow_id not in record_runs(record):
            return False
        if self.credential_id is not None and not self._about_credential(record):
            return False
        if self.actor is not None and record.get("actor") != self.actor:
            return False
        if self.types and record.get("type") not in {t.value for t in self.types}:
            return False
        if self.since is not None or self.until is not None:
            try:
                moment = datetime.fromisoformat(str(record.get("time")))
            except ValueError:
                return False
            if self.since is not None and moment < self.since:
                return False
            if self.until is not None and moment >= self.until:
                return False
        return True

    def _about_credential(self, record: Mapping[str, Any]) -> bool:
        named = record.get("credential_id")
        if named == self.credential_id:
            return True
        if (
            self.approval_id
            and record.get("approval_id") == self.approval_id
            and not named
            and record.get("type") in _APPROVAL_STEPS
        ):
            return True
        payload = record.get("payload")
        ids = payload.get("credential_ids") if isinstance(payload, Mapping) else None
        return isinstance(ids, list) and self.credential_id in ids


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of chained records, oldest first; ``next_cursor`` is None at the end."""

    records: tuple[Mapping[str, Any], ...]
    next_cursor: str | None
    scanned: int


class AuditReader(Protocol):
    """Reads the audit stream back (the Redis stream sink)."""

    async def query(self, query: AuditQuery) -> AuditPage:
        """The records matching ``query``, one page."""
        ...


_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _jsonable(value: Any) -> Any:
    # Exact-type checks first: a policy context has hundreds of scalars, and isinstance
    # against the Mapping ABC is slow.
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {str(k): _jsonable(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value
