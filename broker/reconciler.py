"""The reconciler: revoke tasklease task tokens that the ledger does not know.

A token can exist without a usable ledger record when a write was lost (a mint whose answer
never came back, a crash between mint and record) or when Redis lost data. Such a token is
still bounded by its own TTL in OpenBao, but until then nobody could revoke it early. The
reconciler lists the task tokens OpenBao holds (metadata ``tasklease=1``), and revokes each
one whose credential the ledger does not hold with that accessor, once it is older than a
grace period (so a mint in flight is never cut short).

One replica at a time: a leased lock with a short TTL (30 s by default), renewed by a heartbeat
every third of it while the pass runs, so a replica killed mid-pass holds up the others for one
TTL at most. The lock is trusted only until the TTL counted from the moment the last
successful take or renewal was sent; a renewal answered "no" (another replica took the lock
after it lapsed), a renewal that fails (Redis unavailable) or one that does not come back in
time stops the pass before its next revocation (``reconciler.lock_lost``, an alert). The
pass never unlocks a lock it lost: the unlock is a compare-and-delete on the owner.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from broker.core.model import LeaseState
from broker.core.ports import Clock, Ledger, Locks, SecretMinter, TaskTokenInventory
from broker.errors import TaskleaseError

_log = structlog.get_logger("broker.reconciler")
LOCK_NAME = "reconciler"
DEFAULT_LOCK_TTL = timedelta(seconds=30)


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
    lock_lost: bool = False
    """The pass stopped early: this replica could no longer be sure it held the lock."""


class _Hold:
    """What this replica knows about its hold on the lock during one pass."""

    def __init__(self, *, owner: str, until: datetime) -> None:
        self.owner = owner
        self.until = until
        self.lost = False

    def held(self, now: datetime) -> bool:
        """Still ours at ``now``; the first time it is not, say so (once, with an alert)."""
        if not self.lost and now >= self.until:
            self.lose("renewal_overdue", until=self.until.isoformat())
        return not self.lost

    def lose(self, why: str, **detail: str) -> None:
        if not self.lost:
            self.lost = True
            _log.error("reconciler.lock_lost", owner=self.owner, why=why, alert=True, **detail)


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
        lock_ttl: timedelta = DEFAULT_LOCK_TTL,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if lock_ttl <= timedelta(0):
            raise ValueError(f"the reconciler's lock TTL must be positive, got {lock_ttl}")
        self._inventory = inventory
        self._minter = minter
        self._ledger = ledger
        self._locks = locks
        self._clock = clock
        self._grace = grace
        self._max_tokens = max_tokens
        self._lock_ttl = lock_ttl
        self._sleep = sleep
        self._owner = f"reconciler-{secrets.token_hex(8)}"

    @property
    def owner(self) -> str:
        """This replica's name on the lock."""
        return self._owner

    async def reconcile(self) -> ReconcileReport:
        """One pass, if this replica gets the lock; it keeps the lock alive while it runs."""
        sent = self._clock.now()
        if not await self._locks.try_lock(LOCK_NAME, self._owner, ttl=self._lock_ttl):
            return ReconcileReport(ran=False)
        hold = _Hold(owner=self._owner, until=sent + self._lock_ttl)
        heartbeat = asyncio.create_task(self._keep(hold), name="reconciler-lock-heartbeat")
        try:
            return await self._pass(self._clock.now(), hold)
        finally:
            heartbeat.cancel()
            await asyncio.wait([heartbeat])  # let it end; its cancellation is not ours
            await self._release()

    async def _keep(self, hold: _Hold) -> None:
        """Renew the lock every third of its TTL while this owner still holds it."""
        interval = self._lock_ttl.total_seconds() / 3
        while not hold.lost:
            await self._sleep(interval)
            sent = self._clock.now()
            try:
                kept = await self._locks.extend(LOCK_NAME, self._owner, ttl=self._lock_ttl)
            except TaskleaseError as exc:  # fail closed: unsure is not held
                hold.lose("renewal_failed", reason=exc.reason)
                return
            except Exception as exc:  # noqa: BLE001 - any failure to renew means not held
                hold.lose("renewal_failed", reason=type(exc).__name__)
                return
            if not kept:
                hold.lose("taken_or_lapsed")
                return
            hold.until = sent + self._lock_ttl

    async def _release(self) -> None:
        # A compare-and-delete on the owner: a lock another replica holds by now stays its own.
        try:
            await self._locks.unlock(LOCK_NAME, self._owner)
        except TaskleaseError as exc:  # it lapses by itself within one lock TTL
            _log.warning("reconciler.unlock_failed", reason=exc.reason)

    async def _pass(self, now: datetime, hold: _Hold) -> ReconcileReport:
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
            if not hold.held(self._clock.now()):
                break  # the next replica to hold the lock takes the rest
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
            lock_lost=hold.lost,
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
                        lock_lost=report.lock_lost,
                    )
            except TaskleaseError as exc:
                _log.error("reconciler.pass_failed", reason=exc.reason, detail=exc.detail)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one pass
                _log.error("reconciler.pass_crashed", error=type(exc).__name__)
            await asyncio.sleep(interval.total_seconds())
