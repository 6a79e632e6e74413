"""Continuous authorization: live credentials are decided again when what allowed them changes.

A credential is allowed at request time. Afterwards the policy set can change (hot reload),
a target's sensitivity can change (catalog reload), an approval can be withdrawn, a quarantine
can be set. :class:`ContinuousAuthorizer` then re-evaluates the affected live leases (issuing
or active) as if each were requested again *now*, from what the ledger recorded:

* the holder (principal) and its roles under the current role map, its trust domain;
* the run as stored (must still exist and be active), its owner, purpose, labels, participants;
* the delegation chain stamped into the lease; the task, tool and justification it was asked
  for; its lifetime (``expires_at - issued_at``) as the TTL;
* the target as the catalog in force has it now (a removed target is a denial);
* the approval it was issued with, as the approvals store reports it now (withdrawn: not
  approved); a lease issued with an approval when no store can be asked is decided without
  it (fail closed);
* the quarantines in force (one that covers the lease is a denial, as at issuance).

Every live lease the change covers is decided, however many there are: the ledger streams them
(``Ledger.iter_leases``) in batches of ``batch`` (default :data:`REEVALUATION_BATCH`), and each
batch is decided and its denied leases revoked before the next is read, so memory is bounded by
a batch (the run cache is per batch too), not by the number of live leases.

A lease is *denied now* when the decision is not an allow, or when it is an allow whose TTL cap
is shorter than the lease's lifetime (a credential may not outlive what policy allows now).
Denied leases are revoked through :meth:`broker.revocation.Revoker.revoke_leases` (tasks
tombstoned, intent recorded, revoked in OpenBao and confirmed; failures retried by the
sweeper) with the revoke reason ``continuous_authorization``. Each one confirmed revoked gets a
``credential.revoked`` audit event with ``cause="continuous_authorization"`` and a ``reason``
naming the trigger and the decision. A lease that cannot be revoked early (SSH) is reported
still live and ends at its (short) expiry. The report and the ``continuous.reevaluated`` log
line count every lease examined, denied, confirmed revoked and still live.

Limits: a request decided under the old set that writes its lease ahead while the re-evaluation
runs may or may not be read by it, and one written after it is not; such a credential lives at
most its TTL under the old set. A re-evaluation that fails part-way (the ledger unreachable) has
revoked the denied leases of the batches before; it logs ``continuous.incomplete`` with an alert
and raises, and is not retried by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter

from broker.core.approvals import ApprovalStatus
from broker.core.audit import AuditEvent, AuditTrail, CredentialRevoked
from broker.core.model import (
    ActionName,
    Lease,
    LeaseState,
    Quarantine,
    QuarantineKind,
    Target,
    WorkflowRun,
)
from broker.core.ports import (
    ApprovalState,
    ApprovalStore,
    Clock,
    LeaseSelector,
    Ledger,
    PolicyEngine,
    PolicyRequest,
    QuarantineStore,
)
from broker.core.roles import Role, RoleMap
from broker.core.spiffe_id import SpiffeId
from broker.core.untrusted import printable
from broker.errors import SpiffeIdError, TaskleaseError
from broker.revocation import (
    MAX_ADDRESSED,
    LeaseResult,
    RevocationReport,
    Revoker,
    RevokeReason,
    SettleOutcome,
)

_log = structlog.get_logger("broker.continuous")

CAUSE: Final = RevokeReason.CONTINUOUS_AUTHORIZATION.value
# Leases decided again: live ones not already being revoked.
_REEVALUATED_STATES: Final = frozenset({LeaseState.ISSUING, LeaseState.ACTIVE})
_REASON_LIMIT = 500
# Leases read, decided and (the denied ones) revoked at a time.
REEVALUATION_BATCH: Final = 1000
# Denied verdicts and still-live results a report keeps as examples (the totals count every
# one; each denied lease is also logged, and audited once revoked).
REPORT_SAMPLE: Final = 100


class ApprovalStates(Protocol):
    """What the approvals store says about an approval a lease was issued with."""

    async def approval_state(self, approval_id: str, now: datetime) -> ApprovalState | None:
        """The approval's standing now: ``approved`` while it is granted and neither denied,
        withdrawn nor expired (having been used for this lease's issuance does not un-approve
        it); None when the store does not know it."""
        ...


class ApprovalStoreStates:
    """:class:`ApprovalStates` from the approval store (``core.ports.ApprovalStore``).

    An approval counts as approved while it is ``approved`` or ``used`` (the lease re-evaluated
    is the one that used it) and not expired; ``withdrawn``, ``denied``, ``expired`` and
    ``pending`` do not count.
    """

    def __init__(self, store: ApprovalStore) -> None:
        self._store = store

    async def approval_state(self, approval_id: str, now: datetime) -> ApprovalState | None:
        """The approval's standing at ``now``, or None when the store does not know it."""
        approval = await self._store.get_approval(approval_id)
        if approval is None:
            return None
        status = approval.status_at(now)
        return ApprovalState(
            approval_id=approval.id,
            approved=status in (ApprovalStatus.APPROVED, ApprovalStatus.USED),
            approvers=approval.approvers,
            expires_at=approval.expires_at,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """One lease decided again: ``denied`` with why, or kept."""

    lease: Lease
    denied: bool
    why: str = ""
    policy_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReevaluationReport:
    """What one re-evaluation did, over every lease it examined (all the live leases the
    selector covers, in ``batches``): how many it examined and denied, how many of the denied
    are confirmed revoked and how many are still live (not revocable early, or left to the
    sweeper's retries), and the first :data:`REPORT_SAMPLE` denied verdicts and still-live
    results as examples."""

    reason: str
    examined: int = 0
    denied: int = 0
    confirmed_revoked: int = 0
    still_live: int = 0
    batches: int = 0
    denied_sample: tuple[Verdict, ...] = ()
    still_live_sample: tuple[LeaseResult, ...] = ()

    def add(self, verdicts: list[Verdict], revocation: RevocationReport) -> ReevaluationReport:
        """This report with one more batch: its verdicts and their revocation."""
        denied = [v for v in verdicts if v.denied]
        still_live = revocation.still_live
        return dataclasses.replace(
            self,
            examined=self.examined + len(verdicts),
            denied=self.denied + len(denied),
            confirmed_revoked=self.confirmed_revoked + len(revocation.confirmed_revoked),
            still_live=self.still_live + len(still_live),
            batches=self.batches + 1,
            denied_sample=(self.denied_sample + tuple(denied))[:REPORT_SAMPLE],
            still_live_sample=(self.still_live_sample + still_live)[:REPORT_SAMPLE],
        )


class ContinuousMetrics:
    """Prometheus instruments of continuous authorization, on ``registry`` if given."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.reevaluated = Counter(
            "tasklease_continuous_reevaluated_leases",
            "Live leases decided again after a change",
            registry=registry,
        )
        self.denied = Counter(
            "tasklease_continuous_denied_leases",
            "Live leases denied when decided again (and revoked)",
            registry=registry,
        )


class ContinuousAuthorizer:
    """Re-evaluates live leases against current policy and revokes the ones now denied.

    Call :meth:`reevaluate` with a selector of the leases a change affects; the approvals
    code calls it with the run and task of a withdrawn approval and ``approval_id``. The
    policy reloader calls :meth:`policy_changed` and :meth:`targets_changed`;
    :class:`ReevaluatingQuarantines` calls :meth:`quarantine_set` (in the background).
    """

    def __init__(
        self,
        *,
        ledger: Ledger,
        policy: PolicyEngine,
        targets: Mapping[str, Target],
        roles: RoleMap,
        revoker: Revoker,
        clock: Clock,
        audit: AuditTrail | None = None,
        quarantines: QuarantineStore | None = None,
        approvals: ApprovalStates | None = None,
        actor: str = "tasklease",
        metrics: ContinuousMetrics | None = None,
        batch: int = REEVALUATION_BATCH,
    ) -> None:
        if not 1 <= batch <= MAX_ADDRESSED:  # the ledger's limit per call
            raise ValueError(f"batch must be between 1 and {MAX_ADDRESSED}, got {batch}")
        self._ledger = ledger
        self._policy = policy
        self._targets = targets
        self._roles = roles
        self._revoker = revoker
        self._clock = clock
        self._audit = audit
        self._quarantines = quarantines
        self._approvals = approvals
        self._actor = actor
        self.metrics = metrics or ContinuousMetrics()
        self._batch = batch
        self._background: set[asyncio.Task[Any]] = set()

    # ---- triggers

    async def policy_changed(self, *, trigger: str) -> None:
        """A new policy set is in force: every live lease is decided again."""
        await self.reevaluate(LeaseSelector(everything=True), f"the policy set changed ({trigger})")

    async def targets_changed(self, names: frozenset[str], *, trigger: str) -> None:
        """Targets changed in the catalog: their live leases are decided again."""
        for name in sorted(names):
            await self.reevaluate(
                LeaseSelector(target=name), f"target {name!r} changed in the catalog ({trigger})"
            )

    async def quarantine_set(self, quarantine: Quarantine) -> ReevaluationReport:
        """A quarantine was set: the live leases it covers are decided again (and denied)."""
        selector = _QUARANTINE_SELECTOR[quarantine.kind](quarantine.value)
        return await self.reevaluate(
            selector,
            f"quarantine set: {quarantine.kind.value} {printable(quarantine.value, 200)} "
            f"({printable(quarantine.reason, 200)})",
        )

    def in_background(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``work`` without making the caller wait (an admin's quarantine request);
        failures are logged. :meth:`close` cancels what is still running."""
        task = asyncio.get_running_loop().create_task(self._logged(work, name), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the background re-evaluations started so far."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        """Cancel background re-evaluations (the broker stops)."""
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- the re-evaluation

    async def reevaluate(
        self, selector: LeaseSelector, reason: str, *, approval_id: str | None = None
    ) -> ReevaluationReport:
        """Decide every live lease ``selector`` matches (only those issued with
        ``approval_id``, when given) again, now; revoke the ones denied. ``reason`` says
        what changed; it is stamped into each revocation's audit event. The leases are read,
        decided and revoked a batch at a time; the report counts all of them."""
        live = dataclasses.replace(selector, states=_REEVALUATED_STATES)
        report = ReevaluationReport(reason=reason)
        try:
            async with contextlib.aclosing(
                self._ledger.iter_leases(live, batch=self._batch)
            ) as batches:
                async for found in batches:
                    leases = [
                        lease
                        for lease in found
                        if approval_id is None or lease.approval_id == approval_id
                    ]
                    if leases:
                        report = await self._reevaluate_batch(leases, report)
        except Exception as exc:
            # The batches before are decided and revoked; the rest stay live until the next
            # change covers them, or their TTL.
            _log.error(
                "continuous.incomplete",
                trigger=printable(reason, _REASON_LIMIT),
                examined=report.examined,
                denied=report.denied,
                error=type(exc).__name__,
                reason=exc.reason if isinstance(exc, TaskleaseError) else "",
                alert=True,
            )
            raise
        _log.info(
            "continuous.reevaluated",
            trigger=printable(reason, _REASON_LIMIT),
            examined=report.examined,
            denied=report.denied,
            confirmed_revoked=report.confirmed_revoked,
            still_live=report.still_live,
            batches=report.batches,
        )
        return report

    async def _reevaluate_batch(
        self, leases: list[Lease], report: ReevaluationReport
    ) -> ReevaluationReport:
        """Decide one batch at the current time and revoke its denied leases; the report
        with the batch added."""
        reason = report.reason
        now = self._clock.now()
        quarantines = (
            await self._quarantines.quarantines(now) if self._quarantines is not None else []
        )
        runs: dict[str, WorkflowRun | None] = {}  # this batch's runs, read once each
        verdicts = [await self._verdict(lease, now, runs, quarantines) for lease in leases]
        denied = [v for v in verdicts if v.denied]
        self.metrics.reevaluated.inc(len(verdicts))
        self.metrics.denied.inc(len(denied))
        for verdict in denied:
            _log.warning(
                "continuous.denied",
                credential_id=verdict.lease.credential_id,
                workflow_id=verdict.lease.workflow_id,
                task_id=verdict.lease.task_id,
                target=verdict.lease.target,
                holder=verdict.lease.holder,
                trigger=printable(reason, _REASON_LIMIT),
                why=printable(verdict.why, _REASON_LIMIT),
                policy_ids=list(verdict.policy_ids),
            )
        revocation = (
            await self._revoker.revoke_leases(
                [v.lease for v in denied], RevokeReason.CONTINUOUS_AUTHORIZATION
            )
            if denied
            else RevocationReport(results=())
        )
        await self._record(denied, revocation, reason, now)
        return report.add(verdicts, revocation)

    async def _verdict(
        self,
        lease: Lease,
        now: datetime,
        runs: dict[str, WorkflowRun | None],
        quarantines: list[Quarantine],
    ) -> Verdict:
        target = self._targets.get(lease.target)
        if target is None:
            return Verdict(lease, True, f"target {lease.target!r} is no longer in the catalog")
        if lease.workflow_id not in runs:
            runs[lease.workflow_id] = await self._ledger.get_run(lease.workflow_id)
        run = runs[lease.workflow_id]
        if run is None:
            return Verdict(lease, True, f"workflow run {lease.workflow_id!r} no longer exists")
        if not run.is_active(now):
            state = run.state.value if now < run.deadline else "past its deadline"
            return Verdict(lease, True, f"workflow run {run.id!r} is no longer active ({state})")
        for quarantine in quarantines:
            if quarantine.blocks(principal=lease.holder, workflow_id=run.id, target=target.name):
                return Verdict(
                    lease,
                    True,
                    f"quarantined: {quarantine.kind.value} {quarantine.value!r} "
                    f"({quarantine.reason})",
                )
        decision = self._policy.decide(
            PolicyRequest(
                principal=lease.holder,
                principal_roles=frozenset(role.value for role in self._roles_of(lease.holder)),
                trust_domain=_trust_domain(lease.holder),
                action=ActionName.REQUEST_CREDENTIAL.value,
                target=target,
                run=run,
                chain=lease.chain,
                task_id=lease.task_id,
                tool=lease.tool,
                justification=lease.justification,
                ttl=lease.expires_at - lease.issued_at,
                now=now,
                approval=await self._approval(lease, now),
            )
        )
        if not decision.allowed:
            return Verdict(
                lease,
                True,
                f"{decision.outcome.value}: {'; '.join(decision.reasons)}",
                decision.policy_ids,
            )
        lifetime = lease.expires_at - lease.issued_at
        if decision.max_ttl is not None and lifetime > decision.max_ttl:
            return Verdict(
                lease,
                True,
                f"it lives {_seconds(lifetime)} s, longer than the {_seconds(decision.max_ttl)} s "
                "policy now allows",
                decision.policy_ids,
            )
        return Verdict(lease, False, policy_ids=decision.policy_ids)

    def _roles_of(self, holder: str) -> frozenset[Role]:
        try:
            spiffe_id = SpiffeId.parse(holder)
        except SpiffeIdError:
            return frozenset()
        roles: frozenset[Role] = frozenset()
        for rule in self._roles.workload_rules:
            if rule.pattern.matches(spiffe_id):
                roles |= rule.roles
        return roles

    async def _approval(self, lease: Lease, now: datetime) -> ApprovalState | None:
        if lease.approval_id is None or self._approvals is None:
            return None
        return await self._approvals.approval_state(lease.approval_id, now)

    async def _record(
        self,
        denied: list[Verdict],
        revocation: RevocationReport,
        reason: str,
        now: datetime,
    ) -> None:
        by_id = {v.lease.credential_id: v for v in denied}
        for result in revocation.results:
            verdict = by_id.get(result.credential_id)
            if verdict is None:
                continue
            lease = verdict.lease
            if result.outcome not in (SettleOutcome.REVOKED, SettleOutcome.EXPIRED):
                _log.warning(
                    "continuous.revocation_pending",
                    credential_id=lease.credential_id,
                    outcome=result.outcome.value,
                    detail=printable(result.detail, 300),
                )
                continue
            if self._audit is None:
                continue
            event = AuditEvent(
                event_id=f"evt_{secrets.token_hex(12)}",
                time=now,
                actor=self._actor,
                payload=CredentialRevoked(
                    cause=CAUSE,
                    target=lease.target,
                    reason=printable(f"{reason}: {verdict.why}", _REASON_LIMIT),
                ),
                chain=lease.chain,
                workflow_id=lease.workflow_id,
                task_id=lease.task_id,
                credential_id=lease.credential_id,
                approval_id=lease.approval_id or "",
            )
            try:
                await self._audit.record(event)
            except TaskleaseError as exc:
                # The credential is revoked all the same: revocation never waits for audit.
                _log.error(
                    "continuous.audit_failed",
                    credential_id=lease.credential_id,
                    reason=exc.reason,
                    alert=True,
                )

    async def _logged(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except TaskleaseError as exc:
            _log.error("continuous.failed", work=name, reason=exc.reason, detail=exc.detail)
        except Exception as exc:  # noqa: BLE001 - a background task must log, not vanish
            _log.error("continuous.crashed", work=name, error=type(exc).__name__)


class ReevaluatingQuarantines:
    """A :class:`~broker.core.ports.QuarantineStore` that, after setting a quarantine,
    re-evaluates the live leases it covers (in the background: the admin's request does not
    wait for OpenBao). Satisfies ``core.ports.QuarantineStore``."""

    def __init__(
        self, *, store: QuarantineStore, authorizer: ContinuousAuthorizer | None = None
    ) -> None:
        self._store = store
        self._authorizer = authorizer

    def attach(self, authorizer: ContinuousAuthorizer) -> None:
        """Re-evaluate through ``authorizer`` from now on (the composition root builds the
        authorizer after the service that uses this store)."""
        self._authorizer = authorizer

    async def set_quarantine(self, quarantine: Quarantine) -> None:
        """Store it, then decide the leases it covers again."""
        await self._store.set_quarantine(quarantine)
        if self._authorizer is None:
            _log.warning("continuous.not_attached", kind=quarantine.kind.value)
            return
        self._authorizer.in_background(
            self._authorizer.quarantine_set(quarantine),
            f"quarantine:{quarantine.kind.value}",
        )

    async def lift_quarantine(self, kind: QuarantineKind, value: str) -> bool:
        """Remove it (nothing to re-evaluate: lifting grants nothing by itself)."""
        return await self._store.lift_quarantine(kind, value)

    async def quarantines(self, now: datetime) -> list[Quarantine]:
        """The quarantines in force."""
        return await self._store.quarantines(now)


_QUARANTINE_SELECTOR: Final = {
    QuarantineKind.IDENTITY: lambda value: LeaseSelector(holder=value),
    QuarantineKind.IDENTITY_PREFIX: lambda value: LeaseSelector(holder_prefix=value),
    QuarantineKind.WORKFLOW: lambda value: LeaseSelector(workflow_id=value),
    QuarantineKind.TARGET: lambda value: LeaseSelector(target=value),
}


def _trust_domain(holder: str) -> str:
    try:
        return SpiffeId.parse(holder).trust_domain.name
    except SpiffeIdError:
        return ""


def _seconds(duration: timedelta) -> int:
    return int(duration.total_seconds())
