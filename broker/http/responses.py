"""What the API answers: the shape of every JSON body the routes build, as typed dicts.

The routes build their bodies by hand (``run_json``, ``lease_json``, ``report_json``, …); these
types describe those bodies for the OpenAPI document (:mod:`broker.http.openapi`), which
generates its response schemas from them. They are held to the routes in two ways: unit tests
pass real domain objects through the routes' own functions and validate the result against
these types (unknown keys are refused: ``extra="forbid"``), and the schemathesis run against
the live broker validates every response against the generated schemas.

``NotRequired`` marks a key a route leaves out (rather than sending ``null``) in some answers.
Times are RFC 3339 strings with an offset (``datetime.isoformat()`` of aware datetimes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, WithJsonSchema, with_config
from typing_extensions import TypedDict

from broker.core.approvals import ApprovalStatus, Verdict
from broker.core.audit import EventType
from broker.core.model import LeaseState, QuarantineKind, RunState, Sensitivity, TargetKind
from broker.core.roles import Role
from broker.errors import ApprovalPendingError, TaskleaseError
from broker.revocation import SettleOutcome

# Every body the broker builds is closed: a key added to a route must be added here too.
_CLOSED = ConfigDict(extra="forbid")


@with_config(_CLOSED)
class Health(TypedDict):
    """``GET /healthz``: the process serves requests."""

    status: Literal["ok"]


@with_config(_CLOSED)
class ReadinessCheckView(TypedDict):
    """One dependency's readiness."""

    ok: bool
    detail: str
    alarm: NotRequired[Literal[True]]


@with_config(_CLOSED)
class Readiness(TypedDict):
    """``GET /readyz``: each check by name (redis, vault, workload_api, policy, audit,
    continuous)."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, ReadinessCheckView]


@with_config(_CLOSED)
class WhoAmI(TypedDict):
    """``GET /v1/whoami``: the caller as the broker verified it."""

    principal: str
    roles: list[Role]
    expires_at: datetime
    method: Literal["x509-svid", "jwt-svid", "oidc"]
    trust_domain: NotRequired[str]
    display: NotRequired[str]


@with_config(_CLOSED)
class Hop(TypedDict):
    """One link of a delegation chain (owner → orchestrator → agent …)."""

    role: str
    principal: str
    verified: bool


@with_config(_CLOSED)
class RunView(TypedDict):
    """A workflow run."""

    id: str
    owner: str
    purpose: str
    started_by: str
    created_at: datetime
    deadline: datetime
    labels: dict[str, str]
    participants: list[str]
    state: RunState
    ended_at: datetime | None
    outcome: str
    delegation_chain: list[Hop]


@with_config(_CLOSED)
class RunList(TypedDict):
    """``GET /v1/workflows``: one page of runs, latest over first."""

    runs: list[RunView]
    next_cursor: str | None


@with_config(_CLOSED)
class LeaseView(TypedDict):
    """A credential's metadata (never its secret)."""

    credential_id: str
    workflow_id: str
    task_id: str
    target: str
    kind: TargetKind
    sensitivity: Sensitivity
    holder: str
    owner: str
    state: LeaseState
    issued_at: datetime
    expires_at: datetime
    revocable: bool
    approval_id: str | None
    token_accessor: str
    delegation_chain: list[Hop]
    revoke_reason: str


@with_config(_CLOSED)
class RunWithCredentials(RunView):
    """``GET /v1/workflows/{id}``: the run and its credentials' metadata."""

    credentials: list[LeaseView]


@with_config(_CLOSED)
class CredentialView(LeaseView):
    """``GET /v1/credentials/{id}``: metadata with the revocation progress."""

    attempts: int
    last_error: str
    revoked_at: datetime | None


@with_config(_CLOSED)
class IssuedCredential(LeaseView):
    """``POST /v1/credentials`` 201: the secret, sent exactly once (``Cache-Control:
    no-store``). ``note`` says when the credential cannot be revoked early."""

    ttl_seconds: int
    policy_ids: list[str]
    secret: dict[str, Any]
    note: NotRequired[str]


