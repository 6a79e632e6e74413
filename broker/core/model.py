"""The domain: workflow runs, targets, credential requests, decisions and leases. Pure data.

Every type is valid from construction and immutable; state changes produce new values
(``dataclasses.replace``). Times are timezone-aware UTC and always passed in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from broker.errors import BadRequestError, ConflictError, ForbiddenError

# Identifiers chosen by callers (run ids, task ids, target names, idempotency keys): short,
# printable, no separators that could confuse a Redis key or a Vault path.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_TEXT = 1024
MAX_LABELS = 32


def check_id(value: object, what: str) -> str:
    """``value`` if it is a valid identifier (1-128 of ``[A-Za-z0-9._:-]``), else a 400."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise BadRequestError(
            f"{what} must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter or "
            f"digit, got {shown!r}",
            reason=f"invalid.{what.replace(' ', '_')}",
        )
    return value


def check_text(value: object, what: str, *, limit: int = MAX_TEXT, required: bool = True) -> str:
    """``value`` if it is printable text of at most ``limit`` characters, else a 400."""
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRequestError(f"{what} must be a non-empty string", reason=f"invalid.{what}")
    if len(value) > limit or not value.isprintable():
        raise BadRequestError(
            f"{what} must be printable text of at most {limit} characters",
            reason=f"invalid.{what}",
        )
    return value


def _require_aware(moment: datetime, what: str) -> None:
    if moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")


class Sensitivity(StrEnum):
    """How sensitive the data behind a target is (ordered)."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    RESTRICTED = "restricted"

    @property
    def rank(self) -> int:
        """0 for public … 3 for restricted."""
        return list(Sensitivity).index(self)


class TargetKind(StrEnum):
    """What a target mints; each kind is one adapter class behind one interface."""

    VAULT_TOKEN = "vault-token"  # noqa: S105 - a kind name, not a secret
    DATABASE = "database"
    PKI = "pki"
    SSH = "ssh"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def epoch_micros(moment: datetime) -> int:
    """``moment`` in whole microseconds since the epoch: how Redis stores times (exact in JSON
    and, below 2^53, in sorted-set scores)."""
    return (moment - _EPOCH) // _MICROSECOND


def aware_time(text: str) -> datetime | None:
    """``text`` as an RFC 3339 time with an offset (``Z`` or ``±hh:mm``); None when it is not
    one (no offset, not a time)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.utcoffset() is not None else None


# The largest live-credential limit one can configure (per identity, or per identity and target).
MAX_LIVE_LIMIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Target:
    """A system an agent may get a credential for (``config/targets.toml``)."""

    name: str
    kind: TargetKind
    policies: tuple[str, ...]
    system: str
    environment: str
    sensitivity: Sensitivity
    max_ttl: timedelta
    mount: str = ""
    role: str = ""
    # False for kinds Vault cannot revoke early (SSH certificates): their TTL is clamped hard.
    revocable: bool = True
    # A standing static secret: isolated, shortest lifetime, reported for burn-down.
    legacy: bool = False
    description: str = ""
    # Kind-specific settings (pki: domain; ssh: valid_principals).
    params: Mapping[str, str] = field(default_factory=dict)
    # At most this many live credentials of this target per identity (0: only the broker-wide
    # per-identity limit applies).
    max_live_per_identity: int = 0

    def __post_init__(self) -> None:
        check_id(self.name, "target name")
        if not 0 <= self.max_live_per_identity <= MAX_LIVE_LIMIT:
            raise ValueError(
                f"target {self.name}: max_live_per_identity must be 0..{MAX_LIVE_LIMIT}"
            )
        if self.max_ttl <= timedelta(0):
            raise ValueError(f"target {self.name}: max_ttl must be positive")
        if not self.policies:
            raise ValueError(f"target {self.name}: needs at least one Vault policy")
        if self.kind is not TargetKind.VAULT_TOKEN and not (self.mount and self.role):
            raise ValueError(f"target {self.name}: kind {self.kind} needs mount and role")


