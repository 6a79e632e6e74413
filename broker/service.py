"""The use cases, written against ``broker.core.ports`` only."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from broker.approvals import Approvals
from broker.core.approvals import Approval
from broker.core.audit import (
    AuditEvent,
    AuditTrail,
    CredentialDenied,
    CredentialIssued,
    Payload,
    PolicyDecision,
    QuarantineChanged,
    WorkflowStarted,
    current_request_id,
)
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.model import (
    ActionName,
    CredentialRequest,
    Decision,
    DecisionOutcome,
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Quarantine,
    QuarantineKind,
    Target,
    WorkflowRun,
    check_id,
    credential_ttl,
    refuse_quarantined,
)
from broker.core.ports import (
    CheckResult,
    Clock,
    IdempotencyBinding,
    IssuanceLimits,
    LeaseSelector,
    Ledger,
    MintSpec,
    PolicyEngine,
    PolicyRequest,
    QuarantineStore,
    ReadinessCheck,
    RunPage,
    RunQuery,
    SecretMinter,
)
from broker.core.roles import Role, SpiffeIdPattern
from broker.core.untrusted import printable
from broker.errors import (
    ApprovalPendingError,
    AuditUnavailableError,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    IdempotentReplayError,
    LedgerUnavailableError,
    LimitExceededError,
    MintOutcomeUnknownError,
    NotFoundError,
    PolicyDeniedError,
    SpiffeIdError,
    TaskleaseError,
    UnavailableError,
)

_log = structlog.get_logger("broker.service")


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    """Every check's result; ready only when all are ok."""

    results: tuple[CheckResult, ...]

    @property
    def ready(self) -> bool:
        """True when every dependency is ready."""
        return all(r.ok for r in self.results)


class Readiness:
    """Asks every dependency, concurrently and each within a time budget."""

    def __init__(
        self, *, checks: Sequence[ReadinessCheck], clock: Clock, timeout_seconds: float
    ) -> None:
        self._checks = tuple(checks)
        self._clock = clock
        self._timeout = timeout_seconds

    async def report(self) -> ReadinessReport:
        """Run all checks; a check that times out or raises counts as not ready."""
        now = self._clock.now()
        results = await asyncio.gather(*(self._run(check, now) for check in self._checks))
        return ReadinessReport(results=tuple(results))

    async def _run(self, check: ReadinessCheck, now: datetime) -> CheckResult:
        try:
            async with asyncio.timeout(self._timeout):
                return await check.check(now)
        except TimeoutError:
            return CheckResult(check.name, ok=False, detail=f"no answer within {self._timeout} s")
        except Exception as exc:  # noqa: BLE001 - a failing probe is "not ready", with why
            detail = getattr(exc, "detail", None) or type(exc).__name__
            return CheckResult(check.name, ok=False, detail=str(detail))


# --------------------------------------------------------------------------- issuance


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    """A freshly minted credential: the lease (kept) and the secret (returned once, never kept)."""

    lease: Lease
    secret: Mapping[str, Any] = field(repr=False)
    decision: Decision = field(repr=False)