@with_config(_CLOSED)
class ApprovalPending(TypedDict):
    """``POST /v1/credentials`` 202: the request waits for an approval (``Location`` and
    ``poll_url`` name it); retry the same request with ``approval_id`` once it is approved."""

    status: Literal["approval_pending"]
    approval_id: str
    state: ApprovalStatus
    quorum: int
    approver_count: int
    expires_at: datetime
    policy_ids: list[str]
    reused: bool
    poll_url: str
    detail: str


@with_config(_CLOSED)
class VoteView(TypedDict):
    """One approver's decision."""

    principal: str
    display: str
    decision: Verdict
    comment: str
    at: datetime


@with_config(_CLOSED)
class ApprovalLinks(TypedDict):
    """Where to poll, decide and withdraw."""

    self: str
    decision: str
    withdraw: str


@with_config(_CLOSED)
class ApprovalView(TypedDict):
    """An approval; ``params`` names the request's parameters (their values are not shown)."""

    id: str
    state: ApprovalStatus
    workflow_id: str
    task_id: str
    target: str
    ttl_seconds: int
    holder: str
    owner: str
    params: list[str]
    request_digest: str
    quorum: int
    approver_count: int
    approvers: list[str]
    decisions: list[VoteView]
    policy_ids: list[str]
    reasons: list[str]
    justification: str
    delegation_chain: list[Hop]
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    closed_by: str
    close_comment: str
    credential_id: str | None
    links: ApprovalLinks


@with_config(_CLOSED)
class ApprovalList(TypedDict):
    """``GET /v1/approvals``, newest first."""

    approvals: list[ApprovalView]


@with_config(_CLOSED)
class RevokedEntry(TypedDict):
    """A credential confirmed revoked. The lease fields are absent when the ledger has no
    record of it."""

    credential_id: str
    workflow_id: NotRequired[str]
    task_id: NotRequired[str]
    target: NotRequired[str]
    kind: NotRequired[TargetKind]
    holder: NotRequired[str]
    state: NotRequired[LeaseState]
    reason: str
    revoked_at: datetime | None


@with_config(_CLOSED)
class LiveEntry(TypedDict):
    """A credential still live, with why (``reason``) and when the broker tries again."""

    credential_id: str
    workflow_id: NotRequired[str]
    task_id: NotRequired[str]
    target: NotRequired[str]
    kind: NotRequired[TargetKind]
    holder: NotRequired[str]
    state: NotRequired[LeaseState]
    reason: SettleOutcome
    detail: str
    attempts: NotRequired[int]
    last_error: NotRequired[str]
    expires_at: NotRequired[datetime]
    next_attempt_at: datetime | None


@with_config(_CLOSED)
class ReportCounts(TypedDict):
    """How many of each."""

    confirmed_revoked: int
    still_live: int


@with_config(_CLOSED)
class RevocationReport(TypedDict):
    """What a revocation did: 200 when ``complete``, 207 when anything is still live.
    ``truncated``: more leases matched than one report covers (10 000). A forced revocation or
    a completion made every one of them due now all the same: the rest are due now and the
    sweeper revokes them (no need to repeat the call). ``scheduled`` (forced revocation only):
    how many leases the call made due now, listed or not."""

    complete: bool
    truncated: bool
    scheduled: NotRequired[int]
    counts: ReportCounts
    confirmed_revoked: list[RevokedEntry]
    still_live: list[LiveEntry]


@with_config(_CLOSED)
class CompletionScheduled(TypedDict):
    """``POST /v1/workflows/{id}/complete`` 202: the run ended, these credentials are due."""

    workflow: RunView
    scheduled: list[str]


@with_config(_CLOSED)
class CompletionReport(TypedDict):
    """``POST /v1/workflows/{id}/complete?wait=true`` 200/207: the run and the report."""

    workflow: RunView
    report: RevocationReport


@with_config(_CLOSED)
class QuarantineView(TypedDict):
    """A quarantine: new issuance blocked until ``expires_at`` or a lift."""

    kind: QuarantineKind
    value: str
    reason: str
    created_by: str
    created_at: datetime
    expires_at: datetime


@with_config(_CLOSED)
class QuarantineList(TypedDict):
    """``GET /v1/quarantines``: the quarantines in force."""

    quarantines: list[QuarantineView]


