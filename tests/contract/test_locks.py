"""The Locks contract (take, extend, unlock), against InMemoryLedger and RedisLedger on the
real Redis of the local stack. The "other replica" is a second handle on the same data (for
Redis its own connections). Expiry needs a clock, which the fake does not have: the Redis
lock's lapse and takeover are in tests/integration/test_reconciler_lock.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.redis_ledger import RedisLedger
from tests.contract.conftest import Ledgers

TTL = timedelta(seconds=30)
NAME = "reconciler"

Replicas = tuple[InMemoryLedger | RedisLedger, InMemoryLedger | RedisLedger]


@pytest.fixture
def replicas(ledgers: Ledgers) -> Replicas:
    one = ledgers.new()
    other = ledgers.twin(one)
    assert isinstance(one, InMemoryLedger | RedisLedger)
    assert isinstance(other, InMemoryLedger | RedisLedger)
    return one, other


async def test_the_owner_extends_its_lock_and_keeps_it(replicas: Replicas) -> None:
    one, other = replicas
    assert await one.try_lock(NAME, "a", ttl=TTL)
    assert await one.extend(NAME, "a", ttl=TTL) is True
    assert await other.try_lock(NAME, "b", ttl=TTL) is False


async def test_extend_by_another_owner_fails_and_leaves_the_lock_alone(
    replicas: Replicas,
) -> None:
    one, other = replicas
    assert await one.try_lock(NAME, "a", ttl=TTL)
    assert await other.extend(NAME, "b", ttl=TTL) is False
    assert await other.try_lock(NAME, "b", ttl=TTL) is False
    assert await one.extend(NAME, "a", ttl=TTL) is True


async def test_extend_does_not_take_a_lock_nobody_holds(replicas: Replicas) -> None:
    one, other = replicas
    assert await one.extend(NAME, "a", ttl=TTL) is False
    assert await other.try_lock(NAME, "b", ttl=TTL) is True


async def test_after_unlock_the_former_owner_cannot_extend(replicas: Replicas) -> None:
    one, other = replicas
    assert await one.try_lock(NAME, "a", ttl=TTL)
    await one.unlock(NAME, "a")
    assert await one.extend(NAME, "a", ttl=TTL) is False
    assert await other.try_lock(NAME, "b", ttl=TTL) is True


async def test_unlock_by_another_owner_leaves_the_lock_alone(replicas: Replicas) -> None:
    one, other = replicas
    assert await one.try_lock(NAME, "a", ttl=TTL)
    await other.unlock(NAME, "b")
    assert await other.try_lock(NAME, "b", ttl=TTL) is False
    assert await one.extend(NAME, "a", ttl=TTL) is True


async def test_locks_of_different_names_are_independent(replicas: Replicas) -> None:
    one, other = replicas
    assert await one.try_lock(NAME, "a", ttl=TTL)
    assert await other.try_lock("another", "b", ttl=TTL) is True
    assert await other.extend(NAME, "b", ttl=TTL) is False
    assert await one.extend("another", "a", ttl=TTL) is False
