"""``RedisLedger.write_ahead`` is one Lua script (one command, one round trip). It must leave
Redis exactly as the MULTI of nine commands it replaced did, in every case: a new lease, a
retried write, an id taken in the same run or in another run, a claimed lease written again,
a record left without its id → run pointer. The previous implementation is kept here as the
reference (``_write_ahead_by_multi``, followed, for a lease it wrote, by what the script has
added since: the holder's live count) and both run side by side on the stack's real Redis,
each in its own namespace; their replies and their keys (namespace aside) must be equal.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from broker.adapters.redis_ledger import (
    _LIVE_SET_GRACE_MS,
    RedisLedger,
    _encode_lease,
    _Keys,
    _live_minute,
)
from broker.config import RedisSettings
from broker.core.model import (
    DelegationChain,
    DelegationHop,
    Lease,
    LeaseState,
    Sensitivity,
    TargetKind,
    epoch_micros,
)
from broker.devstack import DevStack
from broker.errors import ConflictError, LedgerUnavailableError

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/planner"
OTHER_AGENT = "spiffe://tasklease.test/agent/other"
VISIBILITY = timedelta(seconds=30)


def _lease(**changes: object) -> Lease:
    lease = Lease(
        credential_id="cred_wa",
        workflow_id="wf-1",
        task_id="task-1",
        target="db-orders",
        kind=TargetKind.DATABASE,
        sensitivity=Sensitivity.INTERNAL,
        holder=AGENT,
        owner="alice@example.com",
        chain=DelegationChain(
            (
                DelegationHop("owner", "alice@example.com", verified=False),
                DelegationHop("agent", AGENT, verified=True),
            )
        ),
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=15),
    )
    return dataclasses.replace(lease, **changes)  # type: ignore[arg-type]


class Redis:
    """Ledgers on the stack's Redis in fresh namespaces, and a client to look at the keys."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self.ledgers: list[RedisLedger] = []

    def ledger(self) -> RedisLedger:
        ledger = RedisLedger(
            settings=RedisSettings(url=self.url), namespace=f"w{uuid.uuid4().hex[:12]}"
        )
        self.ledgers.append(ledger)
        return ledger

    async def dump(self, namespace: str) -> dict[str, object]:
        """Every key of ``namespace`` (renamed ``NS``) with its type and contents."""
        found: dict[str, object] = {}
        async for key in self.client.scan_iter(match=f"{namespace}:*", count=1000):
            kind = await self.client.type(key)
            value: object
            if kind == "hash":
                value = await self.client.hgetall(key)
            elif kind == "set":
                value = sorted(await self.client.smembers(key))
            elif kind == "zset":
                value = await self.client.zrange(key, 0, -1, withscores=True)
            else:
                value = await self.client.get(key)
            found["NS" + key.removeprefix(namespace)] = (kind, value)
        return found

    async def close(self) -> None:
        for ledger in self.ledgers:
            await ledger.close()
            keys = [k async for k in self.client.scan_iter(match=f"{ledger.namespace}:*")]
            if keys:
                await self.client.unlink(*keys)
        await self.client.aclose()


@pytest.fixture
async def redis_db(stack: DevStack) -> AsyncIterator[Redis]:
    assert stack.endpoints is not None
    opened = Redis(stack.endpoints.redis_url)
    try:
        yield opened
    finally:
        await opened.close()


async def _write_ahead_by_multi(client: aioredis.Redis, keys: _Keys, lease: Lease) -> str:
    """The write-ahead before it became a script: a MULTI of nine commands, then, when the
    id was not new, a read of the stored record and (id of another run) taking back the
    record just written. 'ok' or 'exists' (the ledger's ConflictError)."""
    cid, wid = lease.credential_id, lease.workflow_id
    bucket = keys.bucket(cid)
    raw = _encode_lease(lease)
    due, in_flight, claimed = keys.due(bucket)
    async with client.pipeline(transaction=True) as pipe:
        pipe.hsetnx(keys.creds(bucket), cid, wid)
        pipe.hsetnx(keys.leases(wid), cid, raw)
        pipe.sadd(keys.holder(lease.holder), cid)
        pipe.sadd(keys.owner(lease.owner), cid)
        pipe.sadd(keys.target(lease.target), cid)
        pipe.zadd(keys.holders, {lease.holder: 0})
        pipe.zrem(in_flight, cid)
        pipe.hdel(claimed, cid)
        pipe.zadd(due, {cid: epoch_micros(lease.expires_at)}, lt=True)
        results = await pipe.execute()
    if results[0] and results[1]:
        return await _counted_live(client, keys, lease)
    owner = await client.hget(keys.creds(bucket), cid)
    stored = None if owner is None else await client.hget(keys.leases(str(owner)), cid)
    if results[1] and (stored is None or owner != wid):
        await client.hdel(keys.leases(wid), cid)
    return "ok" if stored == raw and owner == wid else "exists"  # a retry: counted already


async def _counted_live(client: aioredis.Redis, keys: _Keys, lease: Lease) -> str:
    """What the script added since it replaced the MULTI, for a lease it wrote: the lease
    counted in its holder's live counts (limits), forgotten a day after its newest expiry."""
    live = keys.live(lease.holder)
    forget_at = epoch_micros(lease.expires_at) // 1000 + _LIVE_SET_GRACE_MS
    async with client.pipeline(transaction=True) as pipe:
        pipe.hincrby(live, str(_live_minute(lease)), 1)
        pipe.pexpireat(live, forget_at, nx=True)
        pipe.pexpireat(live, forget_at, gt=True)
        await pipe.execute()
    return "ok"


