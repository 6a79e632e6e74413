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

**Retried until done.** Each change is a *scope* (every live lease for a new policy set; one
target's, one quarantine's, one withdrawn approval's leases) re-evaluated by a background
worker of that scope. An attempt that fails part-way (the ledger unreachable) has revoked the
denied leases of the batches before; it logs ``continuous.incomplete`` (alert) and
``continuous.retry_scheduled``, and the scope is re-evaluated again, from the start under the
newest state, after a jittered exponential backoff (``retry_base`` doubling up to
``retry_cap``, each delay drawn from [delay/2, delay]) until an attempt completes
(``continuous.recovered``) or the broker stops. Coalescing: one scope never has two attempts at
once; a newer change of a scope replaces its waiting one (it decides the same leases under the
newer state); an attempt on every live lease takes over every narrower change waiting at the
moment it starts, and a narrower attempt that fails while such a full attempt runs or waits is
left to it. Narrower attempts do run alongside a full one (a quarantine does not wait behind a
long re-evaluation: revoking twice is harmless). While any scope has failed and not yet
completed, ``tasklease_continuous_pending`` counts it and the ``continuous`` readiness check
shows an alarm (the broker stays ready: issuance already decides under the new state).

**Changes made while no broker ran.** A digest of the decision inputs (policy set and schema,
targets catalog, workload role rules, working hours: :func:`decision_inputs_digest`) is stored
(``core.ports.ReevaluationMarkers``) each time a re-evaluation of every live lease *completes*
under inputs that did not change meanwhile. At start-up
(:meth:`ContinuousAuthorizer.reevaluate_if_inputs_changed`) a broker compares it with the inputs
in force; absent or different, it re-evaluates every live lease in the background (retried as
above) and stores the digest only once that completed. Replicas starting together may each do
it (re-evaluation is idempotent); none stores a digest for a re-evaluation it did not complete.

**Changes that must survive a stop.** A retry still pending when the broker stops (or is
killed) dies with the process. A policy or catalog change is picked up again at the next start
(the digest differs), and every quarantine in force is applied again at each start
(:meth:`ContinuousAuthorizer.reapply_quarantines`). A withdrawn approval has neither, so its
change is noted durably (``core.ports.PendingScopeRecords``: the approval, run and task ids
and the reason, on the ledger's Redis) *before the withdrawal is stored*: the approvals code
calls :meth:`ContinuousAuthorizer.note_withdrawal` (through :class:`ReevaluatingWithdrawals`)
right before its compare-and-set of a used approval's withdrawal, and hands the note to
:meth:`ContinuousAuthorizer.approval_withdrawn` once the withdrawal is stored; that job
carries the same record and clears it only once an attempt covering it completed (its own,
or a re-evaluation of every live lease that took it over). A broker killed at any point after
the withdrawal was stored thus leaves the record to the next start. A withdrawal that then
fails discards the record (:meth:`ContinuousAuthorizer.discard_withdrawal_note`) unless the
store says it was withdrawn all the same (then the credential is decided at once); a record
left over (the broker killed before storing the withdrawal, or the discard failed) is
resumed harmlessly: the approval is still used, the credential kept, the record cleared. A
record that cannot be stored never blocks the withdrawal: it is logged with an alert
(``continuous.pending_unrecorded``) and stored again before each attempt. At start-up
(:meth:`ContinuousAuthorizer.resume_pending`) every record is queued again, retried as any
scope (``continuous.pending_resumed`` counts them). Reads are bounded
(:data:`PENDING_READ_LIMIT`); more than :data:`RESUME_EACH_LIMIT` records, a read cut at its
limit, or an entry that does not parse (``continuous.pending_corrupt``, alert: its scope is
unknown) make it one re-evaluation of every live lease instead, which covers them all and
clears them once it completed (then reads the rest). Replicas resuming the same record each
decide its leases (idempotent; revocation is claim-based) and each clears it.

Limits: a request decided under the old set that writes its lease ahead while the re-evaluation
runs may or may not be read by it, and one written after it is not; such a credential lives at
most its TTL under the old set. During a rolling change, a replica still running the old inputs
keeps issuing under them after another replica stored the new digest; those credentials are not
decided again at later starts (SIGHUP the replicas, or they end at their TTL). A withdrawal's
record is written to the same Redis as the withdrawal and before it, so a Redis that loses the
record (neither waits for an fsync) has lost the withdrawal written after it too. Left to the
credential's TTL: a withdrawal whose record Redis refused (alerted) by a broker killed before
a later write of it succeeds; and a record another replica's start-up resumes and clears in
the instant between its write and the withdrawal's, the withdrawing broker then killed before
its own re-evaluation completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import random
import secrets
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Protocol, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from broker.core.approvals import Approval, ApprovalStatus
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
from broker.core.policy import WorkingHours
from broker.core.ports import (
    PENDING_APPROVAL,
    ApprovalState,
    ApprovalStore,
    CheckResult,
    Clock,
    LeaseSelector,
    Ledger,
    PendingScopeRecord,
    PendingScopeRecords,
    PendingScopesRead,
    PolicyEngine,
    PolicyRequest,
    QuarantineStore,
    ReevaluationMarker,
    ReevaluationMarkers,
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
_Read = TypeVar("_Read")

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
        self.pending = Gauge(
            "tasklease_continuous_pending",
            "Re-evaluations that failed and are not yet completed by a retry (credentials "
            "the change denies may still be live)",
            registry=registry,
        )
        self.failures = Counter(
            "tasklease_continuous_failures",
            "Re-evaluation attempts that failed (each is retried), by scope",
            ["scope"],
            registry=registry,
        )
        self.completed = Counter(
            "tasklease_continuous_completed",
            "Re-evaluations completed, by scope (a start-up or follow-up pass that found "
            "nothing changed counts too)",
            ["scope"],
            registry=registry,
        )


# --------------------------------------------------------------------------- decision inputs


class DecisionSources(Protocol):
    """What the policy reloader knows about the sets in force."""

    @property
    def policy_digest(self) -> str:
        """SHA-256 of the policy files and schema in force."""
        ...

    @property
    def targets_digest(self) -> str:
        """SHA-256 of the targets file in force."""
        ...

    @property
    def hours(self) -> WorkingHours:
        """The working window decisions see."""
        ...


def decision_inputs_digest(
    *, policy_digest: str, targets_digest: str, roles: RoleMap, hours: WorkingHours
) -> str:
    """SHA-256 over everything a re-evaluation decides with besides the lease itself and the
    live state (runs, quarantines, approvals): the policy set and schema and the targets
    catalog (their file digests, as the reloader computes them), the workload role rules
    (holders are workloads; people's rules decide nothing here) and the working hours."""
    rules = sorted(
        [str(rule.pattern), sorted(role.value for role in rule.roles)]
        for rule in roles.workload_rules
    )
    document = {
        "v": 1,
        "policy": policy_digest,
        "targets": targets_digest,
        "workload_roles": rules,
        "working_hours": [hours.start_hour_utc, hours.end_hour_utc, sorted(hours.days)],
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class DecisionInputs:
    """Callable: the digest of the decision inputs in force now (they follow hot reloads)."""

    def __init__(self, sources: DecisionSources, roles: RoleMap) -> None:
        self._sources = sources
        self._roles = roles

    def __call__(self) -> str:
        return decision_inputs_digest(
            policy_digest=self._sources.policy_digest,
            targets_digest=self._sources.targets_digest,
            roles=self._roles,
            hours=self._sources.hours,
        )


# --------------------------------------------------------------------------- scopes and retries

# Scope kinds (also the ``scope`` label of tasklease_continuous_failures_total: a closed set).
EVERYTHING: Final = "everything"
TARGET: Final = "target"
QUARANTINE: Final = "quarantine"
APPROVAL: Final = "approval"
RECENT: Final = "recent"
_SCOPE_LABEL: Final = {
    EVERYTHING: "every live lease",
    RECENT: "the live leases issued since a re-evaluation of every live lease began",
    TARGET: "a target's leases",
    QUARANTINE: "a quarantine's leases",
    APPROVAL: "a withdrawn approval's credential",
}
# How far before a re-evaluation of every live lease began its follow-up looks (clocks of
# replicas that disagree, a request decided before it began and written after).
FOLLOW_UP_SKEW: Final = timedelta(seconds=60)
# The backoff between attempts of one scope (the defaults of policy.reevaluation_retry_*).
RETRY_BASE: Final = timedelta(seconds=1)
RETRY_CAP: Final = timedelta(seconds=60)
# Start-up: pending records read at a time (ids and short text: a few MB at most), and
# how many of them are resumed each as its own scope; more (or an unreadable one) are left to
# one re-evaluation of every live lease, which covers them all.
PENDING_READ_LIMIT: Final = 5000
RESUME_EACH_LIMIT: Final = 100
# The reason stored with a pending record (the record's own limit keeps room for the
# truncation marker printable() appends).
_PENDING_REASON_TEXT: Final = 400
_STARTUP_REASON: Final = (
    "start-up: the policy set, targets catalog, roles or working hours in force differ from "
    "those every live lease was last decided under"
)


@dataclass(frozen=True, slots=True)
class ReevaluationScope:
    """Which live leases one change covers: ``kind`` (:data:`EVERYTHING`, :data:`TARGET`,
    :data:`QUARANTINE`, :data:`APPROVAL` or :data:`RECENT`), ``key`` (which one of that
    kind), the selector, and for a withdrawn approval its id (only the leases issued with
    it)."""

    kind: str
    key: str
    selector: LeaseSelector
    approval_id: str | None = None
    issued_since: datetime | None = None
    """Only the leases issued at or after this instant (the :data:`RECENT` follow-up)."""

    @property
    def slot(self) -> tuple[str, str]:
        """What identifies the scope: changes with the same slot coalesce."""
        return (self.kind, self.key)


EVERY_LIVE_LEASE: Final = ReevaluationScope(EVERYTHING, "", LeaseSelector(everything=True))


@dataclass(frozen=True, slots=True)
class PendingReevaluation:
    """A scope whose re-evaluation failed and has not completed since: how often it failed,
    since when, the last error's reason code, and the seconds until its next attempt (0 when
    one is running or about to)."""

    scope: ReevaluationScope
    reason: str
    failures: int
    since: datetime
    error: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class WithdrawalNote:
    """A used approval's re-evaluation, noted before its withdrawal is stored
    (:meth:`ContinuousAuthorizer.note_withdrawal`): the pending ``record`` (None without a
    pending store) and whether it is ``stored`` (False: the store refused it; it is stored
    again before each attempt)."""

    record: PendingScopeRecord | None
    stored: bool = False


@dataclass(eq=False)
class _Job:
    """One change to re-evaluate, waiting or running; carried over when coalesced."""

    scope: ReevaluationScope
    reason: str
    seq: int
    marks: bool = False  # store the decision-inputs marker once it completes
    check_marker: bool = False  # start-up: compare the stored marker first
    failures: int = 0
    since: datetime | None = None
    error: str = ""
    retry_at: float | None = None  # loop time of the next attempt; None: at once
    covers: int = 0  # a full attempt: the last change submitted when it started deciding
    waiters: list[asyncio.Future[ReevaluationReport | None]] = field(default_factory=list)
    # Durable records (core.ports.PendingScopeRecords) of the changes this job decides: the
    # ids stored (cleared once an attempt completed), the records not stored yet (noted
    # again before each attempt), and whether to read the records again once it completed
    # (a start-up read stopped at its limit).
    owed: set[str] = field(default_factory=set)
    unstored: list[PendingScopeRecord] = field(default_factory=list)
    then_resume: bool = False

    def take_owed(self, other: _Job) -> None:
        """Carry ``other``'s pending records (it is coalesced into this job): they are
        cleared once this job completes."""
        self.owed |= other.owed
        self.unstored += other.unstored
        self.then_resume = self.then_resume or other.then_resume
        other.owed, other.unstored, other.then_resume = set(), [], False

    def take_failures(self, other: _Job) -> None:
        """Carry ``other``'s failures (it is coalesced into this job): the alarm stays until
        this job completes."""
        if other.failures:
            self.failures = max(self.failures, other.failures)
            self.since = min(s for s in (self.since, other.since) if s is not None)
            self.error = self.error or other.error

    def take_over(self, other: _Job) -> None:
        """Stand in for ``other``, coalesced into this job before its attempt: its waiters
        get this job's outcome."""
        self.waiters.extend(other.waiters)
        other.waiters = []
        self.take_failures(other)
        self.take_owed(other)

    def settle(self, outcome: ReevaluationReport | BaseException | None) -> None:
        """Tell the waiters of this attempt how it ended."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if isinstance(outcome, asyncio.CancelledError):
                waiter.cancel()
            elif isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)


@dataclass(eq=False)
class _Slot:
    """A scope's worker: at most one attempt running and one job waiting."""

    key: tuple[str, str]
    running: _Job | None = None
    queued: _Job | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class ContinuousAuthorizer:
    """Re-evaluates live leases against current policy and revokes the ones now denied.

    Triggers (each queues its scope; see the module docstring for retries and coalescing):
    the policy reloader calls :meth:`policy_changed` and :meth:`targets_changed` (they return
    at once); :class:`ReevaluatingQuarantines` calls :meth:`quarantine_set` and the approvals
    code, through :class:`ReevaluatingWithdrawals`, :meth:`note_withdrawal` before it stores a
    withdrawal and :meth:`approval_withdrawn` after (they wait for the first attempt);
    bootstrap calls :meth:`reevaluate_if_inputs_changed`, :meth:`reapply_quarantines` and
    :meth:`resume_pending` at start-up. :meth:`reevaluate` is one attempt, without retry.
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
        markers: ReevaluationMarkers | None = None,
        inputs: Callable[[], str] | None = None,
        writer: str = "tasklease",
        retry_base: timedelta = RETRY_BASE,
        retry_cap: timedelta = RETRY_CAP,
        rng: random.Random | None = None,
        pending: PendingScopeRecords | None = None,
        resume_limit: int = PENDING_READ_LIMIT,
        resume_each: int = RESUME_EACH_LIMIT,
        follow_up_after: timedelta | None = None,
    ) -> None:
        if not 1 <= batch <= MAX_ADDRESSED:  # the ledger's limit per call
            raise ValueError(f"batch must be between 1 and {MAX_ADDRESSED}, got {batch}")
        if not timedelta(0) < retry_base <= retry_cap:
            raise ValueError("retry_base must be positive and at most retry_cap")
        if resume_limit < 1 or not 0 <= resume_each <= resume_limit:
            raise ValueError("resume_limit must be positive and resume_each at most that")
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
        self._markers = markers
        self._inputs = inputs
        self._writer = writer
        self._retry_base = retry_base.total_seconds()
        self._retry_cap = retry_cap.total_seconds()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._pending = pending
        self._resume_limit = resume_limit
        self._resume_each = resume_each
        # After a re-evaluation of every live lease stored its marker: decide again, this
        # long after, the leases issued since it began (see _follow_up).
        self._follow_up_after = follow_up_after
        self._background: set[asyncio.Task[Any]] = set()
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._seq = 0  # changes submitted so far
        self._closed = False

    # ---- triggers

    async def policy_changed(self, *, trigger: str) -> None:
        """A new policy set is in force: every live lease is decided again, in the background
        (retried until done); returns at once, so the reloader never waits for it."""
        self._submit(EVERY_LIVE_LEASE, f"the policy set changed ({trigger})", marks=True)

    async def targets_changed(self, names: frozenset[str], *, trigger: str) -> None:
        """Targets changed in the catalog: their live leases are decided again, in the
        background (retried until done); returns at once."""
        for name in sorted(names):
            self._submit(
                ReevaluationScope(TARGET, name, LeaseSelector(target=name)),
                f"target {name!r} changed in the catalog ({trigger})",
            )

    async def quarantine_set(self, quarantine: Quarantine) -> ReevaluationReport:
        """A quarantine was set: the live leases it covers are decided again (and denied).
        Waits for the first attempt and returns its report, or raises its error (the scope
        is then retried in the background)."""
        reason = f"quarantine set: {_quarantine_text(quarantine)}"
        report = await self._first_attempt(self._submit(_quarantine_scope(quarantine), reason))
        return report if report is not None else ReevaluationReport(reason=reason)

    def reapply_quarantines(self) -> None:
        """At start-up, in the background: the live leases every quarantine in force covers
        are decided again (retried as any scope), so a quarantine whose re-evaluation a stop
        cut short, or whose retry was pending, still revokes what it covers. Cheap when
        nothing is left: the leases it revoked are no longer live."""
        if self._quarantines is not None:
            self.in_background(self._reapply_quarantines(), "continuous:quarantines")

    async def _read_until_read(
        self, read: Callable[[], Coroutine[Any, Any, _Read]], unreadable: str
    ) -> _Read | None:
        """``read()`` until it answers, after a jittered backoff between failures (logged as
        ``unreadable``); None when the authorizer closed first."""
        failures = 0
        while not self._closed:
            try:
                return await read()
            except Exception as exc:  # noqa: BLE001 - read again after a backoff
                failures += 1
                delay = min(self._retry_cap, self._retry_base * 2 ** min(failures - 1, 32))
                _log.warning(
                    unreadable,
                    error=type(exc).__name__,
                    reason=exc.reason if isinstance(exc, TaskleaseError) else "",
                    retry_in_seconds=delay,
                )
                await asyncio.sleep(self._rng.uniform(delay / 2, delay))
        return None

    async def _reapply_quarantines(self) -> None:
        store = self._quarantines
        assert store is not None  # noqa: S101 - checked by the caller
        quarantines = await self._read_until_read(
            lambda: store.quarantines(self._clock.now()), "continuous.quarantines_unreadable"
        )
        if quarantines is None:
            return
        for quarantine in quarantines:
            self._submit(
                _quarantine_scope(quarantine),
                f"start-up: quarantine in force: {_quarantine_text(quarantine)}",
            )
        _log.info("continuous.quarantines_reapplied", quarantines=len(quarantines))

    async def note_withdrawal(self, approval: Approval) -> WithdrawalNote:
        """A used approval is about to be withdrawn (``approval`` is the withdrawn version,
        not stored yet): note the re-evaluation its withdrawal owes in the pending records
        (``pending``) now, so that a broker killed once the withdrawal is stored leaves it
        to the next start (:meth:`resume_pending`). Never raises for a record that cannot be
        stored (alerted: ``continuous.pending_unrecorded``): the withdrawal goes ahead, and
        :meth:`approval_withdrawn` stores the same record again before each attempt."""
        subject = approval.subject
        record = self._pending_record(
            approval.id, subject.workflow_id, subject.task_id, _withdrawal_reason(approval)
        )
        if record is None:
            return WithdrawalNote(None)
        return WithdrawalNote(record, stored=await self._note(record))

    async def discard_withdrawal_note(self, note: WithdrawalNote) -> None:
        """The withdrawal ``note`` was taken for was not stored (or withdrew no credential
        after all): remove its record now. Best effort: a record left behind is resumed at
        the next start, whose re-evaluation decides the credential under the approval as
        stored (still used: kept) and then removes it."""
        if note.record is None or self._pending is None:
            return
        # Removed even if its write seemed to fail: the write may have landed all the same.
        try:
            await self._pending.clear_pending([note.record.id])
        except Exception as exc:  # noqa: BLE001 - only costs a re-evaluation at a start
            _log.warning(
                "continuous.pending_not_cleared",
                records=1,
                error=type(exc).__name__,
                reason=exc.reason if isinstance(exc, TaskleaseError) else "",
            )
            return
        _log.info("continuous.pending_discarded", key=note.record.key, id=note.record.id)

    async def approval_withdrawn(
        self, approval: Approval, note: WithdrawalNote | None = None
    ) -> ReevaluationReport | None:
        """A used approval was withdrawn: the credential issued under it is decided again
        without it. ``note`` is what :meth:`note_withdrawal` returned before the withdrawal
        was stored: its record is the one this re-evaluation carries and clears once an
        attempt covering it completed (stored again before each attempt while it is not
        stored). Without one, the change is noted now, before the first attempt. Waits for
        the first attempt; None when it failed (logged, and retried in the background)."""
        subject = approval.subject
        if note is None:
            note = await self.note_withdrawal(approval)
        owed: list[str] = []
        unstored: list[PendingScopeRecord] = []
        if note.record is not None:
            if note.stored:
                owed.append(note.record.id)
            else:
                unstored.append(note.record)
        scope = _approval_scope(approval.id, subject.workflow_id, subject.task_id)
        job = self._submit(scope, _withdrawal_reason(approval), owed=owed, unstored=unstored)
        try:
            return await self._first_attempt(job)
        except Exception:  # noqa: BLE001 - logged by the attempt; the retry is scheduled
            return None

    def resume_pending(self) -> None:
        """At start-up, in the background: every re-evaluation a broker noted as pending and
        did not complete (it stopped, or was killed, first) is queued again, retried as any
        scope, and its record cleared once it completed. Needs ``pending``."""
        if self._pending is not None:
            self.in_background(self._resume_pending(), "continuous:pending")

    async def _resume_pending(self) -> None:
        pending = self._pending
        assert pending is not None  # noqa: S101 - checked by the caller
        read = await self._read_until_read(
            lambda: pending.read_pending(limit=self._resume_limit),
            "continuous.pending_unreadable",
        )
        if read is not None:
            self._resume(read)

    def _resume(self, read: PendingScopesRead) -> None:
        """Queue what ``read`` found: each record as its own scope when they are few, all
        complete and readable; otherwise one re-evaluation of every live lease, which decides
        whatever they were about (an unreadable entry's scope is unknown: fail closed)."""
        records, unreadable = read.records, read.unreadable
        if unreadable:
            _log.error(
                "continuous.pending_corrupt",
                entries=len(unreadable),
                sample=[printable(entry, 80) for entry in unreadable[:10]],
                alert=True,
                action="every live lease is decided again in their place",
            )
        each = read.complete and not unreadable and len(records) <= self._resume_each
        if each:
            for record in records:
                self._submit(
                    _approval_scope(record.key, record.workflow_id, record.task_id),
                    f"start-up: resumed: {record.reason}",
                    owed=[record.id],
                )
        elif records or unreadable:
            self._submit(
                EVERY_LIVE_LEASE,
                f"start-up: {len(records)} pending re-evaluation(s) of withdrawn approvals"
                + (f" and {len(unreadable)} unreadable pending record(s)" if unreadable else "")
                + ("" if read.complete else " (more to read once done)")
                + " left by a broker that stopped",
                marks=True,
                owed=[record.id for record in records] + list(unreadable),
                then_resume=not read.complete,
            )
        log = _log.warning if records or unreadable else _log.info
        log(
            "continuous.pending_resumed",
            count=len(records),
            unreadable=len(unreadable),
            complete=read.complete,
            each_scope=each,
        )

    def reevaluate_if_inputs_changed(self) -> None:
        """At start-up: in the background, compare the stored marker with the decision
        inputs in force; when it is absent or differs, decide every live lease again
        (retried until done) and then store the digest. Needs ``markers`` and ``inputs``."""
        if self._markers is None or self._inputs is None:
            return
        self._submit(EVERY_LIVE_LEASE, _STARTUP_REASON, marks=True, check_marker=True)

    def in_background(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``work`` without making the caller wait (an admin's quarantine request);
        failures are logged. :meth:`close` cancels what is still running."""
        task = asyncio.get_running_loop().create_task(self._logged(work, name), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait until nothing is running or waiting: background work and every scope's
        re-evaluation, retries included (tests)."""
        while self._background or self._slots:
            tasks: list[asyncio.Task[Any]] = [*self._background]
            tasks += [slot.task for slot in self._slots.values() if slot.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel background work and pending retries (the broker stops)."""
        self._closed = True
        abandoned = self.pending()
        self._log_pending_records()
        tasks: list[asyncio.Task[Any]] = [*self._background]
        tasks += [slot.task for slot in self._slots.values() if slot.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._slots.clear()
        self._publish()
        if abandoned:
            _log.error(
                "continuous.retries_abandoned",
                scopes=[f"{p.scope.kind}:{printable(p.scope.key, 200)}" for p in abandoned],
                alert=True,
            )

    # ---- what is pending

    def inputs_digest(self) -> str | None:
        """The digest of the decision inputs in force (None without ``inputs``)."""
        return self._inputs() if self._inputs is not None else None

    def pending(self) -> list[PendingReevaluation]:
        """The scopes whose re-evaluation failed and has not completed since."""
        now = asyncio.get_running_loop().time() if self._slots else 0.0
        found: list[PendingReevaluation] = []
        for slot in self._slots.values():
            job = slot.running if slot.running is not None and slot.running.failures else None
            if job is None and slot.queued is not None and slot.queued.failures:
                job = slot.queued
            if job is None or job.since is None:
                continue
            retry_in = 0.0
            if job is slot.queued and job.retry_at is not None:
                retry_in = max(0.0, job.retry_at - now)
            found.append(
                PendingReevaluation(
                    job.scope, job.reason, job.failures, job.since, job.error, retry_in
                )
            )
        return sorted(found, key=lambda p: (p.since, p.scope.slot))

    def check_result(self) -> CheckResult:
        """The ``continuous`` readiness check: always ready (issuance decides under the state
        in force), with an alarm while a re-evaluation is pending a retry."""
        pending = self.pending()
        running = sum(1 for slot in self._slots.values() if slot.running is not None)
        if not pending:
            detail = "no re-evaluation waiting for a retry"
            if running:
                detail += f"; {running} running"
            return CheckResult("continuous", ok=True, detail=detail)
        items = "; ".join(
            f"{_SCOPE_LABEL.get(p.scope.kind, p.scope.kind)}: {p.failures} failed attempt(s) "
            f"since {p.since.isoformat()}, last {p.error}, "
            + (f"next in {p.retry_in:.0f} s" if p.retry_in > 0 else "retrying now")
            for p in pending
        )
        return CheckResult(
            "continuous",
            ok=True,
            alarm=True,
            detail=f"{len(pending)} re-evaluation(s) of live credentials incomplete, retrying "
            f"({items}); credentials these changes deny may still be live",
        )

    # ---- scheduling

    def _submit(
        self,
        scope: ReevaluationScope,
        reason: str,
        *,
        marks: bool = False,
        check_marker: bool = False,
        owed: list[str] | None = None,
        unstored: list[PendingScopeRecord] | None = None,
        then_resume: bool = False,
    ) -> _Job | None:
        """Queue a change of ``scope``; its worker runs it as soon as the scope's running
        attempt (if any) ends. A job already waiting in the scope is replaced by this one.
        ``owed``/``unstored``: the pending records of the change (see :class:`_Job`)."""
        if self._closed:
            _log.warning("continuous.closed", scope=scope.kind, trigger=_trigger(reason))
            return None
        self._seq += 1
        job = _Job(
            scope,
            reason,
            self._seq,
            marks=marks,
            check_marker=check_marker,
            owed=set(owed or ()),
            unstored=list(unstored or ()),
            then_resume=then_resume,
        )
        slot = self._slots.get(scope.slot)
        if slot is None:
            slot = _Slot(scope.slot)
            self._slots[scope.slot] = slot
            slot.task = asyncio.get_running_loop().create_task(
                self._work(slot), name=f"continuous:{scope.kind}"
            )
        replaced = slot.queued
        if replaced is not None:
            job.take_over(replaced)
            job.marks = job.marks or replaced.marks
            job.check_marker = job.check_marker and replaced.check_marker
            _log.info(
                "continuous.coalesced",
                scope=scope.kind,
                key=printable(scope.key, 200),
                trigger=_trigger(reason),
                replaced=_trigger(replaced.reason),
                into="the newer change of the same scope",
            )
        slot.queued = job
        slot.wake.set()
        self._publish()
        return job

    async def _first_attempt(self, job: _Job | None) -> ReevaluationReport | None:
        """Wait for the attempt that covers ``job`` (its own, or the one it was coalesced
        into); its report, or its error raised."""
        if job is None:
            return None
        waiter: asyncio.Future[ReevaluationReport | None] = (
            asyncio.get_running_loop().create_future()
        )
        job.waiters.append(waiter)
        return await waiter

    async def _work(self, slot: _Slot) -> None:
        """A scope's worker: run what is queued, waiting out a retry's backoff (woken early
        when a newer change replaces it or a full attempt takes it over)."""
        loop = asyncio.get_running_loop()
        try:
            while (job := slot.queued) is not None:
                if job.retry_at is not None and (delay := job.retry_at - loop.time()) > 0:
                    slot.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await slot.wake.wait()
                    continue
                slot.queued, slot.running = None, job
                try:
                    await self._attempt(slot, job)
                finally:
                    slot.running = None
                    self._publish()
        finally:
            if slot.queued is not None:
                slot.queued.settle(asyncio.CancelledError())
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]
            self._publish()

    async def _attempt(self, slot: _Slot, job: _Job) -> None:
        inputs = self._inputs() if job.marks and self._inputs is not None else None
        began = self._clock.now()
        report: ReevaluationReport | None = None
        try:
            # A job owing pending records decides whatever the marker says: the marker may
            # predate the changes they stand for.
            owes = bool(job.owed or job.unstored)
            if not job.check_marker or owes or await self._inputs_changed(inputs):
                if job.scope.kind == EVERYTHING:
                    self._take_over_narrower(job)
                await self._note_unstored(job)
                job.covers = self._seq
                report = await self.reevaluate(
                    job.scope.selector,
                    job.reason,
                    approval_id=job.scope.approval_id,
                    issued_since=job.scope.issued_since,
                )
        except asyncio.CancelledError as exc:
            job.settle(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is retried, never dropped
            self._failed(slot, job, exc)
            return
        self.metrics.completed.labels(scope=job.scope.kind).inc()
        if job.failures:
            _log.warning(
                "continuous.recovered",
                scope=job.scope.kind,
                key=printable(job.scope.key, 200),
                trigger=_trigger(job.reason),
                failed_attempts=job.failures,
                since=job.since.isoformat() if job.since else "",
            )
        if report is not None:
            if inputs is not None:
                await self._store_marker(inputs)
                self._schedule_follow_up(began)
            # Last: records coalesced into this job while it awaits are cleared too.
            cleared = await self._clear_owed(job)
            if job.then_resume and cleared:
                self.resume_pending()  # the records a start-up read left for later
        job.settle(report)

    def _schedule_follow_up(self, began: datetime) -> None:
        """A re-evaluation of every live lease that began at ``began`` completed and stored
        its marker. Replicas still on the previous inputs may have issued meanwhile (a lease
        written after the scan passed it) and go on until their superseded-check sees the
        marker (broker/superseded.py), so once that had time to happen, the leases issued
        since it began (less :data:`FOLLOW_UP_SKEW` for clocks and requests in flight) are
        decided again under the inputs in force then (retried as any scope)."""
        delay = self._follow_up_after
        if delay is None or self._closed:
            return
        since = began - FOLLOW_UP_SKEW
        scope = ReevaluationScope(
            RECENT, since.isoformat(), LeaseSelector(everything=True), issued_since=since
        )
        reason = (
            "follow-up: the credentials issued since the re-evaluation of every live lease "
            f"that began at {began.isoformat()}, while other replicas may still have run the "
            "previous decision inputs"
        )

        async def follow_up() -> None:
            await asyncio.sleep(delay.total_seconds())
            self._submit(scope, reason)

        self.in_background(follow_up(), "continuous:follow-up")

    def _failed(self, slot: _Slot, job: _Job, exc: Exception) -> None:
        job.failures += 1
        job.since = job.since or self._clock.now()
        job.error = exc.reason if isinstance(exc, TaskleaseError) else type(exc).__name__
        job.covers = 0
        self.metrics.failures.labels(scope=job.scope.kind).inc()
        job.settle(exc)
        taker = slot.queued or self._full_attempt_covering(job)
        if taker is not None:
            # A newer change of this scope, or a full attempt that started after this change
            # (or will start): it decides these leases under the newest state.
            taker.take_failures(job)
            taker.take_owed(job)
            _log.info(
                "continuous.coalesced",
                scope=job.scope.kind,
                key=printable(job.scope.key, 200),
                trigger=_trigger(job.reason),
                into=(
                    "the newer change of the same scope"
                    if taker is slot.queued
                    else "the re-evaluation of every live lease"
                ),
            )
            self._publish()
            return
        ceiling = min(self._retry_cap, self._retry_base * 2 ** min(job.failures - 1, 32))
        delay = self._rng.uniform(ceiling / 2, ceiling)
        job.retry_at = asyncio.get_running_loop().time() + delay
        slot.queued = job
        self._publish()
        _log.warning(
            "continuous.retry_scheduled",
            scope=job.scope.kind,
            key=printable(job.scope.key, 200),
            trigger=_trigger(job.reason),
            failed_attempts=job.failures,
            error=job.error,
            retry_in_seconds=round(delay, 3),
        )

    def _full_attempt_covering(self, job: _Job) -> _Job | None:
        """The re-evaluation of every live lease that covers ``job``'s change: one deciding
        that started after it was submitted, or one waiting to start (that will decide)."""
        if job.scope.kind == EVERYTHING:
            return None
        full = self._slots.get(EVERY_LIVE_LEASE.slot)
        if full is None:
            return None
        if full.queued is not None and not full.queued.check_marker:
            return full.queued
        if full.running is not None and full.running.covers >= job.seq:
            return full.running
        return None

    def _take_over_narrower(self, full: _Job) -> None:
        """A full attempt starts deciding: every narrower change waiting now (new, or for a
        retry) is decided by it, under the newest state; their waiters get its report."""
        for slot in self._slots.values():
            waiting = slot.queued
            if slot.key == EVERY_LIVE_LEASE.slot or waiting is None:
                continue
            slot.queued = None
            full.take_over(waiting)
            slot.wake.set()
            _log.info(
                "continuous.coalesced",
                scope=waiting.scope.kind,
                key=printable(waiting.scope.key, 200),
                trigger=_trigger(waiting.reason),
                into="the re-evaluation of every live lease",
            )

    def _publish(self) -> None:
        self.metrics.pending.set(len(self.pending()) if self._slots else 0)

    # ---- the pending records (changes that must survive a stop)

    def _pending_record(
        self, approval_id: str, workflow_id: str, task_id: str, reason: str
    ) -> PendingScopeRecord | None:
        """The record of a withdrawn approval's re-evaluation (None without ``pending``)."""
        if self._pending is None:
            return None
        try:
            return PendingScopeRecord(
                id=f"pnd_{secrets.token_hex(12)}",
                kind=PENDING_APPROVAL,
                key=approval_id,
                workflow_id=workflow_id,
                task_id=task_id,
                reason=printable(reason, _PENDING_REASON_TEXT),
                noted_at=self._clock.now(),
                noted_by=printable(self._writer, 100),
            )
        except ValueError as exc:  # not from a valid approval: nothing to note it under
            _log.error(
                "continuous.pending_unrecorded",
                scope=APPROVAL,
                key=printable(approval_id, 200),
                error=printable(exc, 200),
                alert=True,
            )
            return None

    async def _note(self, record: PendingScopeRecord) -> bool:
        """Store ``record``; False (logged with an alert) when it cannot be stored."""
        assert self._pending is not None  # noqa: S101 - records exist only with a store
        try:
            await self._pending.note_pending(record)
        except Exception as exc:  # noqa: BLE001 - noted again before each attempt
            _log.error(
                "continuous.pending_unrecorded",
                scope=record.kind,
                key=record.key,
                error=type(exc).__name__,
                reason=exc.reason if isinstance(exc, TaskleaseError) else "",
                alert=True,
                consequence="a stop before its re-evaluation completes would forget it; "
                "noted again before each attempt",
            )
            return False
        _log.info("continuous.pending_noted", scope=record.kind, key=record.key, id=record.id)
        return True

    async def _note_unstored(self, job: _Job) -> None:
        """Before an attempt: store the job's records a failure kept from being stored."""
        unstored, job.unstored = job.unstored, []
        for record in unstored:
            if await self._note(record):
                job.owed.add(record.id)
            else:
                job.unstored.append(record)

    async def _clear_owed(self, job: _Job) -> bool:
        """An attempt of ``job`` completed: clear its records (and those coalesced into it
        meanwhile). False when some could not be cleared: they are resumed at the next
        start, which costs one more (harmless) re-evaluation."""
        cleared = True
        job.unstored = []
        while job.owed and self._pending is not None:
            ids, job.owed = sorted(job.owed), set()
            try:
                await self._pending.clear_pending(ids)
            except Exception as exc:  # noqa: BLE001 - only costs a re-evaluation at a start
                cleared = False
                _log.warning(
                    "continuous.pending_not_cleared",
                    records=len(ids),
                    error=type(exc).__name__,
                    reason=exc.reason if isinstance(exc, TaskleaseError) else "",
                )
                continue
            _log.info("continuous.pending_cleared", records=len(ids))
        return cleared

    def _log_pending_records(self) -> None:
        """The broker stops: say which pending changes the next start resumes, and alert on
        any whose record could not be stored (those are forgotten)."""
        jobs = [
            job
            for slot in self._slots.values()
            for job in (slot.running, slot.queued)
            if job is not None
        ]
        kept = sum(len(job.owed) for job in jobs)
        lost = [record for job in jobs for record in job.unstored]
        if kept:
            _log.warning("continuous.pending_kept", records=kept, resumed="at the next start")
        if lost:
            _log.error(
                "continuous.pending_lost",
                scopes=[f"{record.kind}:{record.key}" for record in lost[:20]],
                records=len(lost),
                alert=True,
            )

    # ---- the decision-inputs marker

    async def _inputs_changed(self, inputs: str | None) -> bool:
        """Start-up: whether the stored marker differs from the inputs in force."""
        if self._markers is None or inputs is None:
            return True
        stored = await self._markers.last_reevaluated()
        if stored is not None and stored.digest == inputs:
            _log.info(
                "continuous.inputs_unchanged",
                digest=inputs[:12],
                reevaluated_at=stored.at.isoformat(),
                by=stored.writer,
            )
            return False
        _log.warning(
            "continuous.inputs_changed",
            digest=inputs[:12],
            stored=stored.digest[:12] if stored is not None else "",
            stored_at=stored.at.isoformat() if stored is not None else "",
            stored_by=stored.writer if stored is not None else "",
        )
        return True

    async def _store_marker(self, inputs: str) -> None:
        """Note that every live lease was decided under ``inputs`` (when they are still the
        inputs in force: a change meanwhile has its own re-evaluation, which notes it)."""
        if self._markers is None or self._inputs is None:
            return
        if self._inputs() != inputs:
            _log.info("continuous.marker_skipped", digest=inputs[:12])
            return
        marker = ReevaluationMarker(digest=inputs, at=self._clock.now(), writer=self._writer)
        try:
            await self._markers.mark_reevaluated(marker)
        except Exception as exc:  # noqa: BLE001 - only costs one more re-evaluation at a start
            _log.warning(
                "continuous.marker_failed",
                digest=inputs[:12],
                error=type(exc).__name__,
                reason=exc.reason if isinstance(exc, TaskleaseError) else "",
            )
            return
        _log.info("continuous.marker_stored", digest=inputs[:12], by=self._writer)

    # ---- the re-evaluation

    async def reevaluate(
        self,
        selector: LeaseSelector,
        reason: str,
        *,
        approval_id: str | None = None,
        issued_since: datetime | None = None,
    ) -> ReevaluationReport:
        """Decide every live lease ``selector`` matches (only those issued with
        ``approval_id``, and at or after ``issued_since``, when given) again, now; revoke the
        ones denied. ``reason`` says what changed; it is stamped into each revocation's audit
        event. The leases are read, decided and revoked a batch at a time; the report counts
        all of them."""
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
                        if (approval_id is None or lease.approval_id == approval_id)
                        and (issued_since is None or lease.issued_at >= issued_since)
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


class ContinuousReadiness:
    """/readyz check ``continuous`` (satisfies ``core.ports.ReadinessCheck``): always ready,
    with an alarm while a re-evaluation of live credentials is pending a retry."""

    name = "continuous"

    def __init__(self, authorizer: ContinuousAuthorizer | None = None) -> None:
        self._authorizer = authorizer

    def attach(self, authorizer: ContinuousAuthorizer) -> None:
        """Report on ``authorizer`` (the composition root builds it after the checks)."""
        self._authorizer = authorizer

    async def check(self, now: datetime) -> CheckResult:
        """The authorizer's own check."""
        if self._authorizer is None:
            return CheckResult(self.name, ok=True, detail="not started")
        return self._authorizer.check_result()


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


class ReevaluatingWithdrawals:
    """The approvals code's withdrawal hook (satisfies
    ``broker.approvals.WithdrawalHook[WithdrawalNote]``): a used approval's re-evaluation is
    noted before its withdrawal is stored, its credential decided again once it is (waiting
    for the first attempt, retried in the background), the note discarded when the
    withdrawal did not happen."""

    def __init__(self, authorizer: ContinuousAuthorizer) -> None:
        self._authorizer = authorizer

    async def before_withdrawal(self, approval: Approval) -> WithdrawalNote:
        """Note the re-evaluation (never raises for a store that refuses it: alerted)."""
        return await self._authorizer.note_withdrawal(approval)

    async def withdrawn(self, approval: Approval, note: WithdrawalNote | None) -> None:
        """Decide the credential again, carrying ``note``'s record."""
        await self._authorizer.approval_withdrawn(approval, note)

    async def not_withdrawn(self, note: WithdrawalNote) -> None:
        """Remove ``note``'s record (best effort)."""
        await self._authorizer.discard_withdrawal_note(note)


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


def _trigger(reason: str) -> str:
    return printable(reason, _REASON_LIMIT)


def _withdrawal_reason(approval: Approval) -> str:
    return f"approval {approval.id} was withdrawn by {approval.closed_by}"


def _approval_scope(approval_id: str, workflow_id: str, task_id: str) -> ReevaluationScope:
    """A withdrawn approval's scope: the leases of its task issued with it."""
    return ReevaluationScope(
        APPROVAL,
        approval_id,
        LeaseSelector(workflow_id=workflow_id, task_id=task_id),
        approval_id=approval_id,
    )


def _quarantine_scope(quarantine: Quarantine) -> ReevaluationScope:
    return ReevaluationScope(
        QUARANTINE,
        f"{quarantine.kind.value}|{quarantine.value}",
        _QUARANTINE_SELECTOR[quarantine.kind](quarantine.value),
    )


def _quarantine_text(quarantine: Quarantine) -> str:
    return (
        f"{quarantine.kind.value} {printable(quarantine.value, 200)} "
        f"({printable(quarantine.reason, 200)})"
    )
