"""A used approval's re-evaluation is noted before its withdrawal is stored, with fakes: the
approvals use case (in-memory approval store) wired to continuous authorization through
``ReevaluatingWithdrawals``, as bootstrap wires them.

The note is in the pending records when the withdrawal is written, so a broker killed right
after that write leaves it to the next start, which revokes the credential. The withdrawal
job carries that very note and clears it (one note per withdrawal). A withdrawal that fails
discards the note, unless the store says it was withdrawn all the same (then the credential
is decided at once); a note the store refuses never blocks the withdrawal."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.adapters.memory_approvals import InMemoryApprovalStore
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.memory_reevaluation import InMemoryPendingScopeRecords
from broker.approvals import Approvals
from broker.continuous import (
    ApprovalStoreStates,
    ContinuousAuthorizer,
    ReevaluatingWithdrawals,
    WithdrawalNote,
)
from broker.core.approvals import Approval, ApprovalStatus, Verdict
from broker.core.model import Lease, LeaseState
from broker.core.ports import PendingScopeRecord
from broker.core.roles import Role
from broker.errors import (
    ApprovalStateError,
    AuditUnavailableError,
    ConflictError,
    LedgerUnavailableError,
)
from tests.unit.test_continuous import (
    ADMIN,
    NOW,
    World,
    caller,
    engine_with,
    opened_approval,
    restrict,
)
from tests.unit.test_continuous_pending import DownLedger, events
from tests.unit.test_continuous_retry import FAST, SLOW

WITHDRAWER = caller(ADMIN, Role.ADMIN)
REVOKED = (LeaseState.REVOKED, "continuous_authorization")
KEPT = (LeaseState.ACTIVE, "")


class Killed(BaseException):
    """The broker process dies here: nothing after this point runs (not an ``Exception``, so
    no handler of the code under test sees it)."""


class Records(InMemoryPendingScopeRecords):
    """Pending records that remember every id noted and cleared, and can refuse notes."""

    def __init__(self, *, refuse: int = 0) -> None:
        super().__init__()
        self.refuse = refuse  # notes refused before one is stored (-1: every one)
        self.noted: list[str] = []
        self.cleared: list[str] = []

    async def note_pending(self, record: PendingScopeRecord) -> None:
        if self.refuse:
            self.refuse -= 1 if self.refuse > 0 else 0
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
        self.noted.append(record.id)
        await super().note_pending(record)

    async def clear_pending(self, ids: Collection[str]) -> None:
        self.cleared.extend(ids)
        await super().clear_pending(ids)


class Store(InMemoryApprovalStore):
    """The approval store, watched: ``on_withdrawal`` runs when a withdrawn version is about
    to be saved, and decides what the save does (``None``: it is saved as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.withdrawal_saves = 0
        self.on_withdrawal: Any = None
        self.reads_fail = False

    async def get_approval(self, approval_id: str) -> Approval | None:
        if self.reads_fail:
            raise LedgerUnavailableError("redis down", reason="ledger.unreachable")
        return await super().get_approval(approval_id)

    async def save_approval(self, approval: Approval, *, expected_version: int) -> bool:
        if approval.state is not ApprovalStatus.WITHDRAWN or self.on_withdrawal is None:
            return await super().save_approval(approval, expected_version=expected_version)
        self.withdrawal_saves += 1
        result: bool = await self.on_withdrawal(approval, expected_version)
        return result

    async def save(self, approval: Approval, expected_version: int) -> bool:
        return await super().save_approval(approval, expected_version=expected_version)


@dataclass
class Setup:
    """A live demo-db credential (restricted now: it needs an approval) issued under
    ``approval`` (used, in ``store``), the approvals use case and an authorizer wired together
    through ``ReevaluatingWithdrawals``, and the authorizer's pending ``records``."""

    world: World
    lease: Lease
    approval: Approval
    store: Store
    records: Records
    approvals: Approvals
    authorizer: ContinuousAuthorizer
    audit: MemoryAuditTrail

    def restart(self) -> ContinuousAuthorizer:
        """The authorizer of the next broker process (same Redis: records, store, ledger)."""
        return authorizer(self.world, self.store, self.records, writer="broker-b", **FAST)

    async def state(self) -> tuple[LeaseState, str]:
        return await self.world.state(self.lease.credential_id)

    async def stored(self) -> Approval:
        self.store.reads_fail = False
        stored = await self.store.get_approval(self.approval.id)
        assert stored is not None
        return stored


async def setup(*, records: Records | None = None, used: bool = True, **options: Any) -> Setup:
    world = World(DownLedger())
    await world.start_run()
    issued = await world.issue("demo-db", task="db-0")
    await world.issue("demo-kv", task="kv-0")
    world.policy.replace(engine_with())
    restrict(world)

    store = Store()
    opened = opened_approval(issued)
    assert await store.create_approval(opened, replaces=None)
    approved = opened.decide(
        approver="bob@example.test", display="Bob", verdict=Verdict.APPROVE, now=NOW
    )
    assert await store.save_approval(approved, expected_version=opened.version)
    approval = approved
    if used:
        approval = approved.consume(
            digest=opened.digest, credential_id=issued.credential_id, now=NOW
        )
        assert await store.save_approval(approval, expected_version=approved.version)
    lease = replace(issued, approval_id=approval.id)
    world.ledger._leases[lease.credential_id] = lease

    records = records if records is not None else Records()
    first = authorizer(world, store, records, writer="broker-a", **{**FAST, **options})
    audit = MemoryAuditTrail()
    approvals = Approvals(
        store=store,
        audit=audit,
        clock=world.clock,
        withdrawal_hook=ReevaluatingWithdrawals(first),
    )
    return Setup(world, lease, approval, store, records, approvals, first, audit)


def authorizer(
    world: World, store: Store, records: Records, *, writer: str, **options: Any
) -> ContinuousAuthorizer:
    """An authorizer over ``world`` that reads approvals from ``store`` (as bootstrap wires
    it), with ``records`` as its pending records."""
    return world.authorizer(
        batch=2,
        approvals=ApprovalStoreStates(store),
        pending=records,
        writer=writer,
        **options,
    )


async def test_the_note_is_in_the_pending_records_when_the_withdrawal_is_written() -> None:
    s = await setup()
    at_save: list[list[PendingScopeRecord]] = []

    async def watch(approval: Approval, expected_version: int) -> bool:
        at_save.append(list(s.records.records.values()))
        return await s.store.save(approval, expected_version)

    s.store.on_withdrawal = watch
    withdrawn = await s.approvals.withdraw(WITHDRAWER, s.approval.id, comment="wrong ticket")
    await asyncio.wait_for(s.authorizer.drain(), timeout=5)

    assert withdrawn.state is ApprovalStatus.WITHDRAWN
    ((noted,),) = at_save
    assert (noted.key, noted.workflow_id, noted.task_id, noted.noted_by) == (
        s.approval.id,
        "wf-1",
        s.lease.task_id,
        "broker-a",
    )
    assert noted.reason == f"approval {s.approval.id} was withdrawn by {ADMIN}"
    assert await s.state() == REVOKED


async def test_one_note_per_withdrawal_carried_by_its_reevaluation_and_cleared_after() -> None:
    s = await setup()
    with capture_logs() as logs:
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)
        await asyncio.wait_for(s.authorizer.drain(), timeout=5)

    assert await s.state() == REVOKED
    assert len(s.records.noted) == 1
    assert s.records.cleared == s.records.noted
    assert s.records.records == {}
    assert [e["records"] for e in events(logs, "continuous.pending_cleared")] == [1]


