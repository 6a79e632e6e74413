"""The reconciler's lock on the real Redis: a replica's heartbeat keeps it through a pass
longer than its TTL, a replica killed mid-pass (SIGKILL, so no unlock) holds the others up for
one TTL at most, and ``extend`` keeps only the owner's lock."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis.asyncio as aioredis

from broker.adapters.clock import SystemClock
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.ports import MintedCredential, MintSpec, RevokeOutcome, TaskToken
from broker.devstack import REPO_ROOT, DevStack, ManagedProcess
from broker.reconciler import LOCK_NAME, Reconciler
from tests.conftest import LOG_DIR

pytestmark = pytest.mark.stack

TTL_SECONDS = 2.0


class NothingToReconcile:  # satisfies core.ports.TaskTokenInventory
    """An empty OpenBao listing: these tests are about who runs a pass, not what it revokes
    (tests/integration/test_reconciler.py covers that; other tests' tokens stay alone)."""

    async def task_tokens(self, *, limit: int) -> list[TaskToken]:
        return []


class NoMinter:  # satisfies core.ports.SecretMinter
    async def mint(self, spec: MintSpec) -> MintedCredential:
        raise AssertionError("the reconciler never mints")

    async def revoke(
        self, *, token_accessor: str, vault_lease_ids: tuple[str, ...]
    ) -> RevokeOutcome:
        raise AssertionError("there is nothing to revoke")


@pytest.fixture
async def ledger(stack: DevStack) -> AsyncIterator[RedisLedger]:
    assert stack.endpoints is not None
    ledger = RedisLedger(
        settings=RedisSettings(url=stack.endpoints.redis_url),
        namespace=f"rl{uuid.uuid4().hex[:10]}",
    )
    try:
        yield ledger
    finally:
        await ledger.close()


@pytest.fixture
async def admin(stack: DevStack) -> AsyncIterator[aioredis.Redis]:
    assert stack.endpoints is not None
    client = aioredis.Redis.from_url(stack.endpoints.redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def _lock_key(ledger: RedisLedger) -> str:
    return f"{ledger.namespace}:lock:{LOCK_NAME}"


async def test_a_killed_replicas_lock_is_taken_over_within_one_ttl(
    stack: DevStack, ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    assert stack.endpoints is not None
    replica = ManagedProcess(
        "reconciler-replica",
        [sys.executable, "-m", "tests.integration.reconciler_replica"],
        LOG_DIR / "reconciler-replica" / f"{ledger.namespace}.log",
        env={
            **os.environ,
            "TASKLEASE_REDIS__URL": stack.endpoints.redis_url,
            "TL_NAMESPACE": ledger.namespace,
            "TL_LOCK_TTL_SECONDS": str(TTL_SECONDS),
        },
        cwd=REPO_ROOT,
    )
    survivor = Reconciler(
        inventory=NothingToReconcile(),
        minter=NoMinter(),
        ledger=ledger,
        locks=ledger,
        clock=SystemClock(),
        lock_ttl=timedelta(seconds=TTL_SECONDS),
    )
    replica.start()
    try:
        deadline = time.monotonic() + 30
        while (holder := await admin.get(_lock_key(ledger))) is None:
            assert replica.alive, replica.log_tail()
            assert time.monotonic() < deadline, "the replica took no lock within 30 s"
            await asyncio.sleep(0.05)
        # Alive, its heartbeat keeps the short lock through a pass of three TTLs.
        until = time.monotonic() + 3 * TTL_SECONDS
        while time.monotonic() < until:
            assert (await survivor.reconcile()).ran is False
            assert holder == await admin.get(_lock_key(ledger))
            assert 0 < await admin.pttl(_lock_key(ledger)) <= TTL_SECONDS * 1000
            await asyncio.sleep(0.1)
        assert replica.alive, replica.log_tail()

        popen = replica.popen
        assert popen is not None
        os.killpg(popen.pid, signal.SIGKILL)  # no unlock, no last words
        killed = time.monotonic()
        popen.wait(timeout=10)
        assert (await survivor.reconcile()).ran is False  # the lock outlives its owner ...
        while not (report := await survivor.reconcile()).ran:
            assert time.monotonic() - killed < TTL_SECONDS + 1, "not taken over within a TTL"
            await asyncio.sleep(0.05)
        taken_after = time.monotonic() - killed
        # ... for at most one TTL (a renewal every third of it: at least two thirds are left).
        assert TTL_SECONDS / 2 < taken_after <= TTL_SECONDS + 0.5, taken_after
        assert (report.lock_lost, report.examined) == (False, 0)
        assert await admin.get(_lock_key(ledger)) is None  # the survivor released it
    finally:
        replica.stop()


async def test_extend_keeps_the_owners_lock_past_its_first_ttl(
    ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    assert await ledger.try_lock(LOCK_NAME, "a", ttl=timedelta(milliseconds=500))
    assert await ledger.extend(LOCK_NAME, "a", ttl=timedelta(seconds=5)) is True
    await asyncio.sleep(1)
    assert await ledger.try_lock(LOCK_NAME, "b", ttl=timedelta(seconds=5)) is False
    assert 3000 < await admin.pttl(_lock_key(ledger)) <= 5000


async def test_extend_by_a_non_owner_fails_and_does_not_prolong_the_lock(
    ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    assert await ledger.try_lock(LOCK_NAME, "a", ttl=timedelta(seconds=1))
    assert await ledger.extend(LOCK_NAME, "b", ttl=timedelta(minutes=5)) is False
    assert await admin.get(_lock_key(ledger)) == "a"
    assert 0 < await admin.pttl(_lock_key(ledger)) <= 1000
    await asyncio.sleep(1.2)
    assert await ledger.try_lock(LOCK_NAME, "b", ttl=timedelta(seconds=5)) is True


async def test_a_lapsed_lock_cannot_be_extended_by_its_former_owner(
    ledger: RedisLedger, admin: aioredis.Redis
) -> None:
    assert await ledger.try_lock(LOCK_NAME, "a", ttl=timedelta(milliseconds=300))
    await asyncio.sleep(0.6)
    assert await ledger.extend(LOCK_NAME, "a", ttl=timedelta(seconds=5)) is False
    assert await admin.get(_lock_key(ledger)) is None
    assert await ledger.try_lock(LOCK_NAME, "b", ttl=timedelta(seconds=5)) is True
