"""The reconciler's lock lease with a fake clock: a short TTL kept alive by a heartbeat, a lost
lock stops the pass before its next revocation, a dead replica's lock lapses after one TTL.

``ClockedLocks`` lapses locks at their TTL on the fake clock, as Redis does on its own (the
InMemoryLedger keeps locks until unlocked: it has no clock). ``FakeClock.sleep`` is the
reconciler's heartbeat pause; ``advance`` wakes the sleepers whose time has come.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pydantic
import pytest
from structlog.testing import capture_logs

from broker.adapters.memory_ledger import InMemoryLedger
from broker.config import VaultSettings
from broker.core.ports import MintedCredential, MintSpec, RevokeOutcome, TaskToken
from broker.errors import LedgerUnavailableError
from broker.reconciler import DEFAULT_LOCK_TTL, LOCK_NAME, Reconciler

START = datetime(2030, 1, 1, tzinfo=UTC)
OLD = START - timedelta(minutes=10)
TTL = timedelta(seconds=30)


class FakeClock:
    def __init__(self) -> None:
        self.t = START
        self._sleepers: list[tuple[datetime, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self.t

    async def sleep(self, seconds: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + timedelta(seconds=seconds), wake))
        await wake

    async def advance(self, seconds: float, *, step: float = 1.0) -> None:
        """Move time on in ``step``s, letting every woken coroutine run after each step."""
        left = seconds
        while left > 0:
            moved = min(step, left)
            left -= moved
            self.t += timedelta(seconds=moved)
            for entry in [s for s in self._sleepers if s[0] <= self.t]:
                self._sleepers.remove(entry)
                if not entry[1].done():
                    entry[1].set_result(None)
            await settle()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def never(seconds: float) -> None:
    """The heartbeat pause of a replica that is gone (SIGKILL): it never renews again."""
    await asyncio.Event().wait()


class ClockedLocks:  # satisfies core.ports.Locks
    """Locks that lapse at their TTL on the fake clock; ``down`` makes every call fail like an
    unreachable Redis; ``stall`` makes renewals hang."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._held: dict[str, tuple[str, datetime]] = {}
        self.extended_at: list[datetime] = []
        self.down = False
        self.stall = asyncio.Event()
        self.stall.set()

    def holder(self, name: str) -> str | None:
        entry = self._held.get(name)
        return entry[0] if entry is not None and self.clock.now() < entry[1] else None

    def _check(self) -> None:
        if self.down:
            raise LedgerUnavailableError("Redis is unreachable", reason="ledger.unreachable")

    async def try_lock(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        self._check()
        if self.holder(name) is not None:
            return False
        self._held[name] = (owner, self.clock.now() + ttl)
        return True

    async def extend(self, name: str, owner: str, *, ttl: timedelta) -> bool:
        await self.stall.wait()
        self._check()
        if self.holder(name) != owner:
            return False
        self.extended_at.append(self.clock.now())
        self._held[name] = (owner, self.clock.now() + ttl)
        return True

    async def unlock(self, name: str, owner: str) -> None:
        self._check()
        if self.holder(name) == owner:
            del self._held[name]

    def lapse_and_take(self, name: str, owner: str) -> None:
        """The holder's lock lapsed unseen (a paused process) and ``owner`` took it."""
        self._held[name] = (owner, self.clock.now() + TTL)


class Inventory:
    """OpenBao's task tokens; with ``gate`` the listing waits for it (a slow OpenBao)."""

    def __init__(self, *tokens: TaskToken, gate: asyncio.Event | None = None) -> None:
        self.tokens = list(tokens)
        self.gate = gate

    async def task_tokens(self, *, limit: int) -> list[TaskToken]:
        if self.gate is not None:
            await self.gate.wait()
        return self.tokens[:limit]


class Minter:
    """Confirms every revocation; ``during`` runs inside the first one (time passing)."""

    def __init__(self, during: object = None) -> None:
        self.revoked: list[str] = []
        self.during = during

    async def mint(self, spec: MintSpec) -> MintedCredential:
        raise AssertionError("the reconciler never mints")

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        self.revoked.append(token_accessor)
        if len(self.revoked) == 1 and callable(self.during):
            await self.during()
        return RevokeOutcome(confirmed=True)


def orphans(count: int) -> list[TaskToken]:
    return [TaskToken(f"a-{i}", f"c-{i}", OLD, None) for i in range(1, count + 1)]


def replica(
    clock: FakeClock,
    locks: ClockedLocks,
    inventory: Inventory,
    minter: Minter | None = None,
    lock_ttl: timedelta = DEFAULT_LOCK_TTL,
) -> Reconciler:
    return Reconciler(
        inventory=inventory,
        minter=minter or Minter(),
        ledger=InMemoryLedger(),
        locks=locks,
        clock=clock,
        sleep=clock.sleep,
        lock_ttl=lock_ttl,
    )


async def test_a_pass_longer_than_the_lock_ttl_keeps_the_lock() -> None:
    clock = FakeClock()
    locks = ClockedLocks(clock)
    listing = asyncio.Event()
    minter = Minter()
    first = replica(clock, locks, Inventory(*orphans(3), gate=listing), minter, lock_ttl=TTL)
    second = replica(clock, locks, Inventory(*orphans(3)), lock_ttl=TTL)
    running = asyncio.create_task(first.reconcile())
    await settle()
    for _ in range(18):  # 90 s: three TTLs
        await clock.advance(5)
        assert locks.holder(LOCK_NAME) == first.owner
        assert (await second.reconcile()).ran is False
    listing.set()
    report = await running
    assert (report.ran, report.lock_lost) == (True, False)
    assert minter.revoked == ["a-1", "a-2", "a-3"]
    # Renewed every third of the TTL, and released at the end.
    assert [START + timedelta(seconds=s) for s in range(10, 91, 10)] == locks.extended_at
    assert locks.holder(LOCK_NAME) is None


async def test_a_lost_lock_stops_the_pass_before_further_revocations() -> None:
    clock = FakeClock()
    locks = ClockedLocks(clock)

    async def paused_past_the_ttl() -> None:
        locks.lapse_and_take(LOCK_NAME, "reconciler-other")
        await clock.advance(12)  # past the next renewal, which finds the lock taken

    minter = Minter(during=paused_past_the_ttl)
    with capture_logs() as logs:
        report = await replica(clock, locks, Inventory(*orphans(4)), minter).reconcile()
    assert (report.ran, report.lock_lost) == (True, True)
    assert (report.revoked, minter.revoked) == (("a-1",), ["a-1"])
    assert locks.holder(LOCK_NAME) == "reconciler-other"  # not unlocked by the loser
    lost = [e for e in logs if e["event"] == "reconciler.lock_lost"]
    assert [(e["why"], e["alert"]) for e in lost] == [("taken_or_lapsed", True)]


async def test_a_failed_renewal_fails_closed_and_stops_the_pass() -> None:
    clock = FakeClock()
    locks = ClockedLocks(clock)

    async def redis_goes_away() -> None:
        locks.down = True
        await clock.advance(12)  # past the next renewal

    minter = Minter(during=redis_goes_away)
    with capture_logs() as logs:
        report = await replica(clock, locks, Inventory(*orphans(4)), minter).reconcile()
    assert (report.ran, report.lock_lost, minter.revoked) == (True, True, ["a-1"])
    lost = [e for e in logs if e["event"] == "reconciler.lock_lost"]
    assert [(e["why"], e["reason"], e["alert"]) for e in lost] == [
        ("renewal_failed", "ledger.unreachable", True)
    ]
    assert [e["event"] for e in logs if e["event"] == "reconciler.unlock_failed"] == [
        "reconciler.unlock_failed"
    ]


async def test_a_renewal_that_does_not_come_back_in_time_stops_the_pass() -> None:
    clock = FakeClock()
    locks = ClockedLocks(clock)

    async def renewal_hangs() -> None:
        locks.stall.clear()
        await clock.advance(30)  # the lock was taken at 0 s: held until 30 s at most

    minter = Minter(during=renewal_hangs)
    with capture_logs() as logs:
        report = await replica(clock, locks, Inventory(*orphans(4)), minter).reconcile()
    assert (report.ran, report.lock_lost, minter.revoked) == (True, True, ["a-1"])
    assert [e["why"] for e in logs if e["event"] == "reconciler.lock_lost"] == ["renewal_overdue"]


async def test_a_killed_replicas_lock_is_taken_by_another_after_the_default_ttl() -> None:
    clock = FakeClock()
    locks = ClockedLocks(clock)
    killed = Reconciler(
        inventory=Inventory(*orphans(2), gate=asyncio.Event()),  # killed mid-listing
        minter=Minter(),
        ledger=InMemoryLedger(),
        locks=locks,
        clock=clock,
        sleep=never,
    )
    minter = Minter()
    survivor = replica(clock, locks, Inventory(*orphans(2)), minter)
    dead = asyncio.create_task(killed.reconcile())
    await settle()
    assert locks.holder(LOCK_NAME) == killed.owner
    await clock.advance(29)
    assert (await survivor.reconcile()).ran is False
    await clock.advance(1)
    report = await survivor.reconcile()
    assert (report.ran, report.revoked) == (True, ("a-1", "a-2"))
    dead.cancel()
    await asyncio.gather(dead, return_exceptions=True)


def test_the_lock_ttl_is_30_seconds_by_default_and_configurable() -> None:
    assert VaultSettings().reconcile_lock_ttl_seconds == 30
    assert VaultSettings(reconcile_lock_ttl_seconds=10).reconcile_lock_ttl_seconds == 10
    with pytest.raises(pydantic.ValidationError):
        VaultSettings(reconcile_lock_ttl_seconds=1)


def test_a_lock_ttl_that_is_not_positive_is_refused() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="lock TTL must be positive"):
        replica(clock, ClockedLocks(clock), Inventory(), lock_ttl=timedelta(0))