async def test_a_broker_killed_right_after_storing_the_withdrawal_leaves_it_to_the_next() -> None:
    s = await setup(**SLOW)

    async def write_then_die(approval: Approval, expected_version: int) -> bool:
        assert await s.store.save(approval, expected_version)
        raise Killed  # before the audit event, the webhook and the re-evaluation

    s.store.on_withdrawal = write_then_die
    with pytest.raises(Killed):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    await s.authorizer.close()  # the process is gone: nothing it queued runs

    assert (await s.stored()).state is ApprovalStatus.WITHDRAWN
    assert len(s.records.records) == 1
    assert await s.state() == KEPT  # nobody decided it yet

    restarted = s.restart()
    with capture_logs() as logs:
        restarted.resume_pending()
        await asyncio.wait_for(restarted.drain(), timeout=5)
    assert await s.state() == REVOKED
    assert s.records.records == {}
    (resumed,) = events(logs, "continuous.pending_resumed")
    assert (resumed["count"], resumed["each_scope"]) == (1, True)


async def test_a_broker_killed_before_storing_the_withdrawal_leaves_a_harmless_note() -> None:
    s = await setup()

    async def die(approval: Approval, expected_version: int) -> bool:
        raise Killed

    s.store.on_withdrawal = die
    with pytest.raises(Killed):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    await s.authorizer.close()
    assert (await s.stored()).state is ApprovalStatus.USED
    assert len(s.records.records) == 1

    restarted = s.restart()
    restarted.resume_pending()
    await asyncio.wait_for(restarted.drain(), timeout=5)
    assert await s.state() == KEPT  # still approved (used): allowed again
    assert s.records.records == {}