@with_config(_CLOSED)
class LiftedSubject(TypedDict):
    """What was lifted."""

    kind: QuarantineKind
    value: str


@with_config(_CLOSED)
class QuarantineLifted(TypedDict):
    """``DELETE /v1/quarantines``."""

    lifted: LiftedSubject


@with_config(_CLOSED)
class TargetView(TypedDict):
    """A target as callers see it (never a Vault path or policy name)."""

    name: str
    kind: TargetKind
    system: str
    environment: str
    sensitivity: Sensitivity
    max_ttl_seconds: int
    revocable: bool
    legacy: bool
    description: str


@with_config(_CLOSED)
class TargetList(TypedDict):
    """``GET /v1/targets``, by name."""

    targets: list[TargetView]


@with_config(_CLOSED)
class UsageView(TypedDict):
    """A holder's or owner's credentials of a legacy target."""

    who: str
    credentials: int
    last_issued_at: datetime


@with_config(_CLOSED)
class LegacyTargetView(TypedDict):
    """What the ledger shows of one legacy target (``complete`` false: the read stopped at
    its bound, and the figures are a lower bound)."""

    target: TargetView
    unused: bool
    credentials: int
    live: int
    runs: int
    first_issued_at: datetime | None
    last_issued_at: datetime | None
    holders: list[UsageView]
    holder_count: int
    owners: list[UsageView]
    owner_count: int
    complete: bool


@with_config(_CLOSED)
class LegacyReportView(TypedDict):
    """``GET /v1/reports/legacy``: every legacy target of the catalog in force, most recently
    used first, unused ones last."""

    generated_at: datetime
    since: datetime | None
    ledger_retention_days: int
    targets: list[LegacyTargetView]


@with_config(_CLOSED)
class LeaseList(TypedDict):
    """``GET /v1/leases``."""

    leases: list[LeaseView]
    limit: int
    count: int


@with_config(_CLOSED)
class ReportedEventView(TypedDict):
    """``POST /v1/events`` 201: the audit event recorded (empty ids: not applicable)."""

    event_id: str
    type: EventType
    time: datetime
    workflow_id: str
    task_id: str
    credential_id: str


@with_config(_CLOSED)
class AuditPageView(TypedDict):
    """``GET /v1/audit``: one page, oldest first. Each event is a chained audit record
    (``format=tasklease``: ``event_id``, ``time``, ``type``, ``actor``, ``chain``, the
    correlation ids, the event's own fields, ``writer``, ``seq``, ``prev_hash``, ``hash``) or
    its OCSF API Activity form (``format=ocsf``)."""

    events: list[dict[str, Any]]
    next_cursor: str | None
    scanned: int
    format: Literal["tasklease", "ocsf"]


def problem_codes() -> list[str]:
    """Every ``code`` a problem can carry: one per class of the error tree (broker/errors.py).
    ``approval_pending`` is not among them: it is answered as a 202, never as a problem."""
    codes: set[str] = set()
    pending = [TaskleaseError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not issubclass(cls, ApprovalPendingError):
            codes.add(cls.code)
    return sorted(codes)


# aiohttp's own refusals (unknown path 404, method 405, body over the limit 413) keep their
# status and get the code ``http_<status>`` (broker/http/problems.py).
_CODE = WithJsonSchema(
    {"type": "string", "anyOf": [{"enum": problem_codes()}, {"pattern": "^http_[45][0-9]{2}$"}]}
)
_STATUS = WithJsonSchema({"type": "integer", "minimum": 400, "maximum": 599})
_TYPE_URI = WithJsonSchema({"type": "string", "format": "uri"})


@with_config(ConfigDict(extra="allow"))
class Problem(TypedDict):
    """An RFC 9457 problem (``application/problem+json``). ``code`` is stable per error class,
    ``reason`` a finer stable code (present when it differs from ``code``); some problems add
    members a client can act on (``policy_ids``, ``credential_id``)."""

    type: Annotated[str, _TYPE_URI]
    title: str
    status: Annotated[int, _STATUS]
    code: Annotated[str, _CODE]
    detail: str
    reason: NotRequired[str]
    request_id: NotRequired[str]
    policy_ids: NotRequired[list[str]]
    credential_id: NotRequired[str]
