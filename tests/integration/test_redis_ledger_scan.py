"""SCAN may return a member more than once (Redis documents it; it happens when a key shrinks
between two calls of one scan), and ``RedisLedger.iter_leases`` must still yield each lease
once. Here the run's hash, or the target's set, really shrinks on the stack's Redis between
the first and the second SCAN call of an iteration: just before the second call, every lease
but those the first call returned is discarded. The test checks that Redis did return members
again, and that the iteration did not.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.model import DelegationChain, Lease, Sensitivity, TargetKind
from broker.core.ports import LeaseSelector
from broker.devstack import DevStack

pytestmark = pytest.mark.stack

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
# Enough leases for a large hash table (2 048 buckets), and a first SCAN reply small enough
# that keeping only its members shrinks the table (Redis shrinks below 10 % full).
LEASES = 1500
SCAN_COUNT = 50
# Where the first reply stops depends on where the ids hash to (Redis seeds its hash per
# process), and a repeat needs it to stop inside a group of buckets that fold into one (about
# 7 times in 8): try a few sets of ids.
ATTEMPTS = 4


def _lease(credential_id: str, workflow_id: str) -> Lease:
    return Lease(
        credential_id=credential_id,
        workflow_id=workflow_id,
        task_id="task-1",
        target="db-orders",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.INTERNAL,
        holder="spiffe://tasklease.test/agent/planner",
        owner="alice@example.com",
        chain=DelegationChain(()),
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=15),
    )


@pytest.fixture
async def redis_url(stack: DevStack) -> AsyncIterator[str]:
    """The stack's Redis; the namespaces the test used are dropped afterwards."""
    assert stack.endpoints is not None
    url = stack.endpoints.redis_url
    yield url
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        keys = [key async for key in admin.scan_iter(match="s-scan-*", count=1000)]
        for start in range(0, len(keys), 500):
            await admin.unlink(*keys[start : start + 500])
    finally:
        await admin.aclose()


async def _one_attempt(
    url: str, command: str, selector: LeaseSelector, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str]]:
    """(every member the SCAN calls returned, every lease id the iteration yielded)."""
    ledger = RedisLedger(
        settings=RedisSettings(url=url), namespace=f"s-scan-{uuid.uuid4().hex[:8]}"
    )
    try:
        tag = uuid.uuid4().hex[:8]  # other ids, other buckets: each attempt places them anew
        leases = [
            _lease(f"cred_{tag}_{n:04d}", selector.workflow_id or "wf-1") for n in range(LEASES)
        ]
        for start in range(0, LEASES, 250):
            await asyncio.gather(*(ledger.write_ahead(x) for x in leases[start : start + 250]))
        client = ledger.client
        scan = getattr(client, command)
        replies: list[list[str]] = []

        async def shrinking_scan(key: str, cursor: int, **kwargs: Any) -> tuple[int, Any]:
            if len(replies) == 1:
                first = set(replies[0])
                for lease in leases:
                    if lease.credential_id not in first:
                        assert await ledger.discard(lease)
            cursor, members = await scan(key, cursor, **kwargs)
            replies.append([str(member) for member in members])
            return cursor, members

        monkeypatch.setattr(client, command, shrinking_scan)
        yielded = [
            lease.credential_id
            async for found in ledger.iter_leases(selector, batch=20)
            for lease in found
        ]
        return [member for reply in replies for member in reply], yielded
    finally:
        await ledger.close()


@pytest.mark.parametrize(
    ("command", "selector"),
    [
        ("hscan", LeaseSelector(workflow_id="wf-1")),  # the run's hash
        ("sscan", LeaseSelector(target="db-orders")),  # the target's set
    ],
)
async def test_members_a_shrinking_key_returns_again_are_yielded_once(
    redis_url: str, command: str, selector: LeaseSelector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.adapters.redis_ledger._SCAN_BATCH", SCAN_COUNT)
    repeated = False
    for _ in range(ATTEMPTS):
        returned, yielded = await _one_attempt(redis_url, command, selector, monkeypatch)
        assert len(yielded) == len(set(yielded))
        assert sorted(set(returned)) == sorted(yielded)
        repeated = len(returned) > len(set(returned))
        if repeated:
            break
    assert repeated, f"Redis returned no member twice in {ATTEMPTS} shrinking scans"
