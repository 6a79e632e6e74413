"""Revocation: the use cases that end credentials, written against ``broker.core.ports`` only.

Four triggers end a credential: its TTL (the sweeper, :meth:`Revoker.revoke_due`), the end of
its workflow run (:meth:`Revoker.complete_workflow`), early release by its holder
(:meth:`Revoker.release`) and forced revocation by an admin (:meth:`Revoker.force`). Every
one of them goes through the same settle step, and "revoked" is only ever written after the
minter *confirmed* that OpenBao no longer knows the task token and its leases (SECURITY 25,
30): a failure or an unconfirmed answer is retried with jittered exponential backoff, never
reported done.

The lease states as this module drives them (``LeaseState``)::

    issuing ──activate──▶ active ──▶ revoking ──confirmed──▶ revoked
       │                              │   ▲
       │ (task tombstoned:            │   │ failed/unconfirmed: attempts+1, backoff
       │  completion, force)          ▼   │
       └────────────▶ revoking    revoke_failed  (attempts ≥ max_attempts; retried slowly,
                                                  alert; → revoked once confirmed)

    not revocable (SSH):       active ─────(at expires_at)────▶ revoked (reason expired)
    no Vault references        issuing ────(at expires_at)────▶ revoked (expired_unrecorded)
    (mint never recorded):

A lease is *due* (in the ledger's due index) at its expiry from the write-ahead on; completion,
release and force make it due *now* (and record the intent: state revoking and a reason)
before they revoke it themselves, so a crash in between leaves the sweeper to finish. The
sweeper claims due leases (``Ledger.claim_due``), and per the ledger's claim contract a claim
is acknowledged only once the lease is revoked; anything else is *rescheduled* (which ends the
claim), and a claimer that dies leaves its claims to come back after the visibility timeout
(SECURITY 34, 35). Every time is the ``now`` handed in or the one injected clock (SECURITY 36).

Deadlines: a credential's TTL never passes its run's deadline (``credential_ttl``), so every
lease of a run is due by the deadline anyway. The run itself has no due index; its state turns
``expired`` when the sweeper settles one of its leases at or after the deadline, or when it is
completed after it (issuance already refuses a run past its deadline). This costs one run
read per sweep for each distinct run among the expired leases it settles, and nothing for
runs without leases (those stay ``active`` in the ledger, and refuse issuance all the same).

Late mints: completion and force tombstone the tasks of the leases they find (the ledger then
refuses to activate a lease of such a task written ahead before the tombstone, SECURITY 29),
and the refused lease is due at once. A request that read its run as active just before the
completion and writes ahead after it, *for a task id not seen before*, is not covered by any
task tombstone: the write-ahead refuses it, as it checks the stored run in its own atomic
step (a write-ahead before the completion stored the run is among the leases it lists). In
case a write-ahead did not see the ended run (a Redis failover that lost the completion's
write, a replica of an older version), the replica that completed the run lists it again a
few times (after 1 s, then at doubling intervals, within ``late_mint_window``) and revokes
such strays. That watch lives in memory: if that replica dies, a stray ends by its TTL, which
never passes the run's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import random
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker.core.audit import (
    AuditEvent,
    AuditTrail,
    CredentialRevoked,
    CredentialRevokeFailed,
    Payload,
    RevocationForced,
    WorkflowCompleted,
    current_request_id,
)
from broker.core.authn import Caller
from broker.core.model import (
    Lease,
    LeaseState,
    RunState,
    WorkflowRun,
    check_id,
    check_text,
)
from broker.core.ports import Clock, LeaseSelector, Ledger, RevokeOutcome, SecretMinter
from broker.core.roles import Role
from broker.core.untrusted import printable
from broker.errors import (
    ConflictError,
    ForbiddenError,
    LedgerUnavailableError,
    NotFoundError,
    TaskleaseError,
)

_log = structlog.get_logger("broker.revocation")

LIVE_STATES: Final = frozenset(
    {LeaseState.ISSUING, LeaseState.ACTIVE, LeaseState.REVOKING, LeaseState.REVOKE_FAILED}
)
# A lease rewrite races an activation, a second replica or a stale copy: re-read and re-decide
# this many times before leaving the lease to the next sweep.
_UPDATE_ATTEMPTS = 4
# The most leases a completion's or a forced revocation's report lists (settled inline). Both
# make every lease they match due now, reading them in batches of _RUN_BATCH, and their report
# says ``truncated`` when they matched more than it lists (the sweeper revokes the rest).
MAX_ADDRESSED = 10_000
_RUN_BATCH = 1000
# What a revocation.forced audit event lists (its counts cover every lease it matched).
_AUDITED_CREDENTIALS = 200
_AUDITED_RUNS = 50
# Runs completed by this replica that it keeps re-listing for late mints, and the first
# re-listing's delay (then doubling).
_MAX_WATCHED_RUNS = 10_000
_FIRST_RECHECK = timedelta(seconds=1)
# A tombstone that covers a lease written ahead at t ends at t + this (ledgers keep µs).
_JUST_PAST = timedelta(milliseconds=1)

_T = TypeVar("_T")
_R = TypeVar("_R")

# Who asked for the revocation being settled in this task (the holder releasing, the caller
# completing a run, an admin forcing) and their reason text: stamped into credential.revoked.
# Empty in the sweeper, which revokes on its own account.
_INITIATED: Final[contextvars.ContextVar[tuple[str, str]]] = contextvars.ContextVar(
    "tasklease_revocation_initiated", default=("", "")
)


# True while a caller that records credential.revoked itself settles leases (continuous
# authorization: it records what changed and why). A lease it leaves to the sweeper (revoke
# failed, retried) is recorded by the sweeper once confirmed.
_CALLER_RECORDS_REVOKED: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "tasklease_caller_records_revoked", default=False
)


class RevokeReason(StrEnum):
    """Why a lease was (or is being) revoked; stored in ``Lease.revoke_reason``."""

    TTL_EXPIRED = "ttl_expired"  # revoked by the sweeper at/after its expiry
    EXPIRED = "expired"  # not revocable (SSH): ended by its own expiry
    EXPIRED_UNRECORDED = "expired_unrecorded"  # the mint never recorded; its token expired
    ACTIVATION_REFUSED = "activation_refused"  # minted after its task was tombstoned
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_CANCELLED = "run_cancelled"
    RUN_EXPIRED = "run_expired"
    RUN_REVOKED = "run_revoked"
    RELEASED = "released"
    FORCED = "forced"
    # Re-evaluated against current policy, catalog and quarantines and now denied
    # (broker/continuous.py).
    CONTINUOUS_AUTHORIZATION = "continuous_authorization"
    DUE = "due"  # made due before its expiry without a recorded reason


class RunOutcome(StrEnum):
    """What an orchestrator says about a run it ends."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def state(self) -> RunState:
        """The terminal run state this outcome produces."""
        return RunState(self.value)


_RUN_END_REASON: Final = {
    RunState.COMPLETED: RevokeReason.RUN_COMPLETED,
    RunState.FAILED: RevokeReason.RUN_FAILED,
    RunState.CANCELLED: RevokeReason.RUN_CANCELLED,
    RunState.EXPIRED: RevokeReason.RUN_EXPIRED,
    RunState.REVOKED: RevokeReason.RUN_REVOKED,
}