class CredentialBroker:
    """The use cases: start and read runs, issue credentials for one task of one run."""

    def __init__(
        self,
        *,
        policy: PolicyEngine,
        minter: SecretMinter,
        ledger: Ledger,
        targets: Mapping[str, Target],
        clock: Clock,
        quarantines: QuarantineStore | None = None,
        max_run_duration: timedelta = timedelta(days=7),
        idempotency_ttl: timedelta = timedelta(days=1),
        approvals: Approvals | None = None,
        audit: AuditTrail | None = None,
        live_limit_per_identity: int = 0,
        issuance_rate_per_identity: int = 0,
        run_rate_per_identity: int = 0,
        refuse_if_superseded: Callable[[], None] | None = None,
    ) -> None:
        # The audit trail (bootstrap always wires one). None only in unit set-ups.
        self._audit = audit
        # Without approvals, needs_approval is refused (403 policy.needs_approval).
        self._approvals = approvals
        self._policy = policy
        self._minter = minter
        self._ledger = ledger
        # Not copied: the catalog in force may be replaced by a hot reload (LiveTargets).
        self._targets = targets
        self._clock = clock
        self._quarantines = quarantines
        self._max_run_duration = max_run_duration
        self._idempotency_ttl = idempotency_ttl
        # At most this many live credentials per identity (0: none); a target may cap its own.
        self._live_limit = live_limit_per_identity
        # At most this many issuances per identity per minute (a token bucket; 0: none).
        self._rate_limit = issuance_rate_per_identity
        # At most this many runs started per orchestrator per minute (a token bucket; 0: none).
        self._run_rate_limit = run_rate_per_identity
        # Raises 503 policy.superseded while other replicas run newer decision inputs
        # (broker/superseded.py: an in-memory flag, no I/O per request).
        self._refuse_if_superseded = refuse_if_superseded

    @property
    def targets(self) -> Mapping[str, Target]:
        """The target catalog."""
        return self._targets

    # ---- runs

    async def start_workflow(
        self,
        caller: Caller,
        *,
        workflow_id: str,
        owner: str,
        purpose: str,
        deadline: datetime,
        labels: Mapping[str, str],
        participants: Sequence[str],
    ) -> WorkflowRun:
        """An orchestrator starts a run for an accountable owner."""
        caller.require(Role.ORCHESTRATOR, "start a workflow run")
        now = self._clock.now()
        if deadline - now > self._max_run_duration:
            raise BadRequestError(
                f"deadline is more than {self._max_run_duration} away; runs are short-lived",
                reason="invalid.deadline",
            )
        for pattern in participants:
            try:
                SpiffeIdPattern.parse(pattern)
            except SpiffeIdError as exc:
                raise BadRequestError(
                    f"participant pattern is invalid: {exc.detail}", reason="invalid.participants"
                ) from None
        run = WorkflowRun(
            id=workflow_id,
            owner=owner,
            purpose=purpose,
            started_by=caller.principal_id,
            created_at=now,
            deadline=deadline,
            labels=labels,
            participants=tuple(participants),
        )
        if not await self._ledger.create_run(run, per_minute=self._run_rate_limit):
            raise ConflictError(
                f"workflow run {workflow_id!r} exists already", reason="workflow.exists"
            )
        _log.info(
            "workflow.started",
            workflow_id=run.id,
            owner=run.owner,
            started_by=run.started_by,
            deadline=run.deadline.isoformat(),
        )
        await self._record(
            _event(
                caller.principal_id,
                WorkflowStarted(
                    owner=run.owner,
                    purpose=run.purpose,
                    deadline=run.deadline,
                    labels=dict(run.labels),
                    participants=run.participants,
                ),
                now,
                chain=run.chain,
                workflow_id=run.id,
            )
        )
        return run

    async def get_workflow(
        self, caller: Caller, workflow_id: str
    ) -> tuple[WorkflowRun, list[Lease]]:
        """The run and its leases' metadata: for its orchestrator or an admin."""
        run = await self._ledger.get_run(workflow_id)
        if run is None or not (Role.ADMIN in caller.roles or run.started_by == caller.principal_id):
            # Same answer for "absent" and "not yours": no probing of run ids.
            raise NotFoundError(
                f"no workflow run {workflow_id!r} visible to you", reason="workflow.not_found"
            )
        leases = await self._ledger.find_leases(LeaseSelector(workflow_id=workflow_id))
        return run, leases

    async def list_workflows(self, caller: Caller, query: RunQuery) -> RunPage:
        """Runs by owner, orchestrator and state, a page at a time: an admin sees every run,
        an orchestrator the runs it started (a query naming another orchestrator is
        refused)."""
        if Role.ADMIN not in caller.roles:
            caller.require(Role.ORCHESTRATOR, "list workflow runs")
            if query.started_by not in (None, caller.principal_id):
                raise ForbiddenError(
                    f"{caller.principal_id} may list only the runs it started, not those of "
                    f"{printable(query.started_by or '', 200)}",
                    reason="auth.not_your_runs",
                )
            query = dataclasses.replace(query, started_by=caller.principal_id)
        return await self._ledger.list_runs(query)

    # ---- quarantine

    async def set_quarantine(
        self, caller: Caller, *, kind: QuarantineKind, value: str, reason: str, ttl: timedelta
    ) -> Quarantine:
        """An admin blocks new issuance for an identity (or prefix), a run or a target."""
        caller.require(Role.ADMIN, "quarantine")
        store = self._quarantine_store()
        now = self._clock.now()
        if kind in (
            QuarantineKind.IDENTITY,
            QuarantineKind.IDENTITY_PREFIX,
        ) and not value.startswith("spiffe://"):
            raise BadRequestError(
                "an identity quarantine names a SPIFFE ID (or a prefix of one)",
                reason="invalid.quarantine",
            )
        if kind in (QuarantineKind.WORKFLOW, QuarantineKind.TARGET):
            # Only an identifier can ever match a run or a target; anything else would block
            # nothing (and a run id names the run's audit stream).
            check_id(value, f"quarantined {kind.value}")
        quarantine = Quarantine(
            kind=kind,
            value=value,
            reason=reason,
            created_by=caller.principal_id,
            created_at=now,
            expires_at=now + ttl,
        )
        await store.set_quarantine(quarantine)
        _log.warning(
            "quarantine.changed",
            action="set",
            kind=kind.value,
            value=value,
            reason=reason,
            by=caller.principal_id,
            expires_at=quarantine.expires_at.isoformat(),
        )
        await self._record(
            _event(
                caller.principal_id,
                QuarantineChanged(
                    action="set",
                    kind=kind.value,
                    value=value,
                    reason=reason,
                    expires_at=quarantine.expires_at,
                ),
                now,
                workflow_id=value if kind is QuarantineKind.WORKFLOW else "",
            )
        )
        return quarantine

    async def lift_quarantine(self, caller: Caller, *, kind: QuarantineKind, value: str) -> None:
        """An admin lifts a quarantine before it expires."""
        caller.require(Role.ADMIN, "lift a quarantine")
        if not await self._quarantine_store().lift_quarantine(kind, value):
            raise NotFoundError(
                f"no {kind.value} quarantine for {value!r}", reason="quarantine.not_found"
            )
        _log.warning(
            "quarantine.changed",
            action="lift",
            kind=kind.value,
            value=value,
            by=caller.principal_id,
        )
        await self._record(
            _event(
                caller.principal_id,
                QuarantineChanged(action="lift", kind=kind.value, value=value),
                self._clock.now(),
                workflow_id=value if kind is QuarantineKind.WORKFLOW else "",
            )
        )

    async def find_leases(
        self, caller: Caller, selector: LeaseSelector, *, limit: int
    ) -> list[Lease]:
        """Leases' metadata by selector (never a secret): for admins."""
        caller.require(Role.ADMIN, "query leases")
        return await self._ledger.find_leases(selector, limit=limit)

    async def list_quarantines(self, caller: Caller) -> list[Quarantine]:
        """The active quarantines."""
        caller.require(Role.ADMIN, "list quarantines")
        return await self._quarantine_store().quarantines(self._clock.now())

    def _quarantine_store(self) -> QuarantineStore:
        if self._quarantines is None:
            raise UnavailableError(
                "quarantines are not configured", reason="quarantine.unavailable"
            )
        return self._quarantines

    async def _active_quarantines(self, now: datetime) -> list[Quarantine]:
        if self._quarantines is None:
            return []
        return await self._quarantines.quarantines(now)

    # ---- issuance

    async def request_credential(
        self,
        caller: Caller,
        request: CredentialRequest,
        *,
        params: Mapping[str, str],
    ) -> IssuedCredential:
        """Issue a credential (:meth:`_issue`). Audit: an allowed request records
        ``policy.decision`` and ``credential.issued`` together before the secret is returned;
        a refused one records its decision (if one was made) and ``credential.denied``."""
        attempt = _Attempt()
        try:
            return await self._issue(caller, request, params=params, attempt=attempt)
        except (IdempotentReplayError, AuditUnavailableError):
            raise  # a replay is no new request; a failed trail cannot take the refusal
        except ApprovalPendingError:
            await self._record_refusal(caller, request, attempt, None)
            raise
        except TaskleaseError as exc:
            await self._record_refusal(caller, request, attempt, exc)
            raise

    async def _issue(
        self,
        caller: Caller,
        request: CredentialRequest,
        *,
        params: Mapping[str, str],
        attempt: _Attempt,
    ) -> IssuedCredential:
        """Authenticate (done) → load the run → decide → write ahead → mint → record → return.

        The secret is returned only after the ledger durably acknowledged the active lease;
        otherwise the credential is revoked and the request fails.
        """
        if not isinstance(caller.identity, WorkloadIdentity):
            raise ForbiddenError(
                "credentials are issued to workloads (SVIDs) only, not to people",
                reason="auth.workload_required",
            )
        caller.require(Role.AGENT, "request a credential")
        if self._refuse_if_superseded is not None:
            self._refuse_if_superseded()
        identity = caller.identity
        now = self._clock.now()
        # The run and the quarantines in force, read concurrently (two Redis round trips in
        # the time of one). Refusing here spares the policy engine and never opens an
        # approval for a quarantined request; the write-ahead checks the quarantines again in
        # its atomic command, so one stored after this read still blocks the credential (and
        # one stored after the write-ahead finds its lease when it re-evaluates). It checks
        # the run's state the same way: a run that ended since this read refuses it.
        run, quarantines = await asyncio.gather(
            self._ledger.get_run(request.workflow_id), self._active_quarantines(now)
        )
        if run is None:
            raise NotFoundError(
                f"no workflow run {request.workflow_id!r}", reason="workflow.not_found"
            )
        if not run.is_active(now):
            raise run.inactive_error()
        target = self._targets.get(request.target)
        if target is None:
            raise NotFoundError(
                f"no target {request.target!r} (known: {sorted(self._targets)})",
                reason="target.unknown",
            )
        refuse_quarantined(
            quarantines, principal=caller.principal_id, workflow_id=run.id, target=target.name
        )
        svid_expiry = identity.expires_at if identity.method is AuthMethod.JWT_SVID else None
        # The TTL the policy sees: what could be granted before any policy cap.
        candidate = credential_ttl(
            requested=request.ttl,
            target_max=target.max_ttl,
            deadline=run.deadline,
            now=now,
            svid_expires_at=svid_expiry,
        )
        chain = run.chain.extended(DelegationHop("agent", caller.principal_id, verified=True))
        # A presented approval must be this exact request's, approved, unexpired and unused;
        # policy then decides with it in context (request time, not grant time).
        presented = (
            await self._approvals.verify_presented(caller, request, params, now=now)
            if self._approvals is not None and request.approval_id is not None
            else None
        )
        decision = self._policy.decide(
            PolicyRequest(
                principal=caller.principal_id,
                principal_roles=frozenset(r.value for r in caller.roles),
                trust_domain=identity.spiffe_id.trust_domain.name,
                action=ActionName.REQUEST_CREDENTIAL.value,
                target=target,
                run=run,
                chain=chain,
                task_id=request.task_id,
                tool=request.tool,
                justification=request.justification,
                ttl=candidate,
                now=now,
                approval=presented,
            )
        )
        _log.debug(
            "policy.decision",
            workflow_id=run.id,
            task_id=request.task_id,
            target=target.name,
            principal=caller.principal_id,
            outcome=decision.outcome.value,
            policy_ids=list(decision.policy_ids),
        )
        attempt.decided(decision, target, chain, now)
        if decision.outcome is DecisionOutcome.NEEDS_APPROVAL:
            if self._approvals is not None:
                # Raises ApprovalPendingError (202) with the open approval for this request.
                await self._approvals.open_or_reuse(
                    caller, request, params, run=run, chain=chain, decision=decision, now=now
                )
            raise ForbiddenError(
                f"target {target.name!r} needs a human approval for this request "
                f"(policies: {', '.join(decision.policy_ids) or 'none'}); approvals are not "
                "enabled on this broker yet",
                reason="policy.needs_approval",
            )
        if not decision.allowed:
            raise PolicyDeniedError(
                f"policy denied {caller.principal_id} a credential for {target.name!r} in run "
                f"{run.id!r}: {'; '.join(decision.reasons) or 'no policy permits it'}",
                policy_ids=decision.policy_ids,
            )
        ttl = credential_ttl(
            requested=request.ttl,
            target_max=target.max_ttl,
            deadline=run.deadline,
            now=now,
            svid_expires_at=svid_expiry,
            policy_max=decision.max_ttl,
            approval_expires_at=presented.expires_at if presented is not None else None,
        )
        credential_id = f"cred_{secrets.token_hex(12)}"
        used: Approval | None = None
        if presented is not None and self._approvals is not None:
            # Single use, atomically; released again only if nothing gets minted (README).
            used = await self._approvals.consume(
                caller, request, params, credential_id=credential_id, now=now
            )
        try:
            lease = Lease(
                credential_id=credential_id,
                workflow_id=run.id,
                task_id=request.task_id,
                target=target.name,
                kind=target.kind,
                sensitivity=target.sensitivity,
                holder=caller.principal_id,
                owner=run.owner,
                chain=chain,
                issued_at=now,
                expires_at=now + ttl,
                revocable=target.revocable,
                approval_id=presented.approval_id if presented is not None else None,
                tool=request.tool,
                justification=request.justification,
            )
            # The Idempotency-Key is bound in the same atomic command as the write-ahead
            # record: bound to a credential only if its record exists, and a key seen before
            # writes nothing.
            try:
                existing = await self._ledger.write_ahead(
                    lease,
                    idempotency=IdempotencyBinding(
                        f"{caller.principal_id}|{request.idempotency_key}",
                        _fingerprint(caller.principal_id, request, params),
                        self._idempotency_ttl,
                    )
                    if request.idempotency_key is not None
                    else None,
                    limits=IssuanceLimits(
                        self._live_limit, target.max_live_per_identity, self._rate_limit
                    ),
                )
            except (ConflictError, ForbiddenError, LimitExceededError):
                # The key is another request's, the id is taken, a limit, or since the reads
                # above the run ended or a quarantine was stored: nothing written or bound.
                raise
            except Exception:
                # The command may have run with its answer lost: nothing will be minted, so
                # the key must not stay bound to this credential (a retry with it would get a
                # replay of nothing).
                await self._forget_binding(caller, request, credential_id)
                raise
            if existing is not None:
                raise IdempotentReplayError(existing)
        except Exception as exc:
            # Refused or failed before the mint: nothing exists under the approval.
            await self._release_unminted(used, exc)
            raise
        try:
            minted = await self._minter.mint(
                MintSpec(
                    credential_id=credential_id,
                    workflow_id=run.id,
                    task_id=request.task_id,
                    holder=caller.principal_id,
                    owner=run.owner,
                    chain=chain,
                    target=target,
                    ttl=ttl,
                    params=params,
                )
            )
        except MintOutcomeUnknownError:
            # A task token may exist: the write-ahead record stays (due at its expiry) for the
            # sweeper, and the reconciler finds the token by its metadata (SECURITY 23). The
            # approval stays used.
            raise
        except TaskleaseError as exc:
            # Definitely refused, nothing left in Vault: no record, and a retry may mint (with
            # the same approval, released here).
            await self._forget_refused(lease, caller, request)
            await self._release_unminted(used, exc)
            raise
        # The durable record and the audit events (decision, issuance) are both conditions for
        # handing out the secret and independent of each other, so they are written at the
        # same time: the request waits for the slower of two fsyncs, not for their sum. If the
        # record fails, the audit trail says "issued" and then "revoked" (the sweeper confirms
        # the revocation of the write-ahead record), which is what happened in OpenBao.
        # The minter's last step (shortening a database lease to the task) runs alongside.
        recorded, audited, finished = await asyncio.gather(
            self._ledger.activate(
                credential_id,
                token_accessor=minted.token_accessor,
                vault_lease_ids=minted.vault_lease_ids,
                written=lease,
            ),
            self._record_issued(lease, attempt, minted.token_accessor, minted.vault_lease_ids),
            minted.finish() if minted.finish is not None else _nothing(),
            return_exceptions=True,
        )
        if isinstance(recorded, BaseException):
            if not isinstance(recorded, TaskleaseError):
                raise recorded
            # Not durably recorded (or the task was revoked meanwhile): the secret must not
            # leave. Revoke now; the write-ahead record stays due, so the sweeper retries.
            with contextlib.suppress(TaskleaseError):
                await self._minter.revoke(
                    token_accessor=minted.token_accessor, vault_lease_ids=minted.vault_lease_ids
                )
            # Nothing was handed out: a retry with the same key may mint afresh.
            await self._forget_binding(caller, request, credential_id)
            if isinstance(recorded, NotFoundError):
                # The write-ahead record vanished (Redis lost data): a ledger failure, not a
                # missing resource of the caller's.
                raise LedgerUnavailableError(
                    f"the ledger lost the record of {credential_id} while it was being minted "
                    "(Redis data loss?); the credential was revoked",
                    reason="ledger.record_lost",
                ) from recorded
            raise recorded
        active = recorded
        for failure in (audited, finished):
            if isinstance(failure, BaseException):
                if isinstance(failure, TaskleaseError):
                    await self._revoke_unreturned(
                        active,
                        minted.token_accessor,
                        minted.vault_lease_ids,
                        reason=_AUDIT_UNAVAILABLE
                        if isinstance(failure, AuditUnavailableError)
                        else _MINT_UNFINISHED,
                    )
                    await self._forget_binding(caller, request, credential_id)
                raise failure
        # The audit trail carries this (stdout sink); at info level it would print twice.
        _log.debug(
            "credential.issued",
            credential_id=credential_id,
            workflow_id=run.id,
            task_id=request.task_id,
            target=target.name,
            kind=target.kind.value,
            holder=caller.principal_id,
            owner=run.owner,
            expires_at=active.expires_at.isoformat(),
            token_accessor=minted.token_accessor,
            policy_ids=list(decision.policy_ids),
        )
        return IssuedCredential(lease=active, secret=minted.secret, decision=decision)

    # ---- audit

    async def _record(self, event: AuditEvent) -> None:
        if self._audit is not None:
            await self._audit.record(event)

    async def _record_issued(
        self,
        lease: Lease,
        attempt: _Attempt,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
    ) -> None:
        """Record the decision and the issuance (raises AuditUnavailableError when a durable
        sink cannot take them; the caller then revokes and fails closed with 503)."""
        if self._audit is None or attempt.decision is None:
            return
        decision = attempt.decision
        issued = _event(
            lease.holder,
            CredentialIssued(
                target=lease.target,
                kind=lease.kind.value,
                expires_at=lease.expires_at,
                ttl_seconds=int((lease.expires_at - lease.issued_at).total_seconds()),
                token_accessor=token_accessor,
                vault_lease_count=len(vault_lease_ids),
                policy_ids=decision.policy_ids,
                revocable=lease.revocable,
            ),
            self._clock.now(),
            chain=lease.chain,
            workflow_id=lease.workflow_id,
            task_id=lease.task_id,
            credential_id=lease.credential_id,
            approval_id=lease.approval_id or "",
        )
        # The decision names the credential it allowed: a credential's story
        # (``GET /v1/audit?credential_id=``) starts with why it was issued.
        decided = attempt.decision_event(
            lease.holder,
            workflow_id=lease.workflow_id,
            task_id=lease.task_id,
            approval_id=lease.approval_id or "",
            credential_id=lease.credential_id,
        )
        await self._audit.record_all((decided, issued))

    async def _revoke_unreturned(
        self,
        lease: Lease,
        token_accessor: str,
        vault_lease_ids: tuple[str, ...],
        *,
        reason: str,
    ) -> None:
        """A recorded credential must not be handed out after all (the trail could not take
        its issuance, or the minter could not finish it): revoke it now and leave its record
        due with the reason, so the sweeper confirms the revocation (fail closed)."""
        _log.error(
            "credential.unaudited_revoked"
            if reason == _AUDIT_UNAVAILABLE
            else "credential.unfinished_revoked",
            credential_id=lease.credential_id,
            workflow_id=lease.workflow_id,
            token_accessor=token_accessor,
        )
        with contextlib.suppress(TaskleaseError):
            await self._minter.revoke(
                token_accessor=token_accessor, vault_lease_ids=vault_lease_ids
            )
        with contextlib.suppress(TaskleaseError):
            # Due now with the reason: the sweeper confirms the revocation and records it.
            await self._ledger.save_lease(
                dataclasses.replace(lease, state=LeaseState.REVOKING, revoke_reason=reason)
            )
        with contextlib.suppress(TaskleaseError):
            await self._ledger.schedule(lease.credential_id, self._clock.now())

    async def _record_refusal(
        self,
        caller: Caller,
        request: CredentialRequest,
        attempt: _Attempt,
        error: TaskleaseError | None,
    ) -> None:
        """Record a refused (or pending) request: its decision, if one was made, and
        ``credential.denied`` (not for a pending approval). Never masks the refusal."""
        if self._audit is None:
            return
        events: list[AuditEvent] = []
        if attempt.decision is not None:
            events.append(
                attempt.decision_event(
                    caller.principal_id,
                    workflow_id=request.workflow_id,
                    task_id=request.task_id,
                    approval_id=request.approval_id or "",
                )
            )
        if error is not None:
            policy_ids = error.policy_ids if isinstance(error, PolicyDeniedError) else ()
            events.append(
                _event(
                    caller.principal_id,
                    CredentialDenied(
                        target=request.target,
                        reason=error.reason,
                        detail=printable(error.detail, 500),
                        policy_ids=policy_ids,
                    ),
                    attempt.now or self._clock.now(),
                    chain=attempt.chain,
                    workflow_id=request.workflow_id,
                    task_id=request.task_id,
                    approval_id=request.approval_id or "",
                )
            )
        if not events:
            return
        try:
            await self._audit.record_all(events)
        except TaskleaseError as exc:
            _log.error(
                "credential.refusal_not_audited",
                workflow_id=request.workflow_id,
                task_id=request.task_id,
                reason=exc.reason,
            )

    async def _release_unminted(self, used: Approval | None, error: BaseException) -> None:
        """Release the approval this attempt used, because nothing was minted under it (only
        called where that is certain). Best effort: a failure leaves it used, is logged, and
        never changes the error the agent gets."""
        if used is None or self._approvals is None:
            return
        cause = error.reason if isinstance(error, TaskleaseError) else type(error).__name__
        try:
            await self._approvals.release(used, cause=cause)
        except Exception as exc:  # noqa: BLE001 - the attempt's own error stands
            _log.warning(
                "approval.release_failed",
                approval_id=used.id,
                credential_id=used.credential_id,
                error_type=type(exc).__name__,
                reason=exc.reason if isinstance(exc, TaskleaseError) else "",
            )

    async def _forget_refused(
        self, lease: Lease, caller: Caller, request: CredentialRequest
    ) -> None:
        """Undo the write-ahead (and the idempotency binding) of a mint Vault definitely
        refused (SECURITY 24). Best effort: a record left behind is revoked by the sweeper."""
        try:
            await self._ledger.discard(lease)
        except TaskleaseError as exc:
            _log.warning(
                "ledger.discard_failed",
                credential_id=lease.credential_id,
                reason=exc.reason,
            )
        await self._forget_binding(caller, request, lease.credential_id)

    async def _forget_binding(
        self, caller: Caller, request: CredentialRequest, credential_id: str
    ) -> None:
        """Free the request's Idempotency-Key if it is still bound to ``credential_id`` (never
        minted, or minted and revoked before anything was handed out), so that a retry with it
        may mint. Best effort: a binding left behind expires with the idempotency TTL (and a
        retry meanwhile gets 409 idempotency_replayed). Never after an unknown mint outcome: a
        token may exist, and the replay names it."""
        if request.idempotency_key is None:
            return
        try:
            await self._ledger.forget_idempotency(
                f"{caller.principal_id}|{request.idempotency_key}", credential_id
            )
        except TaskleaseError as exc:
            _log.warning(
                "ledger.forget_idempotency_failed",
                credential_id=credential_id,
                reason=exc.reason,
            )


