"""The contract suites run against every Ledger implementation: the fake and real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from broker.adapters.memory_ledger import InMemoryLedger
from broker.adapters.redis_ledger import RedisLedger
from broker.config import RedisSettings
from broker.core.ports import Ledger

_S = TypeVar("_S")


class Ledgers:
    """Opens ledgers of one kind. ``twin`` is a second handle on the same data: for Redis a
    separate client with its own connections, for the fake the same object."""

    def __init__(self, kind: str, redis_url: str = "") -> None:
        self.kind = kind
        self._redis_url = redis_url
        self.opened: list[RedisLedger] = []

    def new(self) -> Ledger:
        if self.kind == "memory":
            return InMemoryLedger()
        return self._redis(f"c{uuid.uuid4().hex[:12]}")

    def twin(self, ledger: Ledger) -> Ledger:
        if isinstance(ledger, RedisLedger):
            return self._redis(ledger.namespace)
        return ledger

    def _redis(self, namespace: str) -> RedisLedger:
        ledger = RedisLedger(settings=RedisSettings(url=self._redis_url), namespace=namespace)
        self.opened.append(ledger)
        return ledger

    def pair(self, memory: Callable[[], _S], redis: Callable[[RedisLedger], _S]) -> tuple[_S, _S]:
        """A store beside the ledger and a second handle on the same data: ``memory()`` once
        (both handles the same object) for the fake; for Redis ``redis(ledger)`` on a new
        namespace and on its twin (its own connections)."""
        if self.kind == "memory":
            store = memory()
            return store, store
        ledger = self.new()
        assert isinstance(ledger, RedisLedger)
        twin = self.twin(ledger)
        assert isinstance(twin, RedisLedger)
        return redis(ledger), redis(twin)

    async def close(self) -> None:
        for ledger in self.opened:
            await ledger.close()


@pytest.fixture(params=["memory", "redis"])
async def ledgers(request: pytest.FixtureRequest) -> AsyncIterator[Ledgers]:
    """A ledger opener for each implementation; Redis keys are dropped afterwards."""
    if request.param == "memory":
        yield Ledgers("memory")
        return
    stack = request.getfixturevalue("stack")
    url = stack.endpoints.redis_url
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    fsync = str((await admin.config_get("appendfsync"))["appendfsync"])
    await admin.config_set("appendfsync", "always")
    opened = Ledgers("redis", url)
    try:
        yield opened
    finally:
        await opened.close()
        for namespace in {ledger.namespace for ledger in opened.opened}:
            keys = [key async for key in admin.scan_iter(match=f"{namespace}:*", count=1000)]
            for start in range(0, len(keys), 500):
                await admin.unlink(*keys[start : start + 500])
        await admin.config_set("appendfsync", fsync)
        await admin.aclose()