class RunState(StrEnum):
    """Lifecycle of a workflow run: active, then one terminal state."""

    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class DelegationHop:
    """One link of the chain of privilege: who, in what role, and whether it was verified.

    ``verified`` means the broker authenticated this principal itself (an SVID or OIDC token
    on the request that created the hop); otherwise the hop was asserted by the previous one.
    """

    role: str
    principal: str
    verified: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (audit, policy context, Vault metadata)."""
        return {"role": self.role, "principal": self.principal, "verified": self.verified}


@dataclass(frozen=True, slots=True)
class DelegationChain:
    """owner → orchestrator → agent (→ sub-agent), in order."""

    hops: tuple[DelegationHop, ...]

    @property
    def fully_verified(self) -> bool:
        """True when every hop was verified by the broker."""
        return all(h.verified for h in self.hops)

    def extended(self, hop: DelegationHop) -> DelegationChain:
        """This chain with one more hop at the end."""
        return DelegationChain((*self.hops, hop))

    def as_list(self) -> list[dict[str, Any]]:
        """JSON-ready form."""
        return [h.as_dict() for h in self.hops]

    def compact(self) -> str:
        """``owner:alice>orchestrator:spiffe://…(v)>agent:spiffe://…(v)`` for Vault metadata."""
        return ">".join(
            f"{h.role}:{h.principal}{'(v)' if h.verified else '(a)'}" for h in self.hops
        )


@dataclass(frozen=True, slots=True)
class WorkflowRun:
    """One run of a workflow, owned by an accountable human."""

    id: str
    owner: str
    purpose: str
    started_by: str
    created_at: datetime
    deadline: datetime
    labels: Mapping[str, str] = field(default_factory=dict)
    # SPIFFE ID patterns (exact or `<id>/*`) of the agents that may ask for credentials in it.
    participants: tuple[str, ...] = ()
    state: RunState = RunState.ACTIVE
    ended_at: datetime | None = None
    outcome: str = ""

    def __post_init__(self) -> None:
        check_id(self.id, "workflow id")
        check_text(self.owner, "owner", limit=256)
        check_text(self.purpose, "purpose")
        _require_aware(self.created_at, "created_at")
        _require_aware(self.deadline, "deadline")
        if self.deadline <= self.created_at:
            raise BadRequestError(
                "deadline must be after the run starts", reason="invalid.deadline"
            )
        if len(self.labels) > MAX_LABELS:
            raise BadRequestError(f"at most {MAX_LABELS} labels", reason="invalid.labels")
        for key, value in self.labels.items():
            check_id(key, "label key")
            check_text(value, "label value", limit=256, required=False)
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    def is_active(self, now: datetime) -> bool:
        """Active and before its deadline."""
        return self.state is RunState.ACTIVE and now < self.deadline

    def inactive_error(self) -> ConflictError:
        """The error a credential request in this run gets when it is not active (409
        ``workflow.not_active``)."""
        return ConflictError(
            f"workflow run {self.id!r} is not active (state {self.state.value}, deadline "
            f"{self.deadline.isoformat()})",
            reason="workflow.not_active",
        )

    @property
    def chain(self) -> DelegationChain:
        """owner (asserted by the orchestrator) → orchestrator (verified)."""
        return DelegationChain(
            (
                DelegationHop("owner", self.owner, verified=False),
                DelegationHop("orchestrator", self.started_by, verified=True),
            )
        )


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    """An agent's request for a credential for one task of one run."""

    workflow_id: str
    task_id: str
    target: str
    ttl: timedelta
    justification: str = ""
    tool: str = ""
    approval_id: str | None = None
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        check_id(self.workflow_id, "workflow id")
        check_id(self.task_id, "task id")
        check_id(self.target, "target")
        if self.justification:
            check_text(self.justification, "justification")
        if self.tool:
            check_text(self.tool, "tool", limit=256)
        if self.approval_id is not None:
            check_id(self.approval_id, "approval id")
        if self.idempotency_key is not None:
            check_id(self.idempotency_key, "idempotency key")
        if not timedelta(seconds=1) <= self.ttl <= timedelta(days=1):
            raise BadRequestError(
                f"ttl must be between 1 s and 1 day, got {self.ttl.total_seconds():.0f} s",
                reason="invalid.ttl",
            )


