"""Approvals: a human (or an approval bot) decides one exact credential request. Pure data.

An :class:`Approval` is opened when the policy answers ``needs_approval`` and every rule of it
lives here, with time passed in:

* **Bound to the request.** :class:`ApprovalSubject` is what was asked (run, task, target,
  requested TTL, holder, and the kind-specific parameters such as the SSH public key to sign);
  its SHA-256 :meth:`~ApprovalSubject.digest` over a canonical JSON encoding is stored in the
  approval. An approval presented with any other request is refused (``approval.digest_mismatch``).
* **Quorum.** It becomes ``approved`` once ``quorum`` *distinct* approvers approved (the quorum
  comes from the approval gates that fired: ``@quorum("N")``, default 1). One deny by any
  approver is final (``denied``).
* **Separation of duties.** Nobody approves their own request (approver ≠ the requesting
  workload's SPIFFE ID) or a request of a run they own (approver ≠ the run's owner, compared
  with the approver's principal id — ``oidc:<issuer>#<sub>`` for people — and, for people, also
  with their verified display name, because owners are usually recorded by e-mail address).
* **Expires.** Pending or approved, it is good until ``expires_at``; a credential issued under
  it lives no longer than that either (``core.model.credential_ttl``).
* **Withdrawable** while pending or approved, so it is never used; and after its use, which
  leaves an audit trail of the retraction and lets continuous authorization decide the
  credential issued under it again (a used approval that is withdrawn no longer counts).
* **Single use.** :meth:`Approval.consume` turns an approved approval into ``used`` and records
  the credential id; stores apply every transition with a compare-and-set on ``version``, so
  of two concurrent uses exactly one wins.
* **Released when nothing was minted.** :meth:`Approval.release` undoes one use whose credential
  never came to exist (the mint was definitely refused, or the attempt failed before minting):
  ``used`` → ``approved`` and unused again, only while it is still used by exactly that
  credential, unchanged since (same ``version``) and unexpired. Anything else is refused
  (``approval.not_releasable``); a second release of the same use is refused too (the version
  moved), so a release is never applied twice.

States: ``pending`` → ``approved`` → ``used``; ``used`` → ``approved`` (released);
``pending`` → ``denied``; ``pending`` | ``approved`` → ``expired``; ``pending`` | ``approved`` |
``used`` → ``withdrawn``. ``denied``, ``withdrawn`` and ``expired`` are final; ``used`` only
leads to ``withdrawn`` or, released, back to ``approved``. ``expired`` is
also *derived*: :meth:`Approval.status_at` reports an open approval past its expiry as expired
before any store has recorded it.

Errors carry stable reason codes (``broker.errors``): ``approval.not_found``,
``approval.not_pending``, ``approval.expired``, ``approval.withdrawn``, ``approval.denied``,
``approval.used``, ``approval.digest_mismatch``, ``approval.quorum_not_reached``,
``approval.sod_violation``, ``approval.not_approver``, ``approval.duplicate_approver``,
``approval.not_releasable`` (internal: a release is best effort and never answers a client)
(and, from the use cases, ``approval.insufficient`` and ``approval.contended``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from broker.core.model import (
    DelegationChain,
    DelegationHop,
    check_id,
    check_text,
    epoch_micros,
)
from broker.errors import ApprovalRefusedError, ApprovalStateError, BadRequestError

APPROVAL_ID: Final = re.compile(r"apr_[0-9a-f]{24}")
MAX_QUORUM: Final = 10
MAX_COMMENT: Final = 1024
SYSTEM_ACTOR: Final = "tasklease"
_DIGEST_VERSION: Final = 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


class ApprovalStatus(StrEnum):
    """Where an approval stands."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    WITHDRAWN = "withdrawn"
    USED = "used"
    EXPIRED = "expired"

    @property
    def is_open(self) -> bool:
        """Pending or approved: not final yet."""
        return self in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED)


class Verdict(StrEnum):
    """What one approver decided."""

    APPROVE = "approve"
    DENY = "deny"


def new_approval_id() -> str:
    """A fresh, unguessable approval id (``apr_`` + 96 random bits in hex)."""
    return f"apr_{secrets.token_hex(12)}"