class SettleOutcome(StrEnum):
    """What one settle step did with one lease."""

    REVOKED = "revoked"  # confirmed revoked now
    ALREADY_REVOKED = "already_revoked"  # found revoked (by an earlier call or another replica)
    EXPIRED = "expired"  # marked revoked at its expiry: not revocable, or never recorded
    NOT_REVOCABLE = "not_revocable"  # live until its expiry by design (SSH)
    MINT_IN_FLIGHT = "mint_in_flight"  # no Vault references recorded yet
    RETRYING = "retrying"  # failed or unconfirmed; rescheduled with backoff
    REVOKE_FAILED = "revoke_failed"  # failed max_attempts times; retried slowly, alerted
    MISSING = "missing"  # no such lease (a stale due entry): acknowledged
    LEDGER_UNAVAILABLE = "ledger_unavailable"  # could not be read or updated; claim left

    @property
    def confirmed(self) -> bool:
        """True when the lease is revoked in the ledger (which only a confirmation writes)."""
        return self in (SettleOutcome.REVOKED, SettleOutcome.ALREADY_REVOKED, SettleOutcome.EXPIRED)


@dataclass(frozen=True, slots=True)
class RevocationSettings:
    """Tuning of the revocation engine. Times are durations on the one clock."""

    # Failed attempts after which a lease is revoke_failed (alerted, then retried slowly).
    max_attempts: int = 8
    # Exponential backoff between attempts: base · 2^(attempts-1), capped; jittered to
    # [delay/2, delay] so replicas retrying one sick backend do not stampede it together.
    backoff_base: timedelta = timedelta(seconds=1)
    backoff_cap: timedelta = timedelta(minutes=1)
    # The slow cadence of revoke_failed leases (jittered the same way).
    failed_retry_interval: timedelta = timedelta(minutes=5)
    # Most leases one sweep settles; the rest wait for the next sweep (bounded drain rate).
    sweep_batch: int = 256
    # How long a claim is held before it comes back to the due index.
    visibility: timedelta = timedelta(seconds=60)
    # Concurrent revocations toward Vault: per sweep chunk, per completion or forced call.
    concurrency: int = 16
    # One revocation (token + leases + confirming lookups) that takes longer counts as failed.
    revoke_timeout: timedelta = timedelta(seconds=10)
    # How often a lease without Vault references is looked at again before its expiry (its
    # activation may be refused and recorded at any moment).
    unrecorded_recheck: timedelta = timedelta(seconds=5)
    # Added to tombstones: covers clock differences between replicas and requests in flight.
    tombstone_margin: timedelta = timedelta(seconds=5)
    # How long this replica re-lists a run it completed for leases written ahead too late.
    late_mint_window: timedelta = timedelta(seconds=60)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not timedelta(0) < self.backoff_base <= self.backoff_cap:
            raise ValueError("backoff_base must be positive and at most backoff_cap")
        if self.failed_retry_interval <= timedelta(0):
            raise ValueError("failed_retry_interval must be positive")
        if self.sweep_batch < 1 or self.concurrency < 1:
            raise ValueError("sweep_batch and concurrency must be at least 1")
        if self.unrecorded_recheck <= timedelta(0) or self.tombstone_margin < timedelta(0):
            raise ValueError("unrecorded_recheck must be positive, tombstone_margin not negative")
        if self.late_mint_window < timedelta(0):
            raise ValueError("late_mint_window must not be negative")
        # A sweep starts claim chunks only while (elapsed + revoke_timeout) <= visibility / 2,
        # so every claim is settled before it can come back to another replica.
        if not timedelta(0) < self.revoke_timeout < self.visibility / 2:
            raise ValueError(
                f"revoke_timeout ({self.revoke_timeout}) must be positive and below half of "
                f"visibility ({self.visibility}): a claim must be settled before it expires"
            )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """One lease after a settle step: what happened, and the lease as stored afterwards."""

    credential_id: str
    outcome: SettleOutcome
    lease: Lease | None
    # Why it is still live, for people (never a Vault response body).
    detail: str = ""
    next_attempt_at: datetime | None = None

    @property
    def confirmed_revoked(self) -> bool:
        """True when the lease is revoked (confirmed by Vault or ended by its expiry)."""
        return self.outcome.confirmed