async def lose_every_race(s: Setup) -> None:
    async def lost(approval: Approval, expected_version: int) -> bool:
        return False

    s.store.on_withdrawal = lost
    with pytest.raises(ConflictError):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)


async def store_down(s: Setup) -> None:
    async def down(approval: Approval, expected_version: int) -> bool:
        raise LedgerUnavailableError("redis down", reason="ledger.unreachable")

    s.store.on_withdrawal = down
    with pytest.raises(LedgerUnavailableError):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)


async def audit_refused(s: Setup) -> None:
    s.audit.fail = True  # stored, then undone: no step takes effect without its audit record
    with pytest.raises(AuditUnavailableError):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)


@pytest.mark.parametrize("fail", [lose_every_race, store_down, audit_refused])
async def test_a_withdrawal_that_was_not_stored_discards_its_note(fail: Any) -> None:
    s = await setup()
    with capture_logs() as logs:
        await fail(s)
        await asyncio.wait_for(s.authorizer.drain(), timeout=5)

    assert (await s.stored()).state is ApprovalStatus.USED
    assert len(s.records.noted) == 1  # noted once, however many compare-and-set rounds
    assert (s.records.records, s.records.cleared) == ({}, s.records.noted)
    assert await s.state() == KEPT
    (failed,) = events(logs, "approval.withdrawal_failed")
    assert (failed["stored_state"], failed["reevaluated"]) == ("used", False)
    assert len(events(logs, "continuous.pending_discarded")) == 1
    assert events(logs, "continuous.reevaluated") == []


async def test_a_withdrawal_whose_write_landed_before_its_error_is_decided_at_once() -> None:
    s = await setup()

    async def timed_out(approval: Approval, expected_version: int) -> bool:
        assert await s.store.save(approval, expected_version)
        raise LedgerUnavailableError("reply lost", reason="ledger.unreachable")

    s.store.on_withdrawal = timed_out
    with capture_logs() as logs, pytest.raises(LedgerUnavailableError):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    await asyncio.wait_for(s.authorizer.drain(), timeout=5)

    assert await s.state() == REVOKED
    assert (s.records.records, s.records.cleared) == ({}, s.records.noted)
    (failed,) = events(logs, "approval.withdrawal_failed")
    assert (failed["stored_state"], failed["reevaluated"]) == ("withdrawn", True)


async def test_a_failed_withdrawal_the_store_cannot_tell_about_keeps_its_note() -> None:
    s = await setup()

    async def down(approval: Approval, expected_version: int) -> bool:
        s.store.reads_fail = True
        raise LedgerUnavailableError("redis down", reason="ledger.unreachable")

    s.store.on_withdrawal = down
    with capture_logs() as logs, pytest.raises(LedgerUnavailableError):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    assert len(events(logs, "approval.withdrawal_unsettled")) == 1
    assert len(s.records.records) == 1
    await s.authorizer.close()

    # The next start (Redis back) decides the credential under what the store says then
    # (still used).
    s.store.reads_fail = False
    restarted = s.restart()
    restarted.resume_pending()
    await asyncio.wait_for(restarted.drain(), timeout=5)
    assert await s.state() == KEPT
    assert s.records.records == {}


async def test_a_note_the_store_refuses_never_blocks_the_withdrawal() -> None:
    s = await setup(records=Records(refuse=1))
    with capture_logs() as logs:
        withdrawn = await s.approvals.withdraw(WITHDRAWER, s.approval.id)
        await asyncio.wait_for(s.authorizer.drain(), timeout=5)

    assert withdrawn.state is ApprovalStatus.WITHDRAWN
    (unrecorded,) = events(logs, "continuous.pending_unrecorded")
    assert (unrecorded["reason"], unrecorded["alert"]) == ("ledger.unreachable", True)
    # The same record, stored before the first attempt, then cleared: none left behind.
    (noted,) = s.records.noted
    assert s.records.cleared == [noted]
    assert s.records.records == {}
    assert await s.state() == REVOKED