def check_approval_id(value: object) -> str:
    """``value`` if it is shaped like an approval id, else a 400 (before any lookup)."""
    if not isinstance(value, str) or APPROVAL_ID.fullmatch(value) is None:
        raise BadRequestError(
            "approval id must look like apr_<24 hex digits>", reason="invalid.approval_id"
        )
    return value


@dataclass(frozen=True, slots=True)
class ApprovalSubject:
    """Exactly what an approval approves: one request of one holder."""

    workflow_id: str
    task_id: str
    target: str
    ttl_seconds: int
    holder: str
    params: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_id(self.workflow_id, "workflow id")
        check_id(self.task_id, "task id")
        check_id(self.target, "target")
        if not 1 <= self.ttl_seconds <= 86_400:
            raise ValueError(f"ttl_seconds must be 1..86400, got {self.ttl_seconds}")
        check_text(self.holder, "holder", limit=2048)
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the subject: sorted keys, no whitespace,
        UTF-8, a version number first so the encoding can change without collisions."""
        material = json.dumps(
            {
                "v": _DIGEST_VERSION,
                "workflow_id": self.workflow_id,
                "task_id": self.task_id,
                "target": self.target,
                "ttl_seconds": self.ttl_seconds,
                "holder": self.holder,
                "params": dict(sorted(self.params.items())),
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(material.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Vote:
    """One approver's decision."""

    principal: str
    display: str
    verdict: Verdict
    at: datetime
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval and its history. Transitions return a new value with ``version + 1``."""

    id: str
    subject: ApprovalSubject
    digest: str
    owner: str
    chain: DelegationChain
    created_at: datetime
    expires_at: datetime
    quorum: int = 1
    policy_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    justification: str = ""
    state: ApprovalStatus = ApprovalStatus.PENDING
    votes: tuple[Vote, ...] = ()
    # Bumped by every transition: stores compare-and-set on it.
    version: int = 1
    # When, by whom and why it became denied, withdrawn, used or expired.
    closed_at: datetime | None = None
    closed_by: str = ""
    close_comment: str = ""
    # The credential issued under it (once used).
    credential_id: str = ""

    def __post_init__(self) -> None:
        if APPROVAL_ID.fullmatch(self.id) is None:
            raise ValueError(f"approval id {self.id!r} is not apr_<24 hex digits>")
        if self.digest != self.subject.digest():
            raise ValueError(f"approval {self.id}: digest does not match its subject")
        for moment, what in ((self.created_at, "created_at"), (self.expires_at, "expires_at")):
            if moment.utcoffset() is None:
                raise ValueError(f"{what} must be timezone-aware")
        if self.expires_at <= self.created_at:
            raise ValueError(f"approval {self.id}: expires_at must be after created_at")
        if not 1 <= self.quorum <= MAX_QUORUM:
            raise ValueError(f"approval {self.id}: quorum must be 1..{MAX_QUORUM}")
        if self.version < 1:
            raise ValueError(f"approval {self.id}: version must be positive")

    # ---- construction

    @classmethod
    def open(
        cls,
        *,
        subject: ApprovalSubject,
        owner: str,
        chain: DelegationChain,
        now: datetime,
        validity: timedelta,
        quorum: int = 1,
        policy_ids: tuple[str, ...] = (),
        reasons: tuple[str, ...] = (),
        justification: str = "",
        approval_id: str | None = None,
    ) -> Approval:
        """A new pending approval for ``subject``, valid for ``validity`` from ``now``."""
        if validity <= timedelta(0):
            raise ValueError("approval validity must be positive")
        return cls(
            id=approval_id or new_approval_id(),
            subject=subject,
            digest=subject.digest(),
            owner=owner,
            chain=chain,
            created_at=now,
            expires_at=now + validity,
            quorum=min(max(quorum, 1), MAX_QUORUM),
            policy_ids=policy_ids,
            reasons=reasons,
            justification=justification,
        )

    # ---- reading

    def status_at(self, now: datetime) -> ApprovalStatus:
        """The state as of ``now``: an open approval past its expiry is expired."""
        if self.state.is_open and now >= self.expires_at:
            return ApprovalStatus.EXPIRED
        return self.state

    @property
    def approvers(self) -> tuple[str, ...]:
        """The distinct principals that approved, in the order they did."""
        seen: dict[str, None] = {}
        for vote in self.votes:
            if vote.verdict is Verdict.APPROVE:
                seen.setdefault(vote.principal, None)
        return tuple(seen)

    @property
    def holder(self) -> str:
        """The workload the credential would be issued to (the requester)."""
        return self.subject.holder

    # ---- transitions

    def decide(
        self,
        *,
        approver: str,
        display: str,
        verdict: Verdict,
        now: datetime,
        comment: str = "",
    ) -> Approval:
        """Record one approver's verdict: approve (approved once the quorum is reached) or
        deny (final). Refused when the approval is not pending, or by separation of duties."""
        comment = _comment(comment)
        self._require_status(now, ApprovalStatus.PENDING, action="be decided")
        self._check_separation_of_duties(approver, display)
        if any(vote.principal == approver for vote in self.votes):
            raise ApprovalStateError(
                f"{approver} already decided approval {self.id}; each approver counts once",
                reason="approval.duplicate_approver",
            )
        votes = (*self.votes, Vote(approver, display, verdict, now, comment))
        if verdict is Verdict.DENY:
            return self._next(
                state=ApprovalStatus.DENIED,
                votes=votes,
                closed_at=now,
                closed_by=approver,
                close_comment=comment,
            )
        approved = dataclasses.replace(self, votes=votes)
        if len(approved.approvers) >= self.quorum:
            return self._next(state=ApprovalStatus.APPROVED, votes=votes)
        return self._next(votes=votes)

    def withdraw(self, *, by: str, now: datetime, comment: str = "") -> Approval:
        """Withdraw an approval: pending or approved (it will never be used), or used (the
        credential issued under it is then no longer backed by an approval)."""
        comment = _comment(comment)
        status = self.status_at(now)
        if not (status.is_open or status is ApprovalStatus.USED):
            raise _final_error(self, status, action="be withdrawn")
        return self._next(
            state=ApprovalStatus.WITHDRAWN, closed_at=now, closed_by=by, close_comment=comment
        )

    def expire(self, now: datetime) -> Approval:
        """Record the expiry of an open approval whose time is up."""
        if (
            self.status_at(now) is not ApprovalStatus.EXPIRED
            or self.state is ApprovalStatus.EXPIRED
        ):
            raise ValueError(f"approval {self.id} is not due to expire at {now.isoformat()}")
        return self._next(
            state=ApprovalStatus.EXPIRED, closed_at=self.expires_at, closed_by=SYSTEM_ACTOR
        )

    def check_usable(self, digest: str, now: datetime) -> None:
        """Raise unless this approval may authorize the request with ``digest`` at ``now``:
        bound to that exact request first (a foreign approval reveals nothing more), then
        approved, unexpired, unused."""
        if not secrets.compare_digest(digest, self.digest):
            raise ApprovalRefusedError(
                f"approval {self.id} was granted for another request (run, task, target, "
                "ttl, holder or parameters differ); ask again with this exact request",
                reason="approval.digest_mismatch",
            )
        status = self.status_at(now)
        if status is ApprovalStatus.PENDING:
            raise ApprovalStateError(
                f"approval {self.id} has {len(self.approvers)} of the {self.quorum} approval(s) "
                "it needs; poll it and retry once it is approved",
                reason="approval.quorum_not_reached",
            )
        if status is not ApprovalStatus.APPROVED:
            raise _final_error(self, status, action="be used")

    def consume(self, *, digest: str, credential_id: str, now: datetime) -> Approval:
        """Use the approval for one credential: approved → used (single use)."""
        self.check_usable(digest, now)
        check_id(credential_id, "credential id")
        return self._next(
            state=ApprovalStatus.USED,
            credential_id=credential_id,
            closed_at=now,
            closed_by=self.subject.holder,
        )

    def release(self, *, credential_id: str, version: int, now: datetime) -> Approval:
        """Undo the use that ``consume`` recorded as ``version`` for ``credential_id``, when
        that credential was never minted: used → approved and unused (no credential id, not
        closed). Refused (``approval.not_releasable``) unless the approval is still exactly that
        use — used, by ``credential_id``, at ``version`` (nothing happened since, not even an
        earlier release) — and unexpired at ``now``."""
        if (
            self.state is not ApprovalStatus.USED
            or self.credential_id != credential_id
            or self.version != version
        ):
            raise ApprovalStateError(
                f"approval {self.id} is {self.state.value} (version {self.version}, credential "
                f"{self.credential_id or 'none'}), not the use of version {version} for "
                f"{credential_id}; it cannot be released",
                reason="approval.not_releasable",
            )
        if now >= self.expires_at:
            raise ApprovalStateError(
                f"approval {self.id} expired at {self.expires_at.isoformat()}; it cannot be "
                "released",
                reason="approval.not_releasable",
            )
        return self._next(
            state=ApprovalStatus.APPROVED,
            credential_id="",
            closed_at=None,
            closed_by="",
            close_comment="",
        )

    # ---- helpers

    def _next(self, **changes: Any) -> Approval:
        return dataclasses.replace(self, version=self.version + 1, **changes)

    def _require_status(self, now: datetime, wanted: ApprovalStatus, *, action: str) -> None:
        status = self.status_at(now)
        if status is wanted:
            return
        if status is ApprovalStatus.APPROVED:
            raise ApprovalStateError(
                f"approval {self.id} is approved already (quorum {self.quorum} reached); it "
                f"cannot {action} any more",
                reason="approval.not_pending",
            )
        raise _final_error(self, status, action=action)

    def _check_separation_of_duties(self, approver: str, display: str) -> None:
        if approver == self.subject.holder:
            raise ApprovalRefusedError(
                f"{approver} requested this credential and cannot approve it "
                "(separation of duties)",
                reason="approval.sod_violation",
            )
        owner = self.owner.casefold()
        if approver.casefold() == owner or (display and display.casefold() == owner):
            raise ApprovalRefusedError(
                f"{approver} owns run {self.subject.workflow_id!r} and cannot approve its "
                "requests (separation of duties)",
                reason="approval.sod_violation",
            )


def _comment(comment: str) -> str:
    if not comment:
        return ""
    return check_text(comment, "comment", limit=MAX_COMMENT)


def _final_error(approval: Approval, status: ApprovalStatus, *, action: str) -> ApprovalStateError:
    when = approval.closed_at.isoformat() if approval.closed_at else approval.expires_at.isoformat()
    detail = {
        ApprovalStatus.EXPIRED: f"approval {approval.id} expired at "
        f"{approval.expires_at.isoformat()}",
        ApprovalStatus.WITHDRAWN: f"approval {approval.id} was withdrawn by "
        f"{approval.closed_by} at {when}",
        ApprovalStatus.DENIED: f"approval {approval.id} was denied by {approval.closed_by} at "
        f"{when}; a denial is final",
        ApprovalStatus.USED: f"approval {approval.id} was used for credential "
        f"{approval.credential_id} at {when}; an approval is good for one credential",
    }.get(status, f"approval {approval.id} is {status.value}")
    return ApprovalStateError(f"{detail}; it cannot {action}", reason=f"approval.{status.value}")


# --------------------------------------------------------------------------- JSON forms


def approval_view(approval: Approval, now: datetime) -> dict[str, Any]:
    """The approval as the API and the webhooks show it (never a secret; the subject's
    parameters are shown by name only, their values are request material)."""
    subject = approval.subject
    return {
        "id": approval.id,
        "state": approval.status_at(now).value,
        "workflow_id": subject.workflow_id,
        "task_id": subject.task_id,
        "target": subject.target,
        "ttl_seconds": subject.ttl_seconds,
        "holder": subject.holder,
        "owner": approval.owner,
        "params": sorted(subject.params),
        "request_digest": approval.digest,
        "quorum": approval.quorum,
        "approver_count": len(approval.approvers),
        "approvers": list(approval.approvers),
        "decisions": [
            {
                "principal": vote.principal,
                "display": vote.display,
                "decision": vote.verdict.value,
                "comment": vote.comment,
                "at": vote.at.isoformat(),
            }
            for vote in approval.votes
        ],
        "policy_ids": list(approval.policy_ids),
        "reasons": list(approval.reasons),
        "justification": approval.justification,
        "delegation_chain": approval.chain.as_list(),
        "created_at": approval.created_at.isoformat(),
        "expires_at": approval.expires_at.isoformat(),
        "closed_at": approval.closed_at.isoformat() if approval.closed_at else None,
        "closed_by": approval.closed_by,
        "close_comment": approval.close_comment,
        "credential_id": approval.credential_id or None,
    }


# Every Approval field, and only those, is written by encode_approval; a test compares this
# with the dataclass, so a field added to Approval cannot slip into (or out of) storage unseen.
STORED_APPROVAL_FIELDS: Final = frozenset(
    {
        "id",
        "subject",
        "digest",
        "owner",
        "chain",
        "created_at",
        "expires_at",
        "quorum",
        "policy_ids",
        "reasons",
        "justification",
        "state",
        "votes",
        "version",
        "closed_at",
        "closed_by",
        "close_comment",
        "credential_id",
    }
)


def _moment(value: object) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected integer microseconds, got {type(value).__name__}")
    return _EPOCH + value * _MICROSECOND


def encode_approval(approval: Approval) -> str:
    """Compact JSON of an approval for storage (times as integer microseconds)."""
    subject = approval.subject
    doc: dict[str, Any] = {
        "v": 1,
        "id": approval.id,
        "s": {
            "w": subject.workflow_id,
            "t": subject.task_id,
            "g": subject.target,
            "ttl": subject.ttl_seconds,
            "h": subject.holder,
            "p": dict(subject.params),
        },
        "d": approval.digest,
        "o": approval.owner,
        "ch": [[h.role, h.principal, int(h.verified)] for h in approval.chain.hops],
        "ca": epoch_micros(approval.created_at),
        "ea": epoch_micros(approval.expires_at),
        "q": approval.quorum,
        "pi": list(approval.policy_ids),
        "rs": list(approval.reasons),
        "j": approval.justification,
        "st": approval.state.value,
        "vo": [
            [vote.principal, vote.display, vote.verdict.value, epoch_micros(vote.at), vote.comment]
            for vote in approval.votes
        ],
        "ver": approval.version,
        "cb": approval.closed_by,
        "cc": approval.close_comment,
        "cr": approval.credential_id,
    }
    if approval.closed_at is not None:
        doc["cl"] = epoch_micros(approval.closed_at)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def decode_approval(raw: str) -> Approval:
    """The approval :func:`encode_approval` wrote; ``ValueError`` for anything else."""
    try:
        doc = json.loads(raw)
        stored = doc["s"]
        closed = doc.get("cl")
        return Approval(
            id=str(doc["id"]),
            subject=ApprovalSubject(
                workflow_id=str(stored["w"]),
                task_id=str(stored["t"]),
                target=str(stored["g"]),
                ttl_seconds=int(stored["ttl"]),
                holder=str(stored["h"]),
                params={str(k): str(v) for k, v in stored["p"].items()},
            ),
            digest=str(doc["d"]),
            owner=str(doc["o"]),
            chain=DelegationChain(
                tuple(
                    DelegationHop(str(role), str(principal), bool(verified))
                    for role, principal, verified in doc["ch"]
                )
            ),
            created_at=_moment(doc["ca"]),
            expires_at=_moment(doc["ea"]),
            quorum=int(doc["q"]),
            policy_ids=tuple(str(p) for p in doc["pi"]),
            reasons=tuple(str(r) for r in doc["rs"]),
            justification=str(doc["j"]),
            state=ApprovalStatus(doc["st"]),
            votes=tuple(
                Vote(str(principal), str(display), Verdict(verdict), _moment(at), str(comment))
                for principal, display, verdict, at, comment in doc["vo"]
            ),
            version=int(doc["ver"]),
            closed_at=None if closed is None else _moment(closed),
            closed_by=str(doc["cb"]),
            close_comment=str(doc["cc"]),
            credential_id=str(doc["cr"]),
        )
    except (KeyError, TypeError, AttributeError, BadRequestError) as exc:
        raise ValueError(f"not an approval record: {type(exc).__name__}") from None
