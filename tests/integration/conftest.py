"""Fixtures for the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.adapters.redis_ledger import RedisLedger
from broker.bootstrap import RunningBroker, start_broker
from broker.config import load_settings
from tests.integration.clients import StartBroker


@pytest.fixture
async def start(
    broker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartBroker]:
    """Start brokers with extra settings (environment); all stopped at the end of the test."""
    started: list[RunningBroker] = []

    async def starter(**env: str) -> RunningBroker:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        broker = await start_broker(load_settings())
        started.append(broker)
        return broker

    yield starter
    for broker in started:
        await broker.stop()


@pytest.fixture
async def ledgers() -> AsyncIterator[list[RedisLedger]]:
    """Redis ledgers a test opens (append them); all closed at the end of the test."""
    opened: list[RedisLedger] = []
    yield opened
    for ledger in opened:
        await ledger.close()