class ActionName(StrEnum):
    """What a policy decision is about: the ``Action::"<name>"`` ids of the Cedar schema."""

    REQUEST_CREDENTIAL = "request_credential"


class DecisionOutcome(StrEnum):
    """A policy decision. Anything but an explicit allow is not an allow (fail closed)."""

    ALLOW = "allow"
    DENY = "deny"
    NEEDS_APPROVAL = "needs_approval"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome, the policy ids that produced it, and the full context evaluated."""

    outcome: DecisionOutcome
    policy_ids: tuple[str, ...]
    reasons: tuple[str, ...] = ()
    context: Mapping[str, Any] = field(default_factory=dict)
    # A TTL cap some policies impose (e.g. legacy targets, asserted delegation hops).
    max_ttl: timedelta | None = None
    # needs_approval only: how many distinct approvers the gates that fired ask for (the
    # largest @quorum among them; 1 when none sets one).
    approval_quorum: int = 1

    @property
    def allowed(self) -> bool:
        """True only for an explicit allow."""
        return self.outcome is DecisionOutcome.ALLOW


class LeaseState(StrEnum):
    """issuing → active → revoking → revoked | revoke_failed."""

    ISSUING = "issuing"
    ACTIVE = "active"
    REVOKING = "revoking"
    REVOKED = "revoked"
    REVOKE_FAILED = "revoke_failed"


@dataclass(frozen=True, slots=True)
class Lease:
    """The ledger entry of one credential. Never the secret itself."""

    credential_id: str
    workflow_id: str
    task_id: str
    target: str
    kind: TargetKind
    sensitivity: Sensitivity
    holder: str
    owner: str
    chain: DelegationChain
    issued_at: datetime
    expires_at: datetime
    state: LeaseState = LeaseState.ISSUING
    approval_id: str | None = None
    token_accessor: str = ""
    vault_lease_ids: tuple[str, ...] = ()
    revocable: bool = True
    revoke_reason: str = ""
    attempts: int = 0
    last_error: str = ""
    revoked_at: datetime | None = None
    # What the agent said it would use the credential with, and why: part of the request
    # policy decided on, kept so continuous authorization can decide it again.
    tool: str = ""
    justification: str = ""

    def __post_init__(self) -> None:
        _require_aware(self.issued_at, "issued_at")
        _require_aware(self.expires_at, "expires_at")
        if self.expires_at <= self.issued_at:
            raise ValueError("a lease must expire after it is issued")

    def is_expired(self, now: datetime) -> bool:
        """True at or after its expiry."""
        return now >= self.expires_at

    @property
    def is_live(self) -> bool:
        """Not yet confirmed revoked (issuing, active, revoking or revoke_failed)."""
        return self.state not in (LeaseState.REVOKED,)


# How long a run that is over but holds a credential whose revocation the ledger has not
# confirmed waits before retention looks at it again (the sweeper settles it meanwhile).
UNSETTLED_RECHECK: Final = timedelta(hours=1)


def run_over_at(run: WorkflowRun, leases: Iterable[Lease]) -> datetime:
    """When everything of ``run`` is over: it ended (or reached its deadline) and every
    credential issued in it expired, whatever its ledger state (OpenBao enforces the TTL of a
    task token whether or not its revocation was ever confirmed)."""
    over = run.deadline
    if run.ended_at is not None and run.ended_at < over:
        over = run.ended_at
    for lease in leases:
        over = max(over, lease.expires_at)
    return over


def purge_recheck_at(over: datetime, cutoff: datetime, *, unsettled: int) -> datetime | None:
    """None when a run that is over at ``over`` may be purged at ``cutoff`` (now minus the
    retention); else when to look at it again: when it will be over, or, while ``unsettled``
    of its credentials are live in the ledger (a revocation not confirmed yet: the record
    stays until the sweeper settles it, so its end is in the audit trail before it goes),
    ``UNSETTLED_RECHECK`` later."""
    if over > cutoff:
        return over
    if unsettled:
        return cutoff + UNSETTLED_RECHECK
    return None


def credential_ttl(
    *,
    requested: timedelta,
    target_max: timedelta,
    deadline: datetime,
    now: datetime,
    svid_expires_at: datetime | None = None,
    approval_expires_at: datetime | None = None,
    policy_max: timedelta | None = None,
) -> timedelta:
    """TTL = min(requested, target max, deadline - now, JWT-SVID expiry - now, approval
    validity - now, a policy cap), truncated to whole seconds (Vault TTLs are seconds).

    Raises :class:`BadRequestError` (``ttl.exhausted``) when less than one second remains.
    """
    bounds = [requested, target_max, deadline - now]
    if svid_expires_at is not None:
        bounds.append(svid_expires_at - now)
    if approval_expires_at is not None:
        bounds.append(approval_expires_at - now)
    if policy_max is not None:
        bounds.append(policy_max)
    ttl = timedelta(seconds=int(min(bounds).total_seconds()))
    if ttl < timedelta(seconds=1):
        raise BadRequestError(
            "no time is left for a credential: the run's deadline, the SVID or the approval "
            "ends now",
            reason="ttl.exhausted",
        )
    return ttl


class QuarantineKind(StrEnum):
    """What a quarantine blocks issuance for."""

    IDENTITY = "identity"
    IDENTITY_PREFIX = "identity_prefix"
    WORKFLOW = "workflow"
    TARGET = "target"


@dataclass(frozen=True, slots=True)
class Quarantine:
    """A block on new issuance for an identity (or an ID prefix), a run, or a target."""

    kind: QuarantineKind
    value: str
    reason: str
    created_by: str
    created_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        check_text(self.value, "quarantine value", limit=2048)
        check_text(self.reason, "reason")
        _require_aware(self.created_at, "created_at")
        _require_aware(self.expires_at, "expires_at")
        if self.expires_at <= self.created_at:
            raise BadRequestError("a quarantine must expire after it starts", reason="invalid.ttl")

    def is_active(self, now: datetime) -> bool:
        """True until it expires."""
        return now < self.expires_at

    def blocks(self, *, principal: str, workflow_id: str, target: str) -> bool:
        """True when this quarantine covers a request by ``principal`` in ``workflow_id`` for
        ``target``."""
        if self.kind is QuarantineKind.IDENTITY:
            return principal == self.value
        if self.kind is QuarantineKind.IDENTITY_PREFIX:
            return principal.startswith(self.value)
        if self.kind is QuarantineKind.WORKFLOW:
            return workflow_id == self.value
        return target == self.value

    def refusal(self) -> ForbiddenError:
        """The error a request this quarantine blocks gets (403 ``quarantine.active``)."""
        return ForbiddenError(
            f"issuance is quarantined: {self.kind.value} {self.value!r} until "
            f"{self.expires_at.isoformat()} ({self.reason})",
            reason="quarantine.active",
        )


def refuse_quarantined(
    quarantines: Iterable[Quarantine], *, principal: str, workflow_id: str, target: str
) -> None:
    """Raise the refusal of the first of ``quarantines`` that covers this request."""
    for quarantine in quarantines:
        if quarantine.blocks(principal=principal, workflow_id=workflow_id, target=target):
            raise quarantine.refusal()
