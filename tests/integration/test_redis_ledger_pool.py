"""The ledger's connection pool (``_WaitingConnectionPool``) behaves as redis-py's
``BlockingConnectionPool`` did — a command waits up to the timeout for a connection when all
are in use, then fails as ``ledger.unreachable`` — while taking a free connection without a
condition variable or a timer. These tests hold every connection to observe the waiting, on
the stack's real Redis; slots must come back after failed connections and bursts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection

from broker.adapters.redis_connection import MAX_CONNECTIONS as _MAX_CONNECTIONS
from broker.adapters.redis_connection import WaitingConnectionPool as _WaitingConnectionPool
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.devstack import DevStack, free_port
from broker.errors import LedgerUnavailableError

TIMEOUT = 0.3


@pytest.fixture
async def redis_url(stack: DevStack) -> str:
    assert stack.endpoints is not None
    return stack.endpoints.redis_url


@pytest.fixture
async def ledger(redis_url: str) -> AsyncIterator[RedisLedger]:
    opened = RedisLedger(
        settings=RedisSettings(url=redis_url, socket_timeout_seconds=TIMEOUT),
        namespace=f"q{uuid.uuid4().hex[:12]}",
    )
    yield opened
    await opened.close()


def _pool(url: str, *, max_connections: int, timeout: float) -> _WaitingConnectionPool:
    return _WaitingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        decode_responses=True,
    )


async def _hold(pool: aioredis.ConnectionPool, count: int) -> list[AbstractConnection]:
    """Take ``count`` connections, each within a second (a leaked slot would make one wait
    for the pool's whole timeout). A connect that times out (the ledger fixture connects
    within its 0.3 s socket timeout, which a loaded machine can miss) gives its slot back and
    is tried again, twice at most."""
    held: list[AbstractConnection] = []
    for _ in range(count):
        for attempt in range(3):
            try:
                held.append(await asyncio.wait_for(pool.get_connection(), 1.0))
                break
            except redis.exceptions.TimeoutError:
                if attempt == 2:
                    raise
    return held


async def test_a_command_waits_for_a_connection_then_fails_as_unreachable(
    ledger: RedisLedger,
) -> None:
    pool = ledger.client.connection_pool
    held = await _hold(pool, _MAX_CONNECTIONS)
    try:
        started = time.monotonic()
        with pytest.raises(LedgerUnavailableError) as caught:
            await ledger.get_run("wf-none")
        waited = time.monotonic() - started
    finally:
        for connection in held:
            await pool.release(connection)
    assert caught.value.reason == "ledger.unreachable"
    assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
    assert str(caught.value.__cause__) == "No connection available."
    assert waited >= TIMEOUT * 0.9  # it waited for the pool, not failed at once
    # Every slot came back: the ledger answers at once again.
    assert await asyncio.wait_for(ledger.get_run("wf-none"), 1.0) is None


async def test_a_waiting_command_takes_the_first_connection_given_back(
    ledger: RedisLedger,
) -> None:
    pool = ledger.client.connection_pool
    held = await _hold(pool, _MAX_CONNECTIONS)
    try:
        waiting = asyncio.create_task(ledger.get_run("wf-none"))
        await asyncio.sleep(TIMEOUT / 3)
        assert not waiting.done()
        await pool.release(held.pop())
        assert await asyncio.wait_for(waiting, TIMEOUT) is None
    finally:
        for connection in held:
            await pool.release(connection)


async def test_a_burst_beyond_the_pool_waits_and_every_slot_comes_back(redis_url: str) -> None:
    pool = _pool(redis_url, max_connections=4, timeout=5.0)
    client = aioredis.Redis.from_pool(pool)
    key = f"q{uuid.uuid4().hex[:12]}:burst"
    try:
        replies = await asyncio.gather(*(client.incr(key) for _ in range(200)))
        assert sorted(replies) == list(range(1, 201))
        held = await _hold(pool, 4)
        for connection in held:
            await pool.release(connection)
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_connection_that_cannot_connect_gives_its_slot_back() -> None:
    """Nothing listens: each attempt fails to connect, and none of them is left waiting for
    a slot that a failed attempt kept."""
    pool = _pool(f"redis://127.0.0.1:{free_port()}/0", max_connections=2, timeout=5.0)
    try:
        for _ in range(5):
            with pytest.raises(redis.exceptions.ConnectionError) as caught:
                await asyncio.wait_for(pool.get_connection(), 1.0)
            assert str(caught.value) != "No connection available."
    finally:
        await pool.aclose()
