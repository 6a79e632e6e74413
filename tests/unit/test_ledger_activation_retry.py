"""The Redis ledger's activation outlasts a short Redis outage (restart, failover): a cut
connection is retried on a fresh one a few times over about a second, then the failure stands.
Control flow only, with the round trip replaced; the restart itself runs on the real stack in
tests/integration/test_issuance_faults.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker.adapters import redis_ledger
from broker.adapters.redis_ledger import ACTIVATION_RETRY_DELAYS, RedisLedger
from broker.config import RedisSettings
from broker.errors import LedgerUnavailableError


class Outage:
    """``_pipeline`` failing ``failures`` times with ``reason``, then answering."""

    def __init__(self, failures: int, reason: str = "ledger.unreachable") -> None:
        self.failures = failures
        self.reason = reason
        self.calls = 0

    async def __call__(self, operation: str, build: Callable[..., object]) -> list[Any]:
        self.calls += 1
        if self.calls <= self.failures:
            raise LedgerUnavailableError("Redis is unreachable (test)", reason=self.reason)
        return ["ok"]


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(redis_ledger, "_pause", sleep)
    return pauses


def _ledger(outage: Outage) -> RedisLedger:
    ledger = RedisLedger(settings=RedisSettings(url="redis://127.0.0.1:1/0"))
    ledger._pipeline = outage  # type: ignore[method-assign,assignment]
    return ledger


async def test_an_activation_waits_out_a_short_outage(slept: list[float]) -> None:
    outage = Outage(failures=3)

    assert await _ledger(outage)._activate_once_more_if_cut(lambda pipe: None) == ["ok"]
    assert outage.calls == 4
    assert slept == list(ACTIVATION_RETRY_DELAYS[:3])


async def test_a_longer_outage_fails_after_about_a_second(slept: list[float]) -> None:
    outage = Outage(failures=100)

    with pytest.raises(LedgerUnavailableError) as caught:
        await _ledger(outage)._activate_once_more_if_cut(lambda pipe: None)
    assert caught.value.reason == "ledger.unreachable"
    assert outage.calls == len(ACTIVATION_RETRY_DELAYS) + 1
    assert 0.5 <= sum(slept) <= 1.5


async def test_a_refusal_is_not_retried(slept: list[float]) -> None:
    outage = Outage(failures=1, reason="ledger.refused")

    with pytest.raises(LedgerUnavailableError):
        await _ledger(outage)._activate_once_more_if_cut(lambda pipe: None)
    assert (outage.calls, slept) == (1, [])
