"""Run retention: ended runs leave the ledger once they have been over for the retention period.

Redis runs ``noeviction`` (SECURITY 33), so a ledger that kept every run forever would fill it
and then fail every issuance closed. A run is *over* when it ended (or reached its deadline)
and every credential issued in it expired (:func:`broker.core.model.run_over_at`); OpenBao has
ended its task tokens by then whatever the ledger says. ``retention`` after that, once the
ledger has settled every credential of it (none live: a revocation not confirmed keeps the
record, and its run, until the sweeper confirms it, so each credential's end is in the audit
trail before its record goes), one pass deletes the run with its leases, tombstones and index
entries. The audit trail keeps the history: issuance, revocation and, recorded before each
deletion, ``workflow.purged`` with how many lease records went, by state.

One replica at a time (a leased lock of a minute: a replica killed during a pass holds up the
others that long at most; a pass that outlasts it may meet another replica's, which costs a
second ``workflow.purged`` record of a run at worst). A pass handles at most ``batch`` runs,
oldest first, and the next pass goes on. A run that changed since it was read is left for the
next pass (the purge compares what it deletes with what it read). A run that is not over after
all (a credential expires later than its run ended) moves in the index to when it will be.

A purged run's id is retired for ``retire_ids_for`` (the lifetime of the run's copy in the
audit stream, ``audit.redis.index_ttl_days``): in the same step as the deletion, the ledger
notes until when, and starting a run of that id answers ``409 workflow.id_retired`` until
then, so ``GET /v1/audit?workflow_id=`` and a run's trace never mix two runs. Only a purge
retires an id: requests naming a run that does not exist (yet) retire nothing.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from broker.audit import new_event_id
from broker.core.audit import AuditEvent, AuditTrail, WorkflowPurged
from broker.core.ports import Clock, Locks, PurgePlan, RunRetention
from broker.errors import TaskleaseError

_log = structlog.get_logger("broker.retention")
LOCK_NAME = "retention"


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one pass saw and did."""

    ran: bool
    examined: int = 0
    purged: int = 0
    leases: int = 0
    postponed: int = 0
    changed: int = 0
    failed: int = 0


class RunRetentionJob:
    """Purges runs over for longer than ``retention`` (see the module docstring)."""

    def __init__(
        self,
        *,
        ledger: RunRetention,
        locks: Locks,
        audit: AuditTrail | None,
        clock: Clock,
        actor: str,
        retention: timedelta,
        batch: int = 100,
        lock_ttl: timedelta = timedelta(seconds=60),
        retire_ids_for: timedelta = timedelta(0),
    ) -> None:
        if retention < timedelta(days=1):
            raise ValueError(f"retention must be at least a day, got {retention}")
        if retire_ids_for < timedelta(0):
            raise ValueError(f"retire_ids_for must not be negative, got {retire_ids_for}")
        self._ledger = ledger
        self._locks = locks
        self._audit = audit
        self._clock = clock
        self._actor = actor
        self._retention = retention
        self._batch = batch
        self._lock_ttl = lock_ttl
        # How long a purged run's id may not start a new run (0: it may at once).
        self._retire_for = retire_ids_for
        self._owner = f"retention-{secrets.token_hex(8)}"
        self._indexed = False
        # This process's totals (``tasklease_ledger_purged_total``, ``…_purge_failures_total``).
        self.runs_purged = 0
        self.leases_purged = 0
        self.failures = 0

    async def purge_pass(self) -> RetentionReport:
        """One pass, if this replica gets the lock."""
        if not await self._locks.try_lock(LOCK_NAME, self._owner, ttl=self._lock_ttl):
            return RetentionReport(ran=False)
        try:
            return await self._pass(self._clock.now() - self._retention)
        finally:
            try:
                await self._locks.unlock(LOCK_NAME, self._owner)
            except TaskleaseError as exc:  # it lapses by itself
                _log.warning("retention.unlock_failed", reason=exc.reason)

    async def _pass(self, cutoff: datetime) -> RetentionReport:
        examined = purged = leases = postponed = changed = failed = 0
        if not self._indexed:
            # Runs stored by a broker from before the retention index (once per ledger); if
            # that fails, the runs indexed already are purged and the next pass tries again.
            try:
                await self._ledger.index_runs()
                self._indexed = True
            except TaskleaseError as exc:
                self.failures += 1
                _log.error("retention.index_failed", error=exc.code, reason=exc.reason)
        for workflow_id in await self._ledger.runs_over_before(cutoff, limit=self._batch):
            examined += 1
            try:
                plan = await self._ledger.plan_purge(workflow_id, cutoff=cutoff)
                if not plan.ready:
                    postponed += plan.run is not None
                    if plan.over_at is not None and plan.over_at <= cutoff:
                        # Over, but a revocation the ledger has not confirmed: the sweeper
                        # settles it; looked at again later.
                        _log.warning(
                            "retention.run_unsettled",
                            workflow_id=workflow_id,
                            lease_states=dict(plan.lease_states),
                        )
                    continue
                await self._record(plan)
                retire_until = self._clock.now() + self._retire_for if self._retire_for else None
                if await self._ledger.purge(plan, retire_until=retire_until):
                    purged += 1
                    leases += plan.leases
                else:
                    changed += 1
            except TaskleaseError as exc:
                # Unreachable, or a record it cannot read: this run waits for the next pass
                # (a durable audit sink that cannot take the event deletes nothing).
                failed += 1
                _log.error(
                    "retention.run_failed",
                    workflow_id=workflow_id,
                    error=exc.code,
                    reason=exc.reason,
                )
        self.runs_purged += purged
        self.leases_purged += leases
        self.failures += failed
        return RetentionReport(
            ran=True,
            examined=examined,
            purged=purged,
            leases=leases,
            postponed=postponed,
            changed=changed,
            failed=failed,
        )

    async def _record(self, plan: PurgePlan) -> None:
        if self._audit is None or plan.run is None or plan.over_at is None:
            return  # a ready plan has both
        await self._audit.record(
            AuditEvent(
                event_id=new_event_id(),
                time=self._clock.now(),
                actor=self._actor,
                payload=WorkflowPurged(
                    state=plan.run.state.value,
                    over_at=plan.over_at,
                    retention_days=self._retention.days,
                    leases=plan.leases,
                    lease_states=dict(sorted(plan.lease_states.items())),
                ),
                workflow_id=plan.workflow_id,
            )
        )

    async def run(self, *, interval: timedelta) -> None:
        """Purge forever, every ``interval``; a failed pass is logged and retried."""
        while True:
            try:
                report = await self.purge_pass()
                if report.ran and report.examined:
                    _log.info(
                        "retention.pass",
                        examined=report.examined,
                        purged=report.purged,
                        leases=report.leases,
                        postponed=report.postponed,
                        changed=report.changed,
                        failed=report.failed,
                    )
            except TaskleaseError as exc:
                self.failures += 1
                _log.error("retention.pass_failed", reason=exc.reason, detail=exc.detail)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one pass
                self.failures += 1
                _log.error("retention.pass_crashed", error=type(exc).__name__)
            await asyncio.sleep(interval.total_seconds())
