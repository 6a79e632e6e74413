"""Approval use cases: open (or reuse) an approval when policy answers needs_approval, verify
and use the one an agent presents, and let approvers decide and requesters withdraw.

The flow, as the credential broker drives it::

    agent:    POST /v1/credentials {...}                 → policy: needs_approval
    broker:   open_or_reuse → 202 {approval_id, poll_url}    (approval.requested, webhook)
    approver: POST /v1/approvals/{id}/decision approve   → approved at quorum (approval.decided)
    agent:    GET /v1/approvals/{id} until approved, then
              POST /v1/credentials {..., approval_id}    → verify_presented (bound to this
                                                           exact request, approved, unexpired,
                                                           unused) → policy decided *again*
                                                           with the approval in context →
                                                           consume (single use) → mint

Who may do what:

* **decide** (approve | deny): callers with the ``approver`` role — a person with an OIDC ID
  token, or an approval bot with its SVID — who are neither the requester nor the run's owner
  (``core.approvals``).
* **read** one approval: its requester (to poll), approvers and admins; anyone else gets 404.
  **List**: approvers and admins.
* **withdraw**: the requester (it no longer needs it), any approver and any admin. Withdrawing
  only ever removes privilege, so it is open to everyone who may see the approval. A used
  approval can be withdrawn too; the withdrawal hook (:class:`WithdrawalHook`: continuous
  authorization) then decides the credential issued under it again.

Withdrawing a used approval, in order: the hook notes durably that its credential must be
decided again (:meth:`WithdrawalHook.before_withdrawal`), *then* the withdrawal is stored,
audited and notified, and then the hook decides the credential
(:meth:`WithdrawalHook.withdrawn`). A broker killed at any point after the withdrawal is stored
leaves the note to the next start. A note the hook fails to take never blocks the withdrawal
(it is logged; the hook takes it again afterwards). When the withdrawal fails, the store says
what happened: withdrawn after all (stored before the error, or by someone else) → the
credential is decided now; not withdrawn → the note is discarded
(:meth:`WithdrawalHook.not_withdrawn`); the store unreadable → the note stays, and the next
start decides the credential under whatever the store then says (harmless either way).

Single use and a failed mint: the approval is *used* atomically (compare-and-set in the store)
right before the lease is written ahead, bound to the new credential id, so two concurrent
retries (or replicas) can never turn one approval into two credentials. If that attempt then
ends with nothing minted — Vault definitely refused the mint, or the idempotency check or the
write-ahead failed before minting — the broker *releases* it (:meth:`Approvals.release`: used
→ approved again, a compare-and-set that only succeeds while it is still that very use) and
the agent's retry with the same approval can succeed. Never released when a credential may
exist: a mint whose outcome is unknown, or one minted and then revoked (the record or audit
failed). A release that fails leaves the approval used (logged); the agent asks again.

Audit: every step is an event (``approval.requested``; ``approval.decided`` with the decision
``approve`` | ``deny`` | ``withdraw`` | ``use`` | ``release`` | ``expire``), recorded right
after the step is stored. If the audit trail refuses the event, the step is undone (the
previous version is written back) and the caller gets 503 ``audit_unavailable``: no approval
step takes effect without its audit record. Expiry is recorded lazily, by the first operation
that finds an open approval past its time.

Notifications (``ApprovalNotifier``) go out after the audit record, in the background: a new
approval (``approval.requested``) and each decision or withdrawal (``approval.decided``). The
step waits only for the notification to be queued (the broker's outbox in Redis, a bounded
wait); a notification that cannot be queued is logged and never fails the step.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final, NoReturn, Protocol, TypeVar

import structlog

from broker.core.approvals import (
    SYSTEM_ACTOR,
    Approval,
    ApprovalStatus,
    ApprovalSubject,
    Verdict,
    approval_view,
    check_approval_id,
)
from broker.core.audit import (
    ApprovalDecided,
    ApprovalRequested,
    AuditEvent,
    AuditTrail,
    Payload,
    current_request_id,
)
from broker.core.authn import Caller
from broker.core.identity import HumanIdentity
from broker.core.model import CredentialRequest, Decision, DelegationChain, WorkflowRun
from broker.core.ports import ApprovalNotifier, ApprovalState, ApprovalStore, Clock
from broker.core.roles import Role
from broker.core.untrusted import printable
from broker.errors import (
    ApprovalPendingError,
    ApprovalRefusedError,
    AuditUnavailableError,
    BadRequestError,
    ConflictError,
    NotFoundError,
)

_log = structlog.get_logger("broker.approvals")

# Compare-and-set rounds before a step gives up on a contended approval (human speed: rare).
_CAS_ATTEMPTS: Final = 8
MAX_LIST: Final = 1000
REQUESTED: Final = "approval.requested"
DECIDED: Final = "approval.decided"

NoteT = TypeVar("NoteT")


class WithdrawalHook(Protocol[NoteT]):
    """What happens around the withdrawal of a used approval (one that names a credential):
    bootstrap wires :class:`broker.continuous.ReevaluatingWithdrawals`. The note
    :meth:`before_withdrawal` returns is opaque to the approvals code: it is handed back,
    once, to :meth:`withdrawn` or to :meth:`not_withdrawn`."""

    async def before_withdrawal(self, approval: Approval) -> NoteT:
        """``approval`` (withdrawn, naming its credential) is about to be stored: note
        durably that its credential must be decided again. Raising does not stop the
        withdrawal (logged; :meth:`withdrawn` then gets no note)."""
        ...

    async def withdrawn(self, approval: Approval, note: NoteT | None) -> None:
        """The withdrawal of ``approval`` (naming its credential) is stored: decide the
        credential again. ``note`` is what :meth:`before_withdrawal` returned (None when it
        raised). Awaited; raising is logged, the withdrawal stands."""
        ...

    async def not_withdrawn(self, note: NoteT) -> None:
        """The withdrawal ``note`` was taken for was not stored, or withdrew no credential
        after all (released meanwhile): discard the note (best effort)."""
        ...


@dataclasses.dataclass(slots=True)
class _TakenNote:
    """The note a withdrawal took before it was stored: ``asked`` whether the hook was asked,
    ``value`` what it returned (``ok``: it returned at all)."""

    asked: bool = False
    ok: bool = False
    value: Any = None


def subject_of(
    holder: str, request: CredentialRequest, params: Mapping[str, str]
) -> ApprovalSubject:
    """What an approval for ``request`` by ``holder`` is bound to."""
    return ApprovalSubject(
        workflow_id=request.workflow_id,
        task_id=request.task_id,
        target=request.target,
        ttl_seconds=int(request.ttl.total_seconds()),
        holder=holder,
        params=params,
    )


def poll_path(approval_id: str) -> str:
    """Where the requester polls an approval."""
    return f"/v1/approvals/{approval_id}"


class Approvals:
    """The approval use cases, written against ``core.ports`` (store, audit, notifier, clock)."""

    def __init__(
        self,
        *,
        store: ApprovalStore,
        audit: AuditTrail | None,
        clock: Clock,
        validity: timedelta = timedelta(hours=1),
        notifier: ApprovalNotifier | None = None,
        withdrawal_hook: WithdrawalHook[Any] | None = None,
    ) -> None:
        if validity <= timedelta(0):
            raise ValueError("approval validity must be positive")
        self._store = store
        self._audit = audit
        self._clock = clock
        self._validity = validity
        self._notifier = notifier
        self._withdrawal_hook = withdrawal_hook

    @property
    def store(self) -> ApprovalStore:
        """The approval store (continuous authorization reads approvals from it)."""
        return self._store

    async def pending_count(self) -> int:
        """Approvals waiting for a decision (for the ``tasklease_approvals_pending`` gauge)."""
        return await self._store.count_pending()

    def set_withdrawal_hook(self, hook: WithdrawalHook[Any] | None) -> None:
        """Around each withdrawal of a used approval (see :class:`WithdrawalHook`): the
        composition root builds continuous authorization after this service."""
        self._withdrawal_hook = hook

    # ------------------------------------------------------------------ issuance side

    async def verify_presented(
        self,
        caller: Caller,
        request: CredentialRequest,
        params: Mapping[str, str],
        *,
        now: datetime,
    ) -> ApprovalState:
        """The approval ``request.approval_id`` as policy sees it, or a typed refusal: unknown
        (404), bound to another request, still short of its quorum, expired, withdrawn, denied
        or used."""
        approval_id = request.approval_id
        if approval_id is None:
            raise ValueError("the request presents no approval")
        approval = await self._load(approval_id, now)
        approval.check_usable(subject_of(caller.principal_id, request, params).digest(), now)
        return ApprovalState(
            approval_id=approval.id,
            approved=True,
            approvers=approval.approvers,
            expires_at=approval.expires_at,
        )

    async def open_or_reuse(
        self,
        caller: Caller,
        request: CredentialRequest,
        params: Mapping[str, str],
        *,
        run: WorkflowRun,
        chain: DelegationChain,
        decision: Decision,
        now: datetime,
    ) -> NoReturn:
        """Policy answered needs_approval: raise :class:`ApprovalPendingError` naming the open
        approval for this exact request, opening one when there is none. When the request
        presented an approval and still needs one, the approval does not satisfy the policy:
        refused (``approval.insufficient``)."""
        if request.approval_id is not None:
            raise ApprovalRefusedError(
                f"approval {request.approval_id} is granted, yet the policy still asks for an "
                f"approval ({', '.join(decision.policy_ids)}): it does not satisfy "
                f"{'; '.join(decision.reasons)}",
                reason="approval.insufficient",
            )
        subject = subject_of(caller.principal_id, request, params)
        digest = subject.digest()
        for _ in range(_CAS_ATTEMPTS):
            current_id = await self._store.open_approval_for(digest)
            if current_id is not None:
                current = await self._store.get_approval(current_id)
                if current is not None and current.digest == digest:
                    if current.status_at(now).is_open:
                        raise self._pending(current, decision, reused=True, now=now)
                    if current.state.is_open:
                        # Expired but not recorded yet: record it (which frees the pointer).
                        await self._settle_expiry(current, now)
                        continue
            approval = Approval.open(
                subject=subject,
                owner=run.owner,
                chain=chain,
                now=now,
                validity=self._validity,
                quorum=decision.approval_quorum,
                policy_ids=decision.policy_ids,
                reasons=decision.reasons,
                justification=request.justification,
            )
            if not await self._store.create_approval(approval, replaces=current_id):
                continue
            event = self._event(
                approval,
                actor=caller.principal_id,
                payload=ApprovalRequested(
                    target=subject.target,
                    request_digest=approval.digest,
                    ttl_seconds=subject.ttl_seconds,
                    quorum=approval.quorum,
                    expires_at=approval.expires_at,
                    policy_ids=approval.policy_ids,
                ),
            )
            try:
                await self._record(event)
            except AuditUnavailableError:
                # Not audited, so it must not be decidable: neutralize it.
                await self._store.save_approval(
                    approval.withdraw(by=SYSTEM_ACTOR, now=now, comment="audit trail unavailable"),
                    expected_version=approval.version,
                )
                raise
            _log.info(
                "approval.requested",
                approval_id=approval.id,
                workflow_id=subject.workflow_id,
                task_id=subject.task_id,
                target=subject.target,
                holder=subject.holder,
                quorum=approval.quorum,
                expires_at=approval.expires_at.isoformat(),
                policy_ids=list(approval.policy_ids),
            )
            await self._notify(REQUESTED, approval, now, step="request", by=caller.principal_id)
            raise self._pending(approval, decision, reused=False, now=now)
        raise ConflictError(
            "the approval for this request kept changing while it was being opened; retry",
            reason="approval.contended",
        )

    async def consume(
        self,
        caller: Caller,
        request: CredentialRequest,
        params: Mapping[str, str],
        *,
        credential_id: str,
        now: datetime,
    ) -> Approval:
        """Use the presented approval for ``credential_id`` (approved → used), atomically:
        of two concurrent uses exactly one succeeds, the other is refused ``approval.used``."""
        approval_id = request.approval_id
        if approval_id is None:
            raise ValueError("the request presents no approval")
        digest = subject_of(caller.principal_id, request, params).digest()
        used = await self._transition(
            approval_id,
            now,
            lambda a: a.consume(digest=digest, credential_id=credential_id, now=now),
            actor=caller.principal_id,
            decision="use",
        )
        _log.info(
            "approval.used",
            approval_id=used.id,
            credential_id=credential_id,
            holder=caller.principal_id,
        )
        return used

    async def release(self, used: Approval, *, cause: str) -> Approval:
        """Give back ``used`` (what :meth:`consume` returned) because nothing was minted for its
        credential: used → approved, atomically and only while it is still exactly that use
        and unexpired (``core.approvals.Approval.release``). Audited as ``release`` by the
        broker, with the credential id and ``cause`` (a reason code, never a secret)."""
        credential_id = used.credential_id
        now = self._clock.now()
        released = await self._transition(
            used.id,
            now,
            lambda a: a.release(credential_id=credential_id, version=used.version, now=now),
            actor=SYSTEM_ACTOR,
            decision="release",
            comment=f"nothing was minted for {credential_id} ({cause})",
            credential_id=credential_id,
        )
        _log.info(
            "approval.released",
            approval_id=released.id,
            credential_id=credential_id,
            cause=cause,
        )
        return released

    # ------------------------------------------------------------------ API side

    async def list_approvals(
        self, caller: Caller, *, state: ApprovalStatus | None, limit: int = 100
    ) -> list[Approval]:
        """Approvals in ``state`` (None: all retained), newest first, for approvers and
        admins. Open approvals found past their expiry are recorded as expired on the way."""
        _require_approver_or_admin(caller, "list approvals")
        if not 1 <= limit <= MAX_LIST:
            raise ValueError(f"limit must be 1..{MAX_LIST}")
        now = self._clock.now()
        pending_only = state is ApprovalStatus.PENDING
        found = await self._store.list_approvals(
            pending_only=pending_only, limit=limit if pending_only else MAX_LIST
        )
        result: list[Approval] = []
        for listed in found:
            approval = listed
            if approval.state.is_open and approval.status_at(now) is ApprovalStatus.EXPIRED:
                approval = await self._settle_expiry(approval, now)
            if state is None or approval.status_at(now) is state:
                result.append(approval)
        return result[:limit]

    async def get(self, caller: Caller, approval_id: str) -> Approval:
        """One approval, for its requester, approvers and admins (404 for anyone else)."""
        now = self._clock.now()
        approval = await self._load(approval_id, now)
        if not _may_see(caller, approval):
            raise _not_found(approval_id)
        return approval

    async def decide(
        self,
        caller: Caller,
        approval_id: str,
        verdict: Verdict,
        *,
        comment: str = "",
        request_id: str = "",
    ) -> Approval:
        """An approver approves or denies a pending approval."""
        if Role.APPROVER not in caller.roles:
            raise ApprovalRefusedError(
                f"{printable(caller.principal_id)} is not an approver (roles "
                f"{sorted(r.value for r in caller.roles)}); see config/identities.toml",
                reason="approval.not_approver",
            )
        now = self._clock.now()
        display = _display(caller)
        decided = await self._transition(
            approval_id,
            now,
            lambda a: a.decide(
                approver=caller.principal_id,
                display=display,
                verdict=verdict,
                now=now,
                comment=comment,
            ),
            actor=caller.principal_id,
            decision=verdict.value,
            comment=comment,
            request_id=request_id,
        )
        _log.info(
            "approval.decided",
            approval_id=decided.id,
            decision=verdict.value,
            state=decided.state.value,
            approver=caller.principal_id,
            approver_count=len(decided.approvers),
            quorum=decided.quorum,
        )
        await self._notify(DECIDED, decided, now, step=verdict.value, by=caller.principal_id)
        return decided

    async def withdraw(
        self, caller: Caller, approval_id: str, *, comment: str = "", request_id: str = ""
    ) -> Approval:
        """The requester, an approver or an admin withdraws an approval (see the module
        docstring); for a used one the withdrawal hook notes the re-evaluation of its
        credential before the withdrawal is stored, and decides it once it is."""
        now = self._clock.now()
        current = await self._load(approval_id, now)
        if not _may_see(caller, current):
            raise _not_found(approval_id)
        hook = self._withdrawal_hook
        taken = _TakenNote()

        async def note_first(withdrawal: Approval) -> None:
            # Right before each compare-and-set: the approval may have been used (or released)
            # since it was read, so this is where it is known to name a credential.
            if hook is None or taken.asked or not withdrawal.credential_id:
                return
            taken.asked = True
            try:
                taken.value = await hook.before_withdrawal(withdrawal)
            except Exception as exc:  # noqa: BLE001 - a withdrawal never waits on its note
                self._hook_failed(withdrawal.id, "before_withdrawal", exc)
                return
            taken.ok = True

        try:
            withdrawn = await self._transition(
                approval_id,
                now,
                lambda a: a.withdraw(by=caller.principal_id, now=now, comment=comment),
                actor=caller.principal_id,
                decision="withdraw",
                comment=comment,
                request_id=request_id,
                before_save=note_first,
            )
        except Exception:
            if hook is not None and taken.asked:
                await self._settle_failed_withdrawal(hook, approval_id, taken)
            raise
        _log.warning(
            "approval.withdrawn",
            approval_id=withdrawn.id,
            by=caller.principal_id,
            credential_id=withdrawn.credential_id,
        )
        await self._notify(DECIDED, withdrawn, now, step="withdraw", by=caller.principal_id)
        if hook is not None:
            if withdrawn.credential_id:
                await self._withdrawn(hook, withdrawn, taken.value if taken.ok else None)
            elif taken.ok:  # released between the note and the withdrawal: nothing to decide
                await self._not_withdrawn(hook, approval_id, taken.value)
        return withdrawn

    async def _settle_failed_withdrawal(
        self, hook: WithdrawalHook[Any], approval_id: str, taken: _TakenNote
    ) -> None:
        """A withdrawal of a used approval failed after its note was asked for: the store says
        whether the approval is withdrawn all the same (its write landed before the error, or
        someone else withdrew it): then its credential is decided now; otherwise the note is
        discarded. Unreadable: the note stays for the next start (which decides under what
        the store says then)."""
        try:
            stored = await self._store.get_approval(approval_id)
        except Exception as exc:  # noqa: BLE001 - the withdrawal's own error is raised
            _log.warning(
                "approval.withdrawal_unsettled",
                approval_id=approval_id,
                error_type=type(exc).__name__,
                detail="its re-evaluation stays noted for the next start",
            )
            return
        withdrawn = (
            stored is not None
            and stored.state is ApprovalStatus.WITHDRAWN
            and bool(stored.credential_id)
        )
        _log.warning(
            "approval.withdrawal_failed",
            approval_id=approval_id,
            stored_state=stored.state.value if stored is not None else "unknown",
            reevaluated=withdrawn,
        )
        if stored is not None and withdrawn:
            await self._withdrawn(hook, stored, taken.value if taken.ok else None)
        elif taken.ok:
            await self._not_withdrawn(hook, approval_id, taken.value)

    async def _withdrawn(self, hook: WithdrawalHook[Any], withdrawn: Approval, note: Any) -> None:
        try:
            await hook.withdrawn(withdrawn, note)
        except Exception as exc:  # noqa: BLE001 - the withdrawal stands; say what failed
            self._hook_failed(withdrawn.id, "withdrawn", exc)

    async def _not_withdrawn(self, hook: WithdrawalHook[Any], approval_id: str, note: Any) -> None:
        try:
            await hook.not_withdrawn(note)
        except Exception as exc:  # noqa: BLE001 - a note left behind is resumed harmlessly
            self._hook_failed(approval_id, "not_withdrawn", exc)

    @staticmethod
    def _hook_failed(approval_id: str, phase: str, exc: Exception) -> None:
        _log.error(
            "approval.withdrawal_hook_failed",
            approval_id=approval_id,
            phase=phase,
            error_type=type(exc).__name__,
            error=printable(exc, 300),
        )

    # ------------------------------------------------------------------ helpers

    async def _load(self, approval_id: str, now: datetime) -> Approval:
        try:
            check_approval_id(approval_id)
        except BadRequestError:
            raise _not_found(approval_id) from None
        approval = await self._store.get_approval(approval_id)
        if approval is None:
            raise _not_found(approval_id)
        if approval.state.is_open and approval.status_at(now) is ApprovalStatus.EXPIRED:
            approval = await self._settle_expiry(approval, now)
        return approval

    async def _settle_expiry(self, approval: Approval, now: datetime) -> Approval:
        """Record that an open approval expired (once: the compare-and-set lets one replica
        win; the others read the recorded expiry)."""
        for _ in range(_CAS_ATTEMPTS):
            if approval.state is ApprovalStatus.EXPIRED or not approval.state.is_open:
                return approval
            expired = approval.expire(now)
            if await self._store.save_approval(expired, expected_version=approval.version):
                try:
                    await self._record_or_undo(
                        approval,
                        expired,
                        actor=SYSTEM_ACTOR,
                        payload=ApprovalDecided(
                            decision="expire",
                            state=expired.state.value,
                            approvers=expired.approvers,
                        ),
                    )
                except AuditUnavailableError:
                    # Undone; it is expired all the same (status_at), recorded on a later read.
                    _log.warning("approval.expiry_not_recorded", approval_id=approval.id)
                    return approval
                _log.info("approval.expired", approval_id=approval.id)
                return expired
            reread = await self._store.get_approval(approval.id)
            if reread is None:
                raise _not_found(approval.id)
            approval = reread
        return approval

    async def _transition(
        self,
        approval_id: str,
        now: datetime,
        change: Callable[[Approval], Approval],
        *,
        actor: str,
        decision: str,
        comment: str = "",
        request_id: str = "",
        credential_id: str | None = None,
        before_save: Callable[[Approval], Awaitable[None]] | None = None,
    ) -> Approval:
        """Apply ``change`` with compare-and-set (re-reading on contention), then audit it
        (about ``credential_id``, by default the one the changed approval names).
        ``before_save`` is awaited with each changed version right before it is written."""
        for _ in range(_CAS_ATTEMPTS):
            current = await self._load(approval_id, now)
            updated = change(current)  # raises the typed refusal when the step is not allowed
            if before_save is not None:
                await before_save(updated)
            if not await self._store.save_approval(updated, expected_version=current.version):
                continue
            await self._record_or_undo(
                current,
                updated,
                actor=actor,
                payload=ApprovalDecided(
                    decision=decision,
                    state=updated.state.value,
                    approvers=updated.approvers,
                    comment=comment,
                ),
                credential_id=updated.credential_id if credential_id is None else credential_id,
                request_id=request_id,
            )
            return updated
        raise ConflictError(
            f"approval {approval_id} kept changing while it was being updated; retry",
            reason="approval.contended",
        )

    async def _record_or_undo(
        self,
        before: Approval,
        after: Approval,
        *,
        actor: str,
        payload: Payload,
        credential_id: str = "",
        request_id: str = "",
    ) -> None:
        """Audit a stored step; if the trail refuses it, write ``before`` back and raise."""
        event = self._event(
            after,
            actor=actor,
            payload=payload,
            credential_id=credential_id,
            request_id=request_id,
        )
        try:
            await self._record(event)
        except AuditUnavailableError:
            undone = dataclasses.replace(before, version=after.version + 1)
            if not await self._store.save_approval(undone, expected_version=after.version):
                _log.error(
                    "approval.undo_failed",
                    approval_id=after.id,
                    state=after.state.value,
                    detail="the step was stored, its audit event was refused, and the approval "
                    "changed again before it could be undone",
                )
            raise

    async def _record(self, event: AuditEvent) -> None:
        if self._audit is None:
            # No trail wired (unit set-ups): the approval.* log lines are all there is.
            return
        await self._audit.record(event)

    def _event(
        self,
        approval: Approval,
        *,
        actor: str,
        payload: Payload,
        credential_id: str = "",
        request_id: str = "",
    ) -> AuditEvent:
        return AuditEvent(
            event_id=f"evt_{secrets.token_hex(12)}",
            time=self._clock.now(),
            actor=actor,
            payload=payload,
            chain=approval.chain,
            workflow_id=approval.subject.workflow_id,
            task_id=approval.subject.task_id,
            credential_id=credential_id,
            approval_id=approval.id,
            # The HTTP request's id (set by the problem middleware) unless one is given.
            request_id=request_id or current_request_id(),
        )

    async def _notify(
        self, event: str, approval: Approval, now: datetime, *, step: str, by: str
    ) -> None:
        if self._notifier is None:
            return
        body: dict[str, Any] = {
            "step": step,
            "by": by,
            "approval": {
                **approval_view(approval, now),
                "links": {
                    "self": poll_path(approval.id),
                    "decision": f"{poll_path(approval.id)}/decision",
                    "withdraw": f"{poll_path(approval.id)}/withdraw",
                },
            },
        }
        try:
            await self._notifier.notify(event, body)
        except Exception as exc:  # noqa: BLE001 - a notification never fails the step
            _log.error(
                "approval.notify_failed", approval_id=approval.id, error_type=type(exc).__name__
            )

    def _pending(
        self, approval: Approval, decision: Decision, *, reused: bool, now: datetime
    ) -> ApprovalPendingError:
        status = approval.status_at(now)
        return ApprovalPendingError(
            f"target {approval.subject.target!r} needs an approval for this request "
            f"({', '.join(decision.policy_ids)}): approval {approval.id} is {status.value} "
            f"({len(approval.approvers)} of {approval.quorum}); poll "
            f"{poll_path(approval.id)} and retry this exact request with approval_id once it "
            "is approved",
            approval_id=approval.id,
            state=status.value,
            quorum=approval.quorum,
            approver_count=len(approval.approvers),
            expires_at=approval.expires_at.isoformat(),
            policy_ids=decision.policy_ids,
            reused=reused,
        )


def _display(caller: Caller) -> str:
    identity = caller.identity
    if isinstance(identity, HumanIdentity):
        return identity.display
    return caller.principal_id


def _may_see(caller: Caller, approval: Approval) -> bool:
    return caller.principal_id == approval.holder or caller.has_any((Role.APPROVER, Role.ADMIN))


def _require_approver_or_admin(caller: Caller, what: str) -> None:
    if not caller.has_any((Role.APPROVER, Role.ADMIN)):
        raise ApprovalRefusedError(
            f"{printable(caller.principal_id)} needs the approver or admin role to {what}",
            reason="approval.not_approver",
        )


def _not_found(approval_id: str) -> NotFoundError:
    return NotFoundError(
        f"no approval {printable(approval_id, 64)!s} visible to you", reason="approval.not_found"
    )