async def _outcome(call: Awaitable[object]) -> str:
    try:
        await call
    except ConflictError as exc:
        assert exc.reason == "lease.exists"
        return "exists"
    return "ok"


Step = Callable[[RedisLedger, Callable[[Lease], Awaitable[str]]], Awaitable[list[str]]]


async def _fresh(ledger: RedisLedger, write: Callable[[Lease], Awaitable[str]]) -> list[str]:
    return [await write(_lease())]


async def _retried(ledger: RedisLedger, write: Callable[[Lease], Awaitable[str]]) -> list[str]:
    return [await write(_lease()), await write(_lease())]


async def _taken_in_the_run(
    ledger: RedisLedger, write: Callable[[Lease], Awaitable[str]]
) -> list[str]:
    first = await write(_lease())
    # Another holder, target and an earlier expiry: the due time moves earlier (ZADD LT).
    other = _lease(holder=OTHER_AGENT, target="db-other", expires_at=NOW + timedelta(minutes=5))
    return [first, await write(other), await write(_lease(expires_at=NOW + timedelta(hours=1)))]


async def _taken_in_another_run(
    ledger: RedisLedger, write: Callable[[Lease], Awaitable[str]]
) -> list[str]:
    return [await write(_lease()), await write(_lease(workflow_id="wf-2"))]


async def _claimed_then_written_again(
    ledger: RedisLedger, write: Callable[[Lease], Awaitable[str]]
) -> list[str]:
    first = await write(_lease())
    claimed = await ledger.claim_due(NOW + timedelta(minutes=15), limit=10, visibility=VISIBILITY)
    return [first, *claimed, await write(_lease())]


async def _record_without_its_pointer(
    ledger: RedisLedger, write: Callable[[Lease], Awaitable[str]]
) -> list[str]:
    """A record whose id → run pointer is gone (a discard cut between its two steps)."""
    first = await write(_lease())
    keys = ledger._keys
    async with ledger.client.pipeline(transaction=False) as pipe:
        pipe.hdel(keys.creds(keys.bucket("cred_wa")), "cred_wa")
        await pipe.execute()
    return [first, await write(_lease()), await write(_lease(task_id="task-2"))]


async def _pointer_without_its_record(
    ledger: RedisLedger, write: Callable[[Lease], Awaitable[str]]
) -> list[str]:
    """An id → run pointer whose record is gone: the lease may be written again."""
    first = await write(_lease())
    await ledger.client.hdel(ledger._keys.leases("wf-1"), "cred_wa")
    return [first, await write(_lease(task_id="task-2"))]


@pytest.mark.parametrize(
    "scenario",
    [
        _fresh,
        _retried,
        _taken_in_the_run,
        _taken_in_another_run,
        _claimed_then_written_again,
        _record_without_its_pointer,
        _pointer_without_its_record,
    ],
    ids=lambda scenario: scenario.__name__.strip("_"),
)
async def test_the_write_ahead_script_leaves_what_the_multi_left(
    redis_db: Redis, scenario: Step
) -> None:
    by_script, by_multi = redis_db.ledger(), redis_db.ledger()
    await by_multi._ensure_layout()

    async def script_write(lease: Lease) -> str:
        return await _outcome(by_script.write_ahead(lease))

    async def multi_write(lease: Lease) -> str:
        return await _write_ahead_by_multi(by_multi.client, by_multi._keys, lease)

    replies = await scenario(by_script, script_write)
    expected_replies = await scenario(by_multi, multi_write)

    assert expected_replies == replies
    assert await redis_db.dump(by_multi.namespace) == await redis_db.dump(by_script.namespace)


async def test_an_id_taken_in_another_run_leaves_no_record_in_this_one(redis_db: Redis) -> None:
    ledger = redis_db.ledger()
    await ledger.write_ahead(_lease())
    with pytest.raises(ConflictError):
        await ledger.write_ahead(_lease(workflow_id="wf-2"))
    assert await ledger.client.hgetall(ledger._keys.leases("wf-2")) == {}
    assert _lease() == await ledger.get_lease("cred_wa")


async def test_a_retried_write_ahead_changes_nothing(redis_db: Redis) -> None:
    ledger = redis_db.ledger()
    await ledger.write_ahead(_lease())
    written = await redis_db.dump(ledger.namespace)
    await ledger.write_ahead(_lease())
    assert written == await redis_db.dump(ledger.namespace)


async def test_an_unreadable_record_under_a_taken_id_is_reported_as_corrupt(
    redis_db: Redis,
) -> None:
    ledger = redis_db.ledger()
    await ledger.write_ahead(_lease())
    await ledger.client.hset(ledger._keys.leases("wf-1"), "cred_wa", "{not json")
    with pytest.raises(LedgerUnavailableError) as caught:
        await ledger.write_ahead(_lease())
    assert caught.value.reason == "ledger.corrupt"


async def test_write_ahead_and_activate_reload_scripts_redis_forgot(redis_db: Redis) -> None:
    """After a restart or failover the script cache is empty: the single-command path
    (write_ahead) and the pipelined one (activate with its barrier) both load it again."""
    ledger = redis_db.ledger()
    await ledger.write_ahead(_lease(credential_id="cred_warm"))  # scripts loaded once
    await redis_db.client.script_flush()
    await ledger.write_ahead(_lease())
    assert _lease() == await ledger.get_lease("cred_wa")
    await redis_db.client.script_flush()
    active = await ledger.activate(
        "cred_wa", token_accessor="acc-1", vault_lease_ids=("database/creds/x/1",)
    )
    assert (active.state, active.token_accessor) == (LeaseState.ACTIVE, "acc-1")