@dataclass(frozen=True, slots=True)
class RevocationReport:
    """What a completion, release or forced revocation confirmed and what is still live."""

    results: tuple[LeaseResult, ...]
    # More leases matched than one report covers (``MAX_ADDRESSED``). A completion or a forced
    # revocation made every one of them due now all the same: the sweeper revokes those not
    # listed. Repeating a completion reports the run's first leases again; repeating a forced
    # revocation addresses what is still live.
    truncated: bool = False
    # A forced revocation: how many leases it made due now, listed or not (None elsewhere).
    scheduled: int | None = None

    @property
    def confirmed_revoked(self) -> tuple[LeaseResult, ...]:
        """Leases confirmed revoked."""
        return tuple(r for r in self.results if r.confirmed_revoked)

    @property
    def still_live(self) -> tuple[LeaseResult, ...]:
        """Leases not (yet) confirmed revoked, each with the reason."""
        return tuple(r for r in self.results if not r.confirmed_revoked)

    @property
    def complete(self) -> bool:
        """True only when every addressed lease is confirmed revoked (SECURITY 30)."""
        return not self.truncated and not self.still_live


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one :meth:`Revoker.revoke_due` did."""

    claimed: int
    results: tuple[LeaseResult, ...]
    # now - the oldest expiry among the expired leases claimed (0 when none): how far behind
    # TTL revocation runs. (The ledger's claim returns ids, not due times.)
    lag: timedelta = timedelta(0)
    # Leases of runs this replica completed that were found live after the completion.
    late_mints: int = 0

    def count(self, outcome: SettleOutcome) -> int:
        """How many claimed leases ended with ``outcome``."""
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def revoked(self) -> tuple[str, ...]:
        """Credential ids confirmed revoked by this sweep."""
        return tuple(
            r.credential_id
            for r in self.results
            if r.outcome in (SettleOutcome.REVOKED, SettleOutcome.EXPIRED)
        )


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """A run ended: its state, what was made due, and (``wait``) the revocation report."""

    run: WorkflowRun
    scheduled: tuple[str, ...]
    report: RevocationReport | None = None


# --------------------------------------------------------------------------- metrics


class RevocationMetrics:
    """Prometheus instruments of the revocation engine, on ``registry`` (a new one if None).

    Per-replica values; the gauges describe what *this* replica saw in its last sweep (a lease
    is swept by whichever replica claims it), so alert on ``max`` across replicas.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.settled = Counter(
            "tasklease_revocations",
            "Leases settled by the revocation engine, by target kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.revoke_failed_transitions = Counter(
            "tasklease_revoke_failed",
            "Leases that became revoke_failed (max_attempts failed revocations)",
            registry=self.registry,
        )
        self.revoke_failed_leases = Gauge(
            "tasklease_revoke_failed_leases",
            "revoke_failed leases this replica has settled and not yet seen revoked",
            registry=self.registry,
        )
        self.overdue = Gauge(
            "tasklease_revocations_overdue",
            "Revocable leases past their expiry that the last sweep left live",
            registry=self.registry,
        )
        self.sweep_lag = Gauge(
            "tasklease_revocation_sweep_lag_seconds",
            "now minus the oldest expiry among the expired leases the last sweep claimed",
            registry=self.registry,
        )
        self.revoke_seconds = Histogram(
            "tasklease_revoke_duration_seconds",
            "Time of one revocation in Vault, confirmation included, by target kind and "
            "outcome (confirmed, unconfirmed, failed, timeout)",
            ["kind", "outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self._failed_ids: set[str] = set()

    def record(self, result: LeaseResult) -> None:
        """Count one settle result and keep the revoke_failed gauge current."""
        kind = result.lease.kind.value if result.lease is not None else "unknown"
        self.settled.labels(kind=kind, outcome=result.outcome.value).inc()
        if result.outcome is SettleOutcome.REVOKE_FAILED:
            self._failed_ids.add(result.credential_id)
        elif result.outcome.confirmed or result.outcome is SettleOutcome.MISSING:
            self._failed_ids.discard(result.credential_id)
        self.revoke_failed_leases.set(len(self._failed_ids))


# --------------------------------------------------------------------------- the use cases


class _LeaseChangedError(Exception):
    """The lease changed under a settle step in a way that needs a fresh decision."""


class Revoker:
    """Revokes credentials: the sweeper's ``revoke_due`` and the revocation use cases."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        minter: SecretMinter,
        clock: Clock,
        settings: RevocationSettings | None = None,
        metrics: RevocationMetrics | None = None,
        rng: random.Random | None = None,
        audit: AuditTrail | None = None,
        audit_actor: str = "tasklease-broker",
    ) -> None:
        self._ledger = ledger
        self._minter = minter
        self._clock = clock
        # Revocation never waits for the audit trail: a failed record is logged, not raised.
        self._audit = audit
        self._audit_actor = audit_actor
        self._settings = settings or RevocationSettings()
        self.metrics = metrics or RevocationMetrics()
        # Jitter only; not security relevant.
        self._rng = rng or random.Random()  # noqa: S311
        # Single flight: one settle per credential at a time in this process, so a completion
        # and a sweep racing on one lease make one Vault call and count it once.
        self._settling: dict[str, asyncio.Future[LeaseResult]] = {}
        # Leases a request in this process has marked (due now) and settles itself next (a
        # completion with wait, a forced revocation, a release): id → how many such requests.
        # A sweep of this process that claims one in between leaves it to the request: the
        # revocation is then recorded on the requester's account and after the request's own
        # event (workflow.completed), which a sweeper tick landing in that gap changed
        # (seen as a load flake). Reserved only inside try/finally: never left behind.
        self._inline: dict[str, int] = {}
        # Runs this replica completed and re-lists for late mints: run id → the watch.
        self._ended: dict[str, _EndedRun] = {}

    @property
    def settings(self) -> RevocationSettings:
        """The tuning in use."""
        return self._settings

    # ---- the sweeper

    async def revoke_due(self, now: datetime) -> SweepReport:
        """Settle up to ``sweep_batch`` leases due at ``now``, oldest first, in chunks of
        ``concurrency`` claimed just before they are settled."""
        settings = self._settings
        late = await self._recheck_ended_runs(now)
        runs: dict[str, WorkflowRun | None] = {}
        results: list[LeaseResult] = []
        claimed = 0
        while claimed < settings.sweep_batch:
            elapsed = self._clock.now() - now
            if claimed and elapsed + settings.revoke_timeout > settings.visibility / 2:
                break  # a new claim might not be settled before it expires: next sweep
            want = min(settings.concurrency, settings.sweep_batch - claimed)
            ids = await self._ledger.claim_due(now, limit=want, visibility=settings.visibility)
            claimed += len(ids)
            settled = await asyncio.gather(*(self._settle_claimed(cid, now, runs) for cid in ids))
            results.extend(result for result in settled if result is not None)
            if len(ids) < want:
                break
        report = SweepReport(
            claimed=claimed, results=tuple(results), lag=_lag(results, now), late_mints=late
        )
        self.metrics.sweep_lag.set(report.lag.total_seconds())
        self.metrics.overdue.set(
            sum(
                1
                for r in results
                if r.lease is not None
                and r.lease.revocable
                and not r.confirmed_revoked
                and r.lease.is_expired(now)
            )
        )
        if claimed or late:
            _log.info(
                "revocation.sweep",
                claimed=claimed,
                revoked=len(report.revoked),
                retrying=report.count(SettleOutcome.RETRYING),
                revoke_failed=report.count(SettleOutcome.REVOKE_FAILED),
                lag_seconds=round(report.lag.total_seconds(), 3),
                late_mints=late,
            )
        return report

    async def _settle_claimed(
        self, credential_id: str, now: datetime, runs: dict[str, WorkflowRun | None]
    ) -> LeaseResult | None:
        """Settle a claimed lease; None when it is left to a request of this process that
        marked it and settles it itself (its claim ended, due again shortly in case that
        request stops before settling it)."""
        try:
            if credential_id in self._inline and credential_id not in self._settling:
                await self._ledger.schedule(
                    credential_id, self._clock.now() + self._settings.backoff_base
                )
                return None
            return await self._settle(credential_id, now, reason=None, claimed=True, runs=runs)
        except TaskleaseError as exc:
            # The ledger is unreachable (or refused): the claim stays and comes back after the
            # visibility timeout; nothing was marked done.
            _log.warning(
                "revocation.settle_deferred",
                credential_id=credential_id,
                error=exc.code,
                reason=exc.reason,
            )
            return LeaseResult(credential_id, SettleOutcome.LEDGER_UNAVAILABLE, None, exc.reason)
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the sweep
            _log.error(
                "revocation.settle_crashed",
                credential_id=credential_id,
                error_type=type(exc).__name__,
            )
            return LeaseResult(
                credential_id, SettleOutcome.LEDGER_UNAVAILABLE, None, type(exc).__name__
            )

    # ---- workflow completion

    async def complete_workflow(
        self, caller: Caller, workflow_id: str, outcome: RunOutcome, *, wait: bool
    ) -> CompletionResult:
        """End a run (its orchestrator or an admin) and revoke every credential of it.

        Idempotent: completing an ended run changes nothing about the run and answers its
        state; its still-live leases are made due (and, with ``wait``, revoked) again. With
        ``wait`` the report lists every lease of the run, confirmed revoked or still live.
        """
        check_id(workflow_id, "workflow id")
        run = await self._ledger.get_run(workflow_id)
        if run is None or not (_is_admin(caller) or run.started_by == caller.principal_id):
            # Same answer for "absent" and "not yours": no probing of run ids.
            raise NotFoundError(
                f"no workflow run {workflow_id!r} visible to you", reason="workflow.not_found"
            )
        now = self._clock.now()
        ended_now = run.state is RunState.ACTIVE
        if run.state is RunState.ACTIVE:
            if now >= run.deadline:
                run = _expired(run)
                _log.info("workflow.expired", workflow_id=run.id, deadline=run.deadline.isoformat())
            else:
                run = dataclasses.replace(
                    run, state=outcome.state, ended_at=now, outcome=outcome.value
                )
            await self._ledger.save_run(run)
            _log.info(
                "workflow.completed",
                workflow_id=run.id,
                state=run.state.value,
                outcome=outcome.value,
                actor=caller.principal_id,
                owner=run.owner,
            )
        else:
            _log.info(
                "workflow.completion_repeated",
                workflow_id=run.id,
                state=run.state.value,
                actor=caller.principal_id,
            )
        reason = _RUN_END_REASON[run.state]
        # Read after the run is saved: a request that saw the run active stamped its lease
        # before this instant, and the tombstone below covers every such lease.
        after = self._clock.now()
        until = max(run.deadline, after) + self._settings.tombstone_margin
        # Every lease of the run is read, a batch at a time (a run may hold more leases than
        # one call lists): each batch's tasks are tombstoned and its live leases made due now.
        # A waiting caller's report covers the first MAX_ADDRESSED leases (``truncated`` when
        # the run has more; those are due now all the same, and the sweeper revokes them).
        listed: list[Lease] = []
        settle: list[str] = []
        due: list[str] = []
        truncated = False
        reserved: list[str] = []  # the listed ones, settled below (``wait``): see _inline
        # The run is watched for late mints only once its listed leases are marked: a recheck
        # during a long marking took the leases not marked yet for late mints, and marking
        # them again moved them out from under another replica's claim (a second revocation;
        # seen with two broker processes, tests/integration/test_revocation_faults.py).
        try:
            async with contextlib.aclosing(
                self._ledger.iter_leases(LeaseSelector(workflow_id=run.id), batch=_RUN_BATCH)
            ) as batches:
                async for leases in batches:
                    # No lease of an ended run may ever activate: tombstone its tasks.
                    await self._tombstone(leases, until=until)
                    if wait:
                        self._reserve(leases[: MAX_ADDRESSED - len(listed)], reserved)
                    marked = await self._bounded(
                        [lease for lease in leases if lease.is_live],
                        lambda lease: self._mark(lease, reason, now),
                    )
                    due.extend(lease.credential_id for lease in marked if lease.revocable)
                    room = MAX_ADDRESSED - len(listed)
                    truncated = truncated or len(leases) > room
                    shown = {lease.credential_id for lease in leases[:room]}
                    listed.extend(leases[:room])
                    settle.extend(x.credential_id for x in marked if x.credential_id in shown)
        except BaseException:
            self._unreserve(reserved)
            raise
        finally:
            if len(self._ended) >= _MAX_WATCHED_RUNS:
                self._ended.pop(next(iter(self._ended)))
            self._ended[run.id] = _EndedRun(
                reason=reason, ended=after, next_check=after + _FIRST_RECHECK
            )
        scheduled = tuple(due)
        try:
            if ended_now:
                await self._record(
                    _run_event(
                        run,
                        caller.principal_id,
                        WorkflowCompleted(
                            state=run.state.value, outcome=outcome.value, leases_due=len(scheduled)
                        ),
                        now,
                    )
                )
            if not wait:
                return CompletionResult(run=run, scheduled=scheduled)
            initiated = _INITIATED.set((caller.principal_id, ""))
            try:
                settled = await self._settle_many(settle, now=now, reason=reason)
            finally:
                _INITIATED.reset(initiated)
        finally:
            self._unreserve(reserved)
        done = [
            LeaseResult(lease.credential_id, SettleOutcome.ALREADY_REVOKED, lease)
            for lease in listed
            if not lease.is_live
        ]
        report = RevocationReport(results=tuple(done + settled), truncated=truncated)
        return CompletionResult(run=run, scheduled=scheduled, report=report)

    # ---- early release and metadata

    async def get_credential(self, caller: Caller, credential_id: str) -> Lease:
        """A credential's lease (metadata, never a secret): for its holder or an admin."""
        return await self._visible_lease(caller, credential_id)

    async def release(self, caller: Caller, credential_id: str) -> RevocationReport:
        """The holder (or an admin) is done with a credential: revoke it now and confirm."""
        lease = await self._visible_lease(caller, credential_id)
        now = self._clock.now()
        if lease.state is LeaseState.ISSUING and not lease.token_accessor:
            # Still being minted (its holder cannot normally know its id yet). Left alone:
            # moving it without a tombstone would make its activation fail without recording
            # the token, and a force by task is the tool for an in-flight mint.
            result = LeaseResult(
                credential_id,
                SettleOutcome.MINT_IN_FLIGHT,
                lease,
                "the credential is still being minted; release it once it is issued",
            )
        elif lease.is_live:
            reserved: list[str] = []  # see _inline
            self._reserve([lease], reserved)
            initiated = _INITIATED.set((caller.principal_id, ""))
            try:
                if lease.state is not LeaseState.ISSUING:
                    await self._mark(lease, RevokeReason.RELEASED, now)
                result = await self._settle_single_flight(
                    credential_id, now, reason=RevokeReason.RELEASED
                )
            finally:
                _INITIATED.reset(initiated)
                self._unreserve(reserved)
        else:
            result = LeaseResult(credential_id, SettleOutcome.ALREADY_REVOKED, lease)
        _log.info(
            "credential.released",
            credential_id=credential_id,
            workflow_id=lease.workflow_id,
            actor=caller.principal_id,
            holder=lease.holder,
            outcome=result.outcome.value,
        )
        return RevocationReport(results=(result,))

    async def _visible_lease(self, caller: Caller, credential_id: str) -> Lease:
        check_id(credential_id, "credential id")
        lease = await self._ledger.get_lease(credential_id)
        if lease is None or not (_is_admin(caller) or lease.holder == caller.principal_id):
            raise NotFoundError(
                f"no credential {credential_id!r} visible to you", reason="credential.not_found"
            )
        return lease

    # ---- forced revocation

    async def force(self, caller: Caller, selector: LeaseSelector, reason: str) -> RevocationReport:
        """An admin revokes every live lease ``selector`` matches, tombstoning their tasks.

        Every matching live lease is read, a batch at a time (a selector may match millions):
        each batch's tasks are tombstoned and its leases marked (the intent recorded, due now).
        The first ``MAX_ADDRESSED`` are then revoked inline, and the report says exactly which
        of those are confirmed revoked and which are still live, and why; the others are due
        now and the sweeper revokes them (``truncated``; ``scheduled`` counts every lease made
        due). Memory holds the listed ids and counts, never every match."""
        if not _is_admin(caller):
            raise ForbiddenError(
                f"{printable(caller.principal_id)} needs the admin role to force revocation",
                reason="auth.role_required",
            )
        check_text(reason, "reason")
        why = printable(reason, 500)
        now = self._clock.now()
        margin = self._settings.tombstone_margin
        matched = scheduled = 0
        settle: list[str] = []  # the first MAX_ADDRESSED matched: revoked inline, reported
        credential_ids: list[str] = []  # the audit event's first _AUDITED_CREDENTIALS
        workflow_ids: list[str] = []  # the audit event's smallest _AUDITED_RUNS, sorted
        latest = now + margin
        reserved: list[str] = []  # the ones in ``settle``: see _inline
        try:
            # The ledger refuses a selector that names nothing (``selector.unbounded``) on the
            # first iteration, before anything is tombstoned or marked.
            async with contextlib.aclosing(
                self._ledger.iter_leases(
                    dataclasses.replace(selector, states=LIVE_STATES), batch=_RUN_BATCH
                )
            ) as batches:
                async for leases in batches:
                    # Past every lease's issued_at even if another replica's clock runs ahead: a
                    # tombstone that failed to cover a lease marked below would let its
                    # activation fail without recording the token.
                    until = (
                        max([self._clock.now(), *(lease.issued_at for lease in leases)]) + margin
                    )
                    latest = max(latest, until)
                    await self._tombstone(leases, until=until)
                    self._reserve(leases[: MAX_ADDRESSED - len(settle)], reserved)
                    marked = await self._bounded(
                        leases, lambda lease: self._mark(lease, RevokeReason.FORCED, now)
                    )
                    scheduled += sum(1 for lease in marked if lease.revocable)
                    settle.extend(x.credential_id for x in marked[: MAX_ADDRESSED - len(settle)])
                    credential_ids.extend(
                        x.credential_id
                        for x in leases[: _AUDITED_CREDENTIALS - len(credential_ids)]
                    )
                    workflow_ids = sorted({*workflow_ids, *(x.workflow_id for x in leases)})[
                        :_AUDITED_RUNS
                    ]
                    matched += len(leases)
            if selector.workflow_id is not None and selector.task_id is not None:
                # A mint of this task may have been written ahead after the search: block it too.
                until = max(latest, self._clock.now() + margin)
                await self._ledger.tombstone_task(
                    selector.workflow_id, selector.task_id, until=until
                )
            initiated = _INITIATED.set((caller.principal_id, why))
            try:
                results = await self._settle_many(settle, now=now, reason=RevokeReason.FORCED)
            finally:
                _INITIATED.reset(initiated)
        finally:
            self._unreserve(reserved)
        report = RevocationReport(
            results=tuple(results), truncated=matched > len(settle), scheduled=scheduled
        )
        _log.warning(
            "revocation.forced",
            actor=caller.principal_id,
            selector=_selector_fields(selector),
            reason=why,
            matched=matched,
            scheduled=scheduled,
            confirmed_revoked=len(report.confirmed_revoked),
            still_live=len(report.still_live),
            truncated=report.truncated,
            credential_ids=[r.credential_id for r in report.results[:_AUDITED_CREDENTIALS]],
        )
        await self._record(
            AuditEvent(
                event_id=_event_id(),
                time=now,
                actor=caller.principal_id,
                payload=RevocationForced(
                    selector=_selector_fields(selector),
                    reason=why,
                    confirmed=len(report.confirmed_revoked),
                    still_live=len(report.still_live),
                    matched=matched,
                    scheduled=scheduled,
                    credential_ids=tuple(credential_ids),
                    workflow_ids=tuple(workflow_ids),
                ),
                workflow_id=selector.workflow_id or "",
                task_id=selector.task_id or "",
                request_id=current_request_id(),
            )
        )
        return report

    # ---- revocation decided by the broker itself

    async def revoke_leases(
        self, leases: Sequence[Lease], reason: RevokeReason
    ) -> RevocationReport:
        """Revoke these leases now for ``reason`` (no caller: the broker decided, e.g.
        continuous authorization): record the intent, revoke and confirm; the report says
        what is confirmed and what is still live. Unlike :meth:`force`, only the tasks of
        leases still being minted are tombstoned, and only just past their write-ahead (so
        their activation records the token and they are revoked): a new request for the task
        is decided afresh and is not blocked."""
        now = self._clock.now()
        in_flight = [lease for lease in leases if lease.state is LeaseState.ISSUING]
        if in_flight:
            until = max(lease.issued_at for lease in in_flight) + _JUST_PAST
            await self._tombstone(in_flight, until=until)
        # Left to this call by this process's sweeps (see _inline): a sweep in between would
        # record a credential.revoked of its own beside the caller's.
        reserved: list[str] = []
        self._reserve(leases, reserved)
        try:
            marked = await self._bounded(leases, lambda lease: self._mark(lease, reason, now))
            recorded_by_caller = _CALLER_RECORDS_REVOKED.set(True)
            try:
                results = await self._settle_many(
                    [lease.credential_id for lease in marked], now=now, reason=reason
                )
            finally:
                _CALLER_RECORDS_REVOKED.reset(recorded_by_caller)
        finally:
            self._unreserve(reserved)
        return RevocationReport(results=tuple(results))

    # ---- shared steps

    async def _bounded(self, items: Sequence[_T], work: Callable[[_T], Awaitable[_R]]) -> list[_R]:
        """``work`` on every item, at most ``concurrency`` at a time, results in order."""
        gate = asyncio.Semaphore(self._settings.concurrency)

        async def one(item: _T) -> _R:
            async with gate:
                return await work(item)

        return list(await asyncio.gather(*(one(item) for item in items)))

    def _reserve(self, leases: Iterable[Lease], reserved: list[str]) -> None:
        """Keep this process's sweeps off ``leases`` (see ``_inline``) until
        :meth:`_unreserve` of ``reserved``, which each id is added to."""
        for lease in leases:
            self._inline[lease.credential_id] = self._inline.get(lease.credential_id, 0) + 1
            reserved.append(lease.credential_id)

    def _unreserve(self, reserved: list[str]) -> None:
        for credential_id in reserved:
            left = self._inline.pop(credential_id, 0) - 1
            if left > 0:
                self._inline[credential_id] = left
        reserved.clear()

    async def _tombstone(self, leases: Iterable[Lease], *, until: datetime) -> None:
        tasks = sorted({(x.workflow_id, x.task_id) for x in leases})
        await self._bounded(
            tasks, lambda task: self._ledger.tombstone_task(task[0], task[1], until=until)
        )

    async def _mark(self, lease: Lease, reason: RevokeReason, now: datetime) -> Lease:
        """Record the intent to revoke (state revoking, the reason) and make the lease due
        now, so that the sweeper finishes the job if this process dies. Callers tombstone
        the task first when the lease may still be issuing (see the module docstring)."""
        if not lease.revocable:
            return lease  # stays due at its expiry: there is nothing to revoke before

        def intent(current: Lease) -> Lease | None:
            if current.state is LeaseState.REVOKED:
                return None
            state = (
                current.state
                if current.state in (LeaseState.REVOKING, LeaseState.REVOKE_FAILED)
                else LeaseState.REVOKING
            )
            return dataclasses.replace(
                current, state=state, revoke_reason=current.revoke_reason or reason.value
            )

        try:
            marked = await self._update(lease.credential_id, intent)
        except _LeaseChangedError:
            marked = None  # contended throughout: due now all the same, the sweep decides
        if marked is None or marked.state is not LeaseState.REVOKED:
            await self._ledger.schedule(lease.credential_id, now)
        return marked or lease

    async def _settle_many(
        self, credential_ids: Sequence[str], *, now: datetime, reason: RevokeReason
    ) -> list[LeaseResult]:
        """Settle leases directly (not claimed), at most ``concurrency`` at a time."""

        async def one(credential_id: str) -> LeaseResult:
            try:
                return await self._settle_single_flight(credential_id, now, reason=reason)
            except TaskleaseError as exc:
                # Made due already: the sweeper finishes it. Reported as still live.
                return LeaseResult(
                    credential_id, SettleOutcome.LEDGER_UNAVAILABLE, None, exc.reason
                )

        return await self._bounded(credential_ids, one)

    async def _settle_single_flight(
        self, credential_id: str, now: datetime, *, reason: RevokeReason | None
    ) -> LeaseResult:
        return await self._settle(credential_id, now, reason=reason, claimed=False, runs={})

    async def _settle(
        self,
        credential_id: str,
        now: datetime,
        *,
        reason: RevokeReason | None,
        claimed: bool,
        runs: dict[str, WorkflowRun | None],
    ) -> LeaseResult:
        """Settle one lease, once per process at a time: a second caller shares the first
        one's result (and, holding a claim, acknowledges or reschedules it by that result)."""
        while (running := self._settling.get(credential_id)) is not None:
            try:
                result = await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if running.cancelled() and (task is None or not task.cancelling()):
                    continue  # the first caller was cancelled, not this one: settle here
                raise
            except Exception:  # noqa: BLE001, S112 - the first caller's failure is its own: retry
                continue
            if claimed:
                await self._release_claim(result, reschedule=True)
            return result
        future: asyncio.Future[LeaseResult] = asyncio.get_running_loop().create_future()
        self._settling[credential_id] = future
        try:
            result = await self._settle_now(
                credential_id, now, reason=reason, claimed=claimed, runs=runs
            )
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: an exception nobody waited for is not "lost"
            raise
        else:
            future.set_result(result)
            self.metrics.record(result)
            return result
        finally:
            del self._settling[credential_id]

    async def _release_claim(self, result: LeaseResult, *, reschedule: bool) -> None:
        """End a claim by the settle result: acknowledge a finished lease; a live one was
        rescheduled by the step that settled it (``reschedule`` repeats that, for a claimer
        that only shared another caller's result)."""
        # An ack drops whatever claim exists, and a live lease with neither a claim nor a due
        # entry would never be swept again: only finished leases are acknowledged.
        if result.confirmed_revoked or result.outcome is SettleOutcome.MISSING:
            await self._ledger.ack(result.credential_id)
        elif reschedule and result.next_attempt_at is not None:
            await self._ledger.schedule(result.credential_id, result.next_attempt_at)

    async def _settle_now(
        self,
        credential_id: str,
        now: datetime,
        *,
        reason: RevokeReason | None,
        claimed: bool,
        runs: dict[str, WorkflowRun | None],
    ) -> LeaseResult:
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                result = await self._decide(credential_id, now, reason=reason, runs=runs)
            except _LeaseChangedError:
                continue
            if claimed:
                await self._release_claim(result, reschedule=False)
            elif result.confirmed_revoked:
                # Settled directly (release, completion with wait, forced revocation): the due
                # entry its marking left would only make a sweep find it revoked again.
                with contextlib.suppress(TaskleaseError):
                    await self._ledger.unschedule(credential_id)
            return result
        # Contended every time: leave it due soon, the next sweep decides afresh.
        retry_at = now + self._settings.backoff_base
        await self._ledger.schedule(credential_id, retry_at)
        lease = await self._ledger.get_lease(credential_id)
        return LeaseResult(
            credential_id, SettleOutcome.RETRYING, lease, "lease contended", retry_at
        )

    async def _decide(
        self,
        credential_id: str,
        now: datetime,
        *,
        reason: RevokeReason | None,
        runs: dict[str, WorkflowRun | None],
    ) -> LeaseResult:
        lease = await self._ledger.get_lease(credential_id)
        if lease is None:
            return LeaseResult(credential_id, SettleOutcome.MISSING, None)
        if lease.state is LeaseState.REVOKED:
            return LeaseResult(credential_id, SettleOutcome.ALREADY_REVOKED, lease)
        if lease.is_expired(now):
            await self._expire_run_past_deadline(lease.workflow_id, now, runs)
        if not lease.revocable:
            return await self._settle_not_revocable(lease, now)
        if not lease.token_accessor and not lease.vault_lease_ids:
            return await self._settle_unrecorded(lease, now)
        return await self._revoke(lease, now, reason=reason)

    async def _settle_not_revocable(self, lease: Lease, now: datetime) -> LeaseResult:
        # Nothing to revoke in Vault (an SSH certificate): it ends at its expiry, which Vault
        # and the certificate enforce. Until then it is reported live and stays due then.
        if lease.is_expired(now):
            return await self._end_by_expiry(lease, now, RevokeReason.EXPIRED)
        await self._ledger.schedule(lease.credential_id, lease.expires_at)
        return LeaseResult(
            lease.credential_id,
            SettleOutcome.NOT_REVOCABLE,
            lease,
            f"cannot be revoked early; expires at {lease.expires_at.isoformat()}",
            lease.expires_at,
        )

    async def _settle_unrecorded(self, lease: Lease, now: datetime) -> LeaseResult:
        # Written ahead, but the mint recorded no token (in flight, or its answer was lost).
        # The task token's TTL is enforced by Vault, so at its expiry nothing of it is left.
        if lease.is_expired(now):
            return await self._end_by_expiry(lease, now, RevokeReason.EXPIRED_UNRECORDED)
        # Looked at again soon: a refused activation records the token and makes the lease due
        # at once, but this reschedule may land just after it and push it back.
        again = min(lease.expires_at, now + self._settings.unrecorded_recheck)
        await self._ledger.schedule(lease.credential_id, again)
        return LeaseResult(
            lease.credential_id,
            SettleOutcome.MINT_IN_FLIGHT,
            lease,
            "minting has not recorded its Vault token yet; it is revoked once recorded "
            f"(its task is tombstoned) and expires in Vault at {lease.expires_at.isoformat()}",
            again,
        )

    async def _end_by_expiry(
        self, lease: Lease, now: datetime, reason: RevokeReason
    ) -> LeaseResult:
        recorded = (lease.token_accessor, lease.vault_lease_ids)

        def ended(current: Lease) -> Lease | None:
            if current.state is LeaseState.REVOKED:
                return None
            if (current.token_accessor, current.vault_lease_ids) != recorded:
                raise _LeaseChangedError  # a token was recorded meanwhile: revoke it instead
            return dataclasses.replace(
                current, state=LeaseState.REVOKED, revoked_at=now, revoke_reason=reason.value
            )

        updated = await self._update(lease.credential_id, ended)
        if updated is None:
            return LeaseResult(lease.credential_id, SettleOutcome.ALREADY_REVOKED, lease)
        _log.info("credential.revoked", **_lease_fields(updated), reason=reason.value)
        await self._record_revoked(updated)
        return LeaseResult(lease.credential_id, SettleOutcome.EXPIRED, updated)

    async def _revoke(
        self, lease: Lease, now: datetime, *, reason: RevokeReason | None
    ) -> LeaseResult:
        why = lease.revoke_reason or (reason or _fallback_reason(lease, now)).value
        if lease.state in (LeaseState.ISSUING, LeaseState.ACTIVE) or not lease.revoke_reason:
            lease = await self._require(
                lease,
                lambda current: dataclasses.replace(
                    current,
                    state=(
                        current.state
                        if current.state is LeaseState.REVOKE_FAILED
                        else LeaseState.REVOKING
                    ),
                    revoke_reason=current.revoke_reason or why,
                ),
            )
        outcome, error = await self._call_minter(lease)
        if outcome is not None and outcome.confirmed:
            return await self._confirmed(lease, now)
        return await self._failed(lease, now, error)

    async def _call_minter(self, lease: Lease) -> tuple[RevokeOutcome | None, str]:
        """Revoke in Vault within ``revoke_timeout``; (outcome, a short safe error)."""
        started = asyncio.get_running_loop().time()
        measured = "failed"
        try:
            async with asyncio.timeout(self._settings.revoke_timeout.total_seconds()):
                outcome = await self._minter.revoke(
                    token_accessor=lease.token_accessor, vault_lease_ids=lease.vault_lease_ids
                )
            measured = "confirmed" if outcome.confirmed else "unconfirmed"
        except TimeoutError:
            measured = "timeout"
            return None, f"revoke.timeout: no answer within {self._settings.revoke_timeout}"
        except TaskleaseError as exc:
            # Only the stable reason code and the class title: the detail may quote a Vault
            # response body (a database error, a connection string), which is never stored.
            return None, f"{exc.reason}: {exc.title}"
        except Exception as exc:  # noqa: BLE001 - an untranslated adapter error is a failed try
            _log.error(
                "revocation.minter_error",
                credential_id=lease.credential_id,
                error_type=type(exc).__name__,
            )
            return None, f"revoke.error: {type(exc).__name__}"
        finally:
            self.metrics.revoke_seconds.labels(kind=lease.kind.value, outcome=measured).observe(
                asyncio.get_running_loop().time() - started
            )
        if outcome.confirmed:
            return outcome, ""
        unconfirmed = f"revoke.unconfirmed: {len(outcome.still_live)} item(s) still known to Vault"
        if outcome.error:
            unconfirmed += f" ({printable(outcome.error, 120)})"
        return outcome, unconfirmed

    async def _confirmed(self, lease: Lease, now: datetime) -> LeaseResult:
        revoked_refs = (lease.token_accessor, lease.vault_lease_ids)

        def revoked(current: Lease) -> Lease | None:
            if current.state is LeaseState.REVOKED:
                return None
            if (current.token_accessor, current.vault_lease_ids) != revoked_refs:
                raise _LeaseChangedError
            return dataclasses.replace(
                current, state=LeaseState.REVOKED, revoked_at=now, last_error=""
            )

        updated = await self._update(lease.credential_id, revoked)
        if updated is None:
            stored = await self._ledger.get_lease(lease.credential_id)
            return LeaseResult(lease.credential_id, SettleOutcome.ALREADY_REVOKED, stored)
        _log.info(
            "credential.revoked",
            **_lease_fields(updated),
            reason=updated.revoke_reason,
            failed_attempts=updated.attempts,
        )
        await self._record_revoked(updated)
        return LeaseResult(lease.credential_id, SettleOutcome.REVOKED, updated)

    async def _failed(self, lease: Lease, now: datetime, error: str) -> LeaseResult:
        settings = self._settings

        def failed(current: Lease) -> Lease | None:
            if current.state is LeaseState.REVOKED:
                return None
            attempts = current.attempts + 1
            state = (
                LeaseState.REVOKE_FAILED
                if attempts >= settings.max_attempts
                else (
                    current.state
                    if current.state is LeaseState.REVOKE_FAILED
                    else LeaseState.REVOKING
                )
            )
            return dataclasses.replace(
                current, state=state, attempts=attempts, last_error=error[:200]
            )

        updated = await self._update(lease.credential_id, failed)
        if updated is None:
            stored = await self._ledger.get_lease(lease.credential_id)
            return LeaseResult(lease.credential_id, SettleOutcome.ALREADY_REVOKED, stored)
        retry_at = now + self.retry_delay(updated.attempts)
        await self._ledger.schedule(lease.credential_id, retry_at)
        fields = _lease_fields(updated)
        if updated.state is LeaseState.REVOKE_FAILED:
            if lease.state is not LeaseState.REVOKE_FAILED:
                self.metrics.revoke_failed_transitions.inc()
                _log.error(
                    "credential.revoke_failed",
                    **fields,
                    attempts=updated.attempts,
                    error=updated.last_error,
                    next_attempt_at=retry_at.isoformat(),
                    alert=True,
                )
                await self._record(
                    _lease_event(
                        updated,
                        self._audit_actor,
                        CredentialRevokeFailed(
                            attempts=updated.attempts,
                            error=updated.last_error,
                            still_live=tuple(
                                x for x in (updated.token_accessor, *updated.vault_lease_ids) if x
                            ),
                        ),
                        self._clock.now(),
                    )
                )
            else:
                _log.warning(
                    "credential.revoke_retry_failed",
                    **fields,
                    attempts=updated.attempts,
                    error=updated.last_error,
                    next_attempt_at=retry_at.isoformat(),
                )
            outcome = SettleOutcome.REVOKE_FAILED
        else:
            _log.warning(
                "credential.revoke_attempt_failed",
                **fields,
                attempts=updated.attempts,
                error=updated.last_error,
                next_attempt_at=retry_at.isoformat(),
            )
            outcome = SettleOutcome.RETRYING
        return LeaseResult(lease.credential_id, outcome, updated, updated.last_error, retry_at)

    def retry_delay(self, attempts: int) -> timedelta:
        """The jittered delay before the next attempt after ``attempts`` failed ones:
        base · 2^(attempts-1) capped at ``backoff_cap`` (``failed_retry_interval`` once
        ``max_attempts`` is reached), uniformly drawn from [delay/2, delay]."""
        settings = self._settings
        if attempts >= settings.max_attempts:
            ceiling = settings.failed_retry_interval
        else:
            exponent = min(max(attempts - 1, 0), 32)
            ceiling = min(settings.backoff_cap, settings.backoff_base * (2**exponent))
        seconds = ceiling.total_seconds()
        return timedelta(seconds=self._rng.uniform(seconds / 2, seconds))

    async def _require(self, lease: Lease, change: Callable[[Lease], Lease]) -> Lease:
        """Apply ``change`` to the stored lease; a lease revoked meanwhile restarts the step."""

        def guarded(current: Lease) -> Lease | None:
            if current.state is LeaseState.REVOKED:
                raise _LeaseChangedError
            return change(current)

        updated = await self._update(lease.credential_id, guarded)
        return updated or lease

    async def _update(
        self, credential_id: str, change: Callable[[Lease], Lease | None]
    ) -> Lease | None:
        """Read, change and save a lease, again on a conflicting concurrent write. ``change``
        returns None to leave the lease as it is (then None is returned), the new lease, or
        raises :class:`_LeaseChangedError`. A lease that no longer exists is None."""
        for _ in range(_UPDATE_ATTEMPTS):
            current = await self._ledger.get_lease(credential_id)
            if current is None:
                return None
            new = change(current)
            if new is None:
                return None
            if new == current:
                return current
            try:
                await self._ledger.save_lease(new)
            except ConflictError:
                continue  # written meanwhile (an activation, another replica): re-read
            return new
        raise _LeaseChangedError

    # ---- audit

    async def _record(self, event: AuditEvent) -> None:
        """Record ``event``; a failure is logged and never stops a revocation."""
        if self._audit is None:
            return
        try:
            await self._audit.record(event)
        except TaskleaseError as exc:
            _log.error(
                "revocation.audit_failed",
                event_id=event.event_id,
                type=event.type.value,
                credential_id=event.credential_id,
                reason=exc.reason,
            )

    async def _record_revoked(self, lease: Lease) -> None:
        if (
            lease.revoke_reason == RevokeReason.CONTINUOUS_AUTHORIZATION
            and _CALLER_RECORDS_REVOKED.get()
        ):
            return  # broker/continuous.py records these itself, with what changed and why
        initiated_by, why = _INITIATED.get()
        await self._record(
            _lease_event(
                lease,
                self._audit_actor,
                CredentialRevoked(
                    cause=lease.revoke_reason,
                    target=lease.target,
                    reason=why,
                    initiated_by=initiated_by,
                ),
                self._clock.now(),
            )
        )

    # ---- runs past their deadline, late mints

    async def _expire_run_past_deadline(
        self, workflow_id: str, now: datetime, runs: dict[str, WorkflowRun | None]
    ) -> None:
        if workflow_id in runs:
            return
        run = await self._ledger.get_run(workflow_id)
        runs[workflow_id] = run
        if run is None or run.state is not RunState.ACTIVE or now < run.deadline:
            return
        expired = _expired(run)
        try:
            await self._ledger.save_run(expired)
        except NotFoundError:
            return
        runs[workflow_id] = expired
        _log.info("workflow.expired", workflow_id=run.id, deadline=run.deadline.isoformat())
        await self._record(
            _run_event(
                expired,
                self._audit_actor,
                WorkflowCompleted(state=expired.state.value, outcome=expired.outcome),
                now,
            )
        )

    async def _recheck_ended_runs(self, now: datetime) -> int:
        """Revoke leases of runs this replica completed that are live but were not made due
        by the completion (written ahead just after it listed the run). Each run is listed
        again at +1 s, +2 s, +4 s … after its completion, while within ``late_mint_window``:
        a handful of listings per completed run, whatever the sweep rate."""
        found = 0
        for run_id, watch in list(self._ended.items()):
            if now < watch.next_check:
                continue
            if now - watch.ended > self._settings.late_mint_window:
                del self._ended[run_id]
                continue
            try:
                leases = await self._ledger.find_leases(
                    LeaseSelector(
                        workflow_id=run_id,
                        states=frozenset({LeaseState.ISSUING, LeaseState.ACTIVE}),
                    ),
                    limit=MAX_ADDRESSED,
                )
            except LedgerUnavailableError:
                return found  # the next sweep lists it again
            self._ended[run_id] = dataclasses.replace(
                watch, next_check=now + (now - watch.ended) + _FIRST_RECHECK
            )
            strays = [x for x in leases if x.state is LeaseState.ISSUING or x.revocable]
            if not strays:
                continue
            run = await self._ledger.get_run(run_id)
            deadline = run.deadline if run is not None else now
            await self._tombstone(
                strays, until=max(deadline, self._clock.now()) + self._settings.tombstone_margin
            )
            for lease in strays:
                _log.warning("revocation.late_mint_found", **_lease_fields(lease))
                await self._mark(lease, watch.reason, now)
            found += len(strays)
        return found


@dataclass(frozen=True, slots=True)
class _EndedRun:
    """A run this replica completed, watched for leases written ahead after it listed them."""

    reason: RevokeReason
    ended: datetime
    next_check: datetime


# --------------------------------------------------------------------------- helpers


def _is_admin(caller: Caller) -> bool:
    return Role.ADMIN in caller.roles


def _expired(run: WorkflowRun) -> WorkflowRun:
    return dataclasses.replace(
        run, state=RunState.EXPIRED, ended_at=run.deadline, outcome="deadline"
    )


def _fallback_reason(lease: Lease, now: datetime) -> RevokeReason:
    """Why a due lease with no recorded reason is being revoked."""
    if lease.state is LeaseState.ISSUING:
        return RevokeReason.ACTIVATION_REFUSED  # only a refused activation records a token
    return RevokeReason.TTL_EXPIRED if lease.is_expired(now) else RevokeReason.DUE


def _lag(results: Sequence[LeaseResult], now: datetime) -> timedelta:
    # Leases settled at the first try because they expired: their due time was their expiry.
    # (Retried leases are due at their backoff, and the overdue gauge covers them.)
    expiries = [
        r.lease.expires_at
        for r in results
        if r.lease is not None
        and r.outcome in (SettleOutcome.REVOKED, SettleOutcome.EXPIRED)
        and r.lease.attempts == 0
        and r.lease.is_expired(now)
    ]
    return now - min(expiries) if expiries else timedelta(0)


def _lease_fields(lease: Lease) -> dict[str, object]:
    """What the log says about a lease: identifiers and the token accessor, never a secret."""
    return {
        "credential_id": lease.credential_id,
        "workflow_id": lease.workflow_id,
        "task_id": lease.task_id,
        "target": lease.target,
        "kind": lease.kind.value,
        "holder": lease.holder,
        "owner": lease.owner,
        "token_accessor": lease.token_accessor,
    }


def _event_id() -> str:
    return f"evt_{secrets.token_hex(12)}"


def _lease_event(lease: Lease, actor: str, payload: Payload, time: datetime) -> AuditEvent:
    return AuditEvent(
        event_id=_event_id(),
        time=time,
        actor=actor,
        payload=payload,
        chain=lease.chain,
        workflow_id=lease.workflow_id,
        task_id=lease.task_id,
        credential_id=lease.credential_id,
        approval_id=lease.approval_id or "",
        request_id=current_request_id(),
    )


def _run_event(run: WorkflowRun, actor: str, payload: Payload, time: datetime) -> AuditEvent:
    return AuditEvent(
        event_id=_event_id(),
        time=time,
        actor=actor,
        payload=payload,
        chain=run.chain,
        workflow_id=run.id,
        request_id=current_request_id(),
    )


def _selector_fields(selector: LeaseSelector) -> dict[str, object]:
    fields: dict[str, object] = {}
    for name in ("workflow_id", "task_id", "holder", "holder_prefix", "owner", "target"):
        value = getattr(selector, name)
        if value is not None:
            fields[name] = printable(value, 300)
    if selector.sensitivity is not None:
        fields["sensitivity"] = selector.sensitivity.value
    if selector.everything:
        fields["everything"] = True
    return fields
