"""Approval storage: the same behaviour from the in-memory fake and from Redis."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from broker.adapters.memory_approvals import InMemoryApprovalStore
from broker.adapters.redis_approvals import RedisApprovalStore
from broker.adapters.redis_ledger import RedisLedger
from broker.core.approvals import Approval, ApprovalStatus, ApprovalSubject, Verdict
from broker.core.model import DelegationChain, DelegationHop
from broker.core.ports import ApprovalStore
from broker.devstack import DevStack
from broker.errors import ApprovalStateError
from tests.contract.conftest import Ledgers

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
BOB = "oidc:https://idp.test#bob"
CHAIN = DelegationChain(
    (
        DelegationHop("owner", "alice@example.test", verified=False),
        DelegationHop("agent", AGENT, verified=True),
    )
)


def stores(ledgers: Ledgers) -> tuple[ApprovalStore, ApprovalStore]:
    """A store and a second handle on the same data (its own connections for Redis)."""
    return ledgers.pair(
        InMemoryApprovalStore,
        lambda ledger: RedisApprovalStore(client=ledger.client, namespace=ledger.namespace),
    )


def approval(task: str = "t-1", *, at: datetime = NOW) -> Approval:
    return Approval.open(
        subject=ApprovalSubject(
            workflow_id="wf-1", task_id=task, target="prod-db", ttl_seconds=300, holder=AGENT
        ),
        owner="alice@example.test",
        chain=CHAIN,
        now=at,
        validity=timedelta(hours=1),
        policy_ids=("restricted-needs-approval",),
    )


def approved(pending: Approval) -> Approval:
    return pending.decide(approver=BOB, display="bob", verdict=Verdict.APPROVE, now=NOW)


async def test_create_read_and_the_digest_pointer(ledgers: Ledgers) -> None:
    store, twin = stores(ledgers)
    first = approval()
    assert await store.open_approval_for(first.digest) is None
    assert await store.create_approval(first, replaces=None) is True
    assert await twin.get_approval(first.id) == first
    assert await twin.open_approval_for(first.digest) == first.id
    # A second approval for the same request only replaces the one the caller saw.
    duplicate = approval()
    assert await twin.create_approval(duplicate, replaces=None) is False
    assert await twin.get_approval(duplicate.id) is None
    assert await store.get_approval("apr_" + "f" * 24) is None


async def test_compare_and_set_on_the_version(ledgers: Ledgers) -> None:
    store, twin = stores(ledgers)
    pending = approval()
    await store.create_approval(pending, replaces=None)
    decided = approved(pending)
    assert await store.save_approval(decided, expected_version=pending.version) is True
    # A stale writer (expected version 1) loses.
    stale = pending.withdraw(by=AGENT, now=NOW)
    assert await twin.save_approval(stale, expected_version=pending.version) is False
    assert await twin.get_approval(pending.id) == decided
    with pytest.raises(ValueError, match="does not follow"):
        await store.save_approval(decided, expected_version=decided.version)


async def test_one_of_two_concurrent_uses_wins(ledgers: Ledgers) -> None:
    store, twin = stores(ledgers)
    pending = approval()
    await store.create_approval(pending, replaces=None)
    ready = approved(pending)
    await store.save_approval(ready, expected_version=pending.version)

    async def use(handle: ApprovalStore, credential_id: str) -> bool:
        current = await handle.get_approval(ready.id)
        assert current is not None
        try:
            used = current.consume(digest=current.digest, credential_id=credential_id, now=NOW)
        except ApprovalStateError:
            return False
        return await handle.save_approval(used, expected_version=current.version)

    # Both read version 2 before either writes: exactly one compare-and-set succeeds.
    wins = await asyncio.gather(use(store, "cred_a"), use(twin, "cred_b"))
    assert sorted(wins) == [False, True]
    stored = await store.get_approval(ready.id)
    assert stored is not None and stored.state is ApprovalStatus.USED
    assert stored.credential_id == ("cred_a" if wins[0] else "cred_b")


async def test_the_pending_index_and_pointer_follow_the_state(ledgers: Ledgers) -> None:
    store, twin = stores(ledgers)
    first, second = approval("t-1"), approval("t-2", at=NOW + timedelta(seconds=1))
    for item in (first, second):
        await store.create_approval(item, replaces=None)
    pending = await twin.list_approvals(pending_only=True, limit=10)
    assert [a.id for a in pending] == [second.id, first.id]
    assert await twin.count_pending() == 2
    # Approved: out of the pending index, still the open approval of its request.
    ready = approved(first)
    await store.save_approval(ready, expected_version=first.version)
    assert [a.id for a in await twin.list_approvals(pending_only=True, limit=10)] == [second.id]
    assert await twin.count_pending() == 1
    assert await twin.open_approval_for(first.digest) == first.id
    # Used: no longer open, the pointer is gone; still listed among all approvals.
    used = ready.consume(digest=ready.digest, credential_id="cred_1", now=NOW)
    await store.save_approval(used, expected_version=ready.version)
    assert await twin.open_approval_for(first.digest) is None
    everything = await twin.list_approvals(pending_only=False, limit=10)
    assert [a.id for a in everything] == [second.id, first.id]
    assert everything[1].state is ApprovalStatus.USED
    assert len(await twin.list_approvals(pending_only=False, limit=1)) == 1


async def test_a_new_approval_replaces_a_closed_or_expired_one(ledgers: Ledgers) -> None:
    store, twin = stores(ledgers)
    old = approval()
    await store.create_approval(old, replaces=None)
    later = NOW + timedelta(hours=2)
    expired = old.expire(later)
    await store.save_approval(expired, expected_version=old.version)
    assert await twin.open_approval_for(old.digest) is None
    fresh = approval(at=later)
    assert await twin.create_approval(fresh, replaces=None) is True
    assert await store.open_approval_for(fresh.digest) == fresh.id
    # A pointer left on an approval whose record is gone is replaced by naming it.
    newer = approval(at=later + timedelta(seconds=1))
    assert await store.create_approval(newer, replaces=old.id) is False
    assert await store.create_approval(newer, replaces=fresh.id) is True


async def test_an_undone_step_restores_the_pointer(ledgers: Ledgers) -> None:
    """Undoing a withdrawal (its audit event was refused) makes the approval open again."""
    store, twin = stores(ledgers)
    first = approval()
    await store.create_approval(first, replaces=None)
    withdrawn = first.withdraw(by=AGENT, now=NOW)
    await store.save_approval(withdrawn, expected_version=first.version)
    assert await twin.open_approval_for(first.digest) is None
    undone = dataclasses.replace(first, version=withdrawn.version + 1)
    assert await store.save_approval(undone, expected_version=withdrawn.version) is True
    assert await twin.open_approval_for(first.digest) == first.id
    assert [a.id for a in await twin.list_approvals(pending_only=True, limit=10)] == [first.id]


async def test_a_released_use_is_open_again_and_races_a_withdrawal(ledgers: Ledgers) -> None:
    """Releasing a use that minted nothing (used → approved) is one more compare-and-set: it
    restores the digest pointer, and of a release and a concurrent withdrawal one wins."""
    store, twin = stores(ledgers)
    first = approval()
    await store.create_approval(first, replaces=None)
    ready = approved(first)
    await store.save_approval(ready, expected_version=first.version)
    used = ready.consume(digest=ready.digest, credential_id="cred_1", now=NOW)
    await store.save_approval(used, expected_version=ready.version)
    assert await twin.open_approval_for(first.digest) is None
    released = used.release(credential_id="cred_1", version=used.version, now=NOW)
    assert await store.save_approval(released, expected_version=used.version) is True
    assert await twin.get_approval(first.id) == released
    assert await twin.open_approval_for(first.digest) == first.id
    assert await twin.count_pending() == 0
    # A stale second release (of the same use) loses the compare-and-set.
    assert await twin.save_approval(released, expected_version=used.version) is False

    again = released.consume(digest=ready.digest, credential_id="cred_2", now=NOW)
    await store.save_approval(again, expected_version=released.version)
    withdrawn = again.withdraw(by=BOB, now=NOW)
    release = again.release(credential_id="cred_2", version=again.version, now=NOW)
    wins = await asyncio.gather(
        store.save_approval(withdrawn, expected_version=again.version),
        twin.save_approval(release, expected_version=again.version),
    )
    assert sorted(wins) == [False, True]
    final = await store.get_approval(first.id)
    assert final == (withdrawn if wins[0] else release)


async def test_redis_expires_records_after_the_retention(stack: DevStack) -> None:
    """Redis only: the in-memory store reads no clock and keeps everything."""
    assert stack.endpoints is not None
    redis_only = Ledgers("redis", stack.endpoints.redis_url)
    try:
        await _expires_after_the_retention(redis_only)
    finally:
        await redis_only.close()


async def _expires_after_the_retention(ledgers: Ledgers) -> None:
    ledger = ledgers.new()
    assert isinstance(ledger, RedisLedger)
    store = RedisApprovalStore(
        client=ledger.client, namespace=ledger.namespace, retention=timedelta(hours=1)
    )
    now = datetime.now(UTC)
    item = approval(at=now)
    await store.create_approval(item, replaces=None)
    record = f"{ledger.namespace}:{{ap}}:a:{item.id}"
    ttl_ms = await ledger.client.pttl(record)
    expected = (item.expires_at + timedelta(hours=1) - now).total_seconds() * 1000
    assert abs(ttl_ms - expected) < 5000
    # A record that vanished drops out of the indexes when listed.
    await ledger.client.delete(record)
    assert await store.list_approvals(pending_only=True, limit=10) == []
    assert await ledger.client.zcard(f"{ledger.namespace}:{{ap}}:pending") == 0