async def test_a_pending_store_that_is_down_still_lets_the_credential_be_revoked() -> None:
    s = await setup(records=Records(refuse=-1))
    with capture_logs() as logs:
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)
        await asyncio.wait_for(s.authorizer.drain(), timeout=5)
    assert (await s.stored()).state is ApprovalStatus.WITHDRAWN
    assert await s.state() == REVOKED
    assert len(events(logs, "continuous.pending_unrecorded")) == 2  # before, and before attempt
    assert s.records.noted == []


async def test_an_approval_used_after_it_was_read_is_noted_before_its_withdrawal() -> None:
    """Read while approved (no credential yet); used before the compare-and-set; the next
    round names the credential, so it is noted before that withdrawal is written."""
    s = await setup(used=False)
    at_save: list[int] = []

    async def used_meanwhile(approval: Approval, expected_version: int) -> bool:
        at_save.append(len(s.records.records))
        if not at_save[1:]:
            current = await s.store.get_approval(approval.id)
            assert current is not None and current.state is ApprovalStatus.APPROVED
            used = current.consume(
                digest=current.digest, credential_id=s.lease.credential_id, now=NOW
            )
            assert await s.store.save(used, current.version)
            return False
        return await s.store.save(approval, expected_version)

    s.store.on_withdrawal = used_meanwhile
    withdrawn = await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    await asyncio.wait_for(s.authorizer.drain(), timeout=5)

    assert withdrawn.credential_id == s.lease.credential_id
    assert at_save == [0, 1]
    assert await s.state() == REVOKED
    assert s.records.records == {}


async def test_a_note_for_an_approval_released_meanwhile_is_discarded() -> None:
    """Noted while used; released before the compare-and-set: the withdrawal stored names no
    credential, so there is nothing to decide and the note is removed."""
    s = await setup()

    async def released_meanwhile(approval: Approval, expected_version: int) -> bool:
        if s.store.withdrawal_saves == 1:
            current = await s.store.get_approval(approval.id)
            assert current is not None
            released = current.release(
                credential_id=current.credential_id, version=current.version, now=NOW
            )
            assert await s.store.save(released, current.version)
            return False
        return await s.store.save(approval, expected_version)

    s.store.on_withdrawal = released_meanwhile
    with capture_logs() as logs:
        withdrawn = await s.approvals.withdraw(WITHDRAWER, s.approval.id)
        await asyncio.wait_for(s.authorizer.drain(), timeout=5)

    assert (withdrawn.state, withdrawn.credential_id) == (ApprovalStatus.WITHDRAWN, "")
    assert (s.records.records, s.records.cleared) == ({}, s.records.noted)
    assert len(s.records.noted) == 1
    assert events(logs, "continuous.reevaluated") == []


async def test_an_unused_approval_is_withdrawn_without_a_note() -> None:
    s = await setup(used=False)
    await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    await asyncio.wait_for(s.authorizer.drain(), timeout=5)
    assert (s.records.notes, s.records.noted) == (0, [])
    assert await s.state() == KEPT  # issued without it: nothing to decide


async def test_a_refused_withdrawal_takes_no_note() -> None:
    s = await setup()
    await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    await asyncio.wait_for(s.authorizer.drain(), timeout=5)
    with pytest.raises(ApprovalStateError):
        await s.approvals.withdraw(WITHDRAWER, s.approval.id)  # already withdrawn
    assert len(s.records.noted) == 1


async def test_a_hook_that_fails_to_note_never_blocks_the_withdrawal() -> None:
    s = await setup()
    calls: list[tuple[str, object]] = []

    class Failing:  # broker.approvals.WithdrawalHook[WithdrawalNote]
        async def before_withdrawal(self, approval: Approval) -> WithdrawalNote:
            raise RuntimeError("boom")

        async def withdrawn(self, approval: Approval, note: WithdrawalNote | None) -> None:
            calls.append(("withdrawn", note))

        async def not_withdrawn(self, note: WithdrawalNote) -> None:
            calls.append(("not_withdrawn", note))

    s.approvals.set_withdrawal_hook(Failing())
    with capture_logs() as logs:
        withdrawn = await s.approvals.withdraw(WITHDRAWER, s.approval.id)
    assert withdrawn.state is ApprovalStatus.WITHDRAWN
    assert calls == [("withdrawn", None)]
    (failed,) = events(logs, "approval.withdrawal_hook_failed")
    assert (failed["phase"], failed["error_type"]) == ("before_withdrawal", "RuntimeError")
