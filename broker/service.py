"""The use cases, written against ``broker.core.ports`` only."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from broker.core.authn import Caller
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.model import (
    ActionName,
    CredentialRequest,
    Decision,
    DecisionOutcome,
    DelegationHop,
    Lease,
    Quarantine,
    QuarantineKind,
    Target,
    WorkflowRun,
    credential_ttl,
)
from broker.core.ports import (
    CheckResult,
    Clock,
    LeaseSelector,
    Ledger,
    MintSpec,
    PolicyEngine,
    PolicyRequest,
    QuarantineStore,
    ReadinessCheck,
    SecretMinter,
)
from broker.core.roles import Role, SpiffeIdPattern
from broker.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    IdempotentReplayError,
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
    ) -> None:
        self._policy = policy
        self._minter = minter
        self._ledger = ledger
        self._targets = dict(targets)
        self._clock = clock
        self._quarantines = quarantines
        self._max_run_duration = max_run_duration
        self._idempotency_ttl = idempotency_ttl

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
        _require(caller, Role.ORCHESTRATOR, "start a workflow run")
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
        if not await self._ledger.create_run(run):
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

    # ---- quarantine

    async def set_quarantine(
        self, caller: Caller, *, kind: QuarantineKind, value: str, reason: str, ttl: timedelta
    ) -> Quarantine:
        """An admin blocks new issuance for an identity (or prefix), a run or a target."""
        _require(caller, Role.ADMIN, "quarantine")
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
        return quarantine

    async def lift_quarantine(self, caller: Caller, *, kind: QuarantineKind, value: str) -> None:
        """An admin lifts a quarantine before it expires."""
        _require(caller, Role.ADMIN, "lift a quarantine")
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

    async def list_quarantines(self, caller: Caller) -> list[Quarantine]:
        """The active quarantines."""
        _require(caller, Role.ADMIN, "list quarantines")
        return await self._quarantine_store().quarantines(self._clock.now())

    def _quarantine_store(self) -> QuarantineStore:
        if self._quarantines is None:
            raise UnavailableError(
                "quarantines are not configured", reason="quarantine.unavailable"
            )
        return self._quarantines

    async def _refuse_quarantined(
        self, principal: str, workflow_id: str, target: str, now: datetime
    ) -> None:
        if self._quarantines is None:
            return
        for quarantine in await self._quarantines.quarantines(now):
            if quarantine.blocks(principal=principal, workflow_id=workflow_id, target=target):
                raise ForbiddenError(
                    f"issuance is quarantined: {quarantine.kind.value} {quarantine.value!r} "
                    f"until {quarantine.expires_at.isoformat()} ({quarantine.reason})",
                    reason="quarantine.active",
                )

    # ---- issuance

    async def request_credential(
        self,
        caller: Caller,
        request: CredentialRequest,
        *,
        params: Mapping[str, str],
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
        _require(caller, Role.AGENT, "request a credential")
        identity = caller.identity
        now = self._clock.now()
        run = await self._ledger.get_run(request.workflow_id)
        if run is None:
            raise NotFoundError(
                f"no workflow run {request.workflow_id!r}", reason="workflow.not_found"
            )
        if not run.is_active(now):
            raise ConflictError(
                f"workflow run {run.id!r} is not active (state {run.state.value}, deadline "
                f"{run.deadline.isoformat()})",
                reason="workflow.not_active",
            )
        target = self._targets.get(request.target)
        if target is None:
            raise NotFoundError(
                f"no target {request.target!r} (known: {sorted(self._targets)})",
                reason="target.unknown",
            )
        await self._refuse_quarantined(caller.principal_id, run.id, target.name, now)
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
            )
        )
        _log.info(
            "policy.decision",
            workflow_id=run.id,
            task_id=request.task_id,
            target=target.name,
            principal=caller.principal_id,
            outcome=decision.outcome.value,
            policy_ids=list(decision.policy_ids),
        )
        if decision.outcome is DecisionOutcome.NEEDS_APPROVAL:
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
        )
        credential_id = f"cred_{secrets.token_hex(12)}"
        if request.idempotency_key is not None:
            existing = await self._ledger.remember_idempotency(
                f"{caller.principal_id}|{request.idempotency_key}",
                _fingerprint(caller.principal_id, request, params),
                credential_id,
                ttl=self._idempotency_ttl,
            )
            if existing is not None:
                raise IdempotentReplayError(existing)
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
        )
        await self._ledger.write_ahead(lease)
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
        try:
            active = await self._ledger.activate(
                credential_id,
                token_accessor=minted.token_accessor,
                vault_lease_ids=minted.vault_lease_ids,
            )
        except TaskleaseError:
            # Not durably recorded (or the task was revoked meanwhile): the secret must not
            # leave. Revoke now; the write-ahead record stays due, so the sweeper retries.
            with contextlib.suppress(TaskleaseError):
                await self._minter.revoke(
                    token_accessor=minted.token_accessor, vault_lease_ids=minted.vault_lease_ids
                )
            raise
        _log.info(
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


def _require(caller: Caller, role: Role, what: str) -> None:
    if role not in caller.roles:
        raise ForbiddenError(
            f"{caller.principal_id} needs the {role.value} role to {what} "
            f"(has {sorted(r.value for r in caller.roles)})",
            reason="auth.role_required",
        )


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