# Lease.revoke_reason of a credential revoked because its issuance could not be audited.
_AUDIT_UNAVAILABLE = "audit_unavailable"
# The minter could not finish a recorded credential (a lease it could not bound to the task).
_MINT_UNFINISHED = "mint_unfinished"


@dataclass
class _Attempt:
    """What one issuance attempt decided, for its audit events."""

    decision: Decision | None = None
    target: Target | None = None
    chain: DelegationChain | None = None
    now: datetime | None = None

    def decided(
        self, decision: Decision, target: Target, chain: DelegationChain, now: datetime
    ) -> None:
        """Note the policy decision (recorded with the issuance or the refusal)."""
        self.decision, self.target, self.chain, self.now = decision, target, chain, now

    def decision_event(
        self,
        actor: str,
        *,
        workflow_id: str,
        task_id: str,
        approval_id: str,
        credential_id: str = "",
    ) -> AuditEvent:
        """The ``policy.decision`` event of this attempt, with the full evaluated context
        (principal, action, resource and context as the policy engine saw them), naming the
        credential it allowed when one was issued."""
        decision, target = self.decision, self.target
        if decision is None or target is None or self.now is None:
            raise ValueError("no decision was made")
        return _event(
            actor,
            PolicyDecision(
                action=ActionName.REQUEST_CREDENTIAL.value,
                target=target.name,
                outcome=decision.outcome.value,
                policy_ids=decision.policy_ids,
                reasons=decision.reasons,
                context=decision.context,
                max_ttl_seconds=(
                    int(decision.max_ttl.total_seconds()) if decision.max_ttl else None
                ),
            ),
            self.now,
            chain=self.chain,
            workflow_id=workflow_id,
            task_id=task_id,
            credential_id=credential_id,
            approval_id=approval_id,
        )


def _event(
    actor: str,
    payload: Payload,
    time: datetime,
    *,
    chain: DelegationChain | None = None,
    workflow_id: str = "",
    task_id: str = "",
    credential_id: str = "",
    approval_id: str = "",
) -> AuditEvent:
    return AuditEvent(
        event_id=f"evt_{secrets.token_hex(12)}",
        time=time,
        actor=actor,
        payload=payload,
        chain=chain,
        workflow_id=workflow_id,
        task_id=task_id,
        credential_id=credential_id,
        approval_id=approval_id,
        request_id=current_request_id(),
    )


async def _nothing() -> None:
    """Nothing left to finish."""


def _fingerprint(holder: str, request: CredentialRequest, params: Mapping[str, str]) -> str:
    material = json.dumps(
        [
            holder,
            request.workflow_id,
            request.task_id,
            request.target,
            int(request.ttl.total_seconds()),
            sorted(params.items()),
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(material.encode()).hexdigest()
