"""The reconciler: revoke tasklease task tokens that the ledger does not know.

A token can exist without a usable ledger record when a write was lost (a mint whose answer
never came back, a crash between mint and record) or when Redis lost data. Such a token is
still bounded by its own TTL in OpenBao, but until then nobody could revoke it early. The
reconciler lists the task tokens OpenBao holds (metadata ``tasklease=1``), and revokes each
one whose credential the ledger does not hold with that accessor, once it is older than a
grace period (so a mint in flight is never cut short). One replica at a time: a leased lock.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from broker.core.model import LeaseState
from broker.core.ports import Clock, Ledger, Locks, SecretMinter, TaskTokenInventory
from broker.errors import TaskleaseError

_log = structlog.get_logger("broker.reconciler")
LOCK_NAME = "reconciler"


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What one reconciliation saw and did."""

    ran: bool
    examined: int = 0
    revoked: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    skipped_recent: int = 0
    known: int = 0
    errors: tuple[str, ...] = field(default=())


class Reconciler:
    """Finds and revokes orphaned task tokens."""

    def __init__(
        self,
        *,
        inventory: TaskTokenInventory,
        minter: SecretMinter,
        ledger: Ledger,
        locks: Locks,
        clock: Clock,
        grace: timedelta = timedelta(seconds=120),
        max_tokens: int = 10_000,
        lock_ttl: timedelta = timedelta(minutes=5),
    ) -> None:
        self._inventory = inventory
        self._minter = minter
        self._ledger = ledger
        self._locks = locks
        self._clock = clock
        self._grace = grace
        self._max_tokens = max_tokens
        self._lock_ttl = lock_ttl
        self._owner = f"reconciler-{secrets.token_hex(8)}"

    async def reconcile(self) -> ReconcileReport:
        """One pass, if this replica gets the lock."""
        if not await self._locks.try_lock(LOCK_NAME, self._owner, ttl=self._lock_ttl):
            return ReconcileReport(ran=False)
        try:
            return await self._pass(self._clock.now())
        finally:
            await self._locks.unlock(LOCK_NAME, self._owner)

    async def _pass(self, now: datetime) -> ReconcileReport:
        tokens = await self._inventory.task_tokens(limit=self._max_tokens)
        revoked: list[str] = []
        failed: list[str] = []
        recent = known = 0
        for token in tokens:
            if now - token.created_at < self._grace:
                recent += 1
                continue
            lease = (
                await self._ledger.get_lease(token.credential_id) if token.credential_id else None
            )
            if (
                lease is not None
                and lease.token_accessor == token.accessor
                and lease.state is not LeaseState.REVOKED
            ):
                known += 1  # recorded: the sweeper owns its revocation
                continue
            try:
                outcome = await self._minter.revoke(
                    token_accessor=token.accessor, vault_lease_ids=()
                )
            except TaskleaseError as exc:
                failed.append(token.accessor)
                _log.error("reconciler.revoke_failed", accessor=token.accessor, reason=exc.reason)
                continue
            if outcome.confirmed:
                revoked.append(token.accessor)
                _log.warning(
                    "reconciler.orphan_revoked",
                    accessor=token.accessor,
                    credential_id=token.credential_id,
                    ledger_state=lease.state.value if lease is not None else "absent",
                    alert=True,
                )
            else:
                failed.append(token.accessor)
        return ReconcileReport(
            ran=True,
            examined=len(tokens),
            revoked=tuple(revoked),
            failed=tuple(failed),
            skipped_recent=recent,
            known=known,
        )

    async def run(self, *, interval: timedelta) -> None:
        """Reconcile forever, every ``interval``; a failed pass is logged and retried."""
        while True:
            try:
                report = await self.reconcile()
                if report.ran:
                    _log.info(
                        "reconciler.pass",
                        examined=report.examined,
                        revoked=len(report.revoked),
                        failed=len(report.failed),
                        known=report.known,
                    )
            except TaskleaseError as exc:
                _log.error("reconciler.pass_failed", reason=exc.reason, detail=exc.detail)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one pass
                _log.error("reconciler.pass_crashed", error=type(exc).__name__)
            await asyncio.sleep(interval.total_seconds())
