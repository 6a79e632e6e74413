"""The re-evaluation marker: the same behaviour from the in-memory fake and from Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from broker.adapters.memory_reevaluation import InMemoryReevaluationMarkers
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.redis_reevaluation import RedisReevaluationMarkers, marker_key
from broker.core.ports import ReevaluationMarker, ReevaluationMarkers
from broker.errors import LedgerUnavailableError
from tests.contract.conftest import Ledgers

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
# The Redis layout and foreign values: only the real adapter has them.
REDIS_ONLY = pytest.mark.parametrize("ledgers", ["redis"], indirect=True)


def markers(ledgers: Ledgers) -> tuple[ReevaluationMarkers, ReevaluationMarkers]:
    """A marker store and a second handle on the same data (its own connections for Redis)."""
    return ledgers.pair(
        InMemoryReevaluationMarkers,
        lambda ledger: RedisReevaluationMarkers(client=ledger.client, namespace=ledger.namespace),
    )


def marker(
    digest: str = "a" * 64, *, writer: str = "host-1-abcd", minutes: int = 0
) -> ReevaluationMarker:
    return ReevaluationMarker(digest=digest, at=NOW + timedelta(minutes=minutes), writer=writer)


async def test_there_is_no_marker_at_first(ledgers: Ledgers) -> None:
    store, _ = markers(ledgers)
    assert await store.last_reevaluated() is None


async def test_a_stored_marker_is_read_back_by_every_replica(ledgers: Ledgers) -> None:
    store, twin = markers(ledgers)
    await store.mark_reevaluated(marker())
    assert await store.last_reevaluated() == marker()
    assert await twin.last_reevaluated() == marker()


async def test_the_last_writer_wins(ledgers: Ledgers) -> None:
    store, twin = markers(ledgers)
    await store.mark_reevaluated(marker("a" * 64, writer="replica-a"))
    await twin.mark_reevaluated(marker("b" * 64, writer="replica-b", minutes=1))
    assert await store.last_reevaluated() == marker("b" * 64, writer="replica-b", minutes=1)


@REDIS_ONLY
async def test_ledgers_in_other_namespaces_do_not_share_it(ledgers: Ledgers) -> None:
    store, _ = markers(ledgers)
    other, _ = markers(ledgers)
    await store.mark_reevaluated(marker())
    assert await other.last_reevaluated() is None


@pytest.mark.parametrize(
    ("digest", "writer", "at"),
    [
        ("A" * 64, "w", NOW),  # not lowercase hex
        ("a" * 63, "w", NOW),  # not a SHA-256
        ("a" * 64, "", NOW),  # no writer
        ("a" * 64, "w\n", NOW),  # not printable
        ("a" * 64, "w" * 201, NOW),  # too long
        ("a" * 64, "w", NOW.replace(tzinfo=None)),  # naive time
    ],
)
def test_a_marker_is_valid_from_construction(digest: str, writer: str, at: datetime) -> None:
    with pytest.raises(ValueError):
        ReevaluationMarker(digest=digest, at=at, writer=writer)


@REDIS_ONLY
async def test_redis_holds_one_small_key_without_secrets(ledgers: Ledgers) -> None:
    ledger = ledgers.new()
    assert isinstance(ledger, RedisLedger)
    store = RedisReevaluationMarkers(client=ledger.client, namespace=ledger.namespace)
    await store.mark_reevaluated(marker())
    keys = [key async for key in ledger.client.scan_iter(match=f"{ledger.namespace}:*")]
    assert keys == [marker_key(ledger.namespace)]
    raw = await ledger.client.get(marker_key(ledger.namespace))
    assert raw == (
        '{"digest":"' + "a" * 64 + '","at":"2030-01-01T12:00:00+00:00","writer":"host-1-abcd"}'
    )


@REDIS_ONLY
@pytest.mark.parametrize(
    "stored",
    ["not json", "[]", '{"digest": "x", "at": "2030-01-01T00:00:00+00:00", "writer": "w"}', "{}"],
)
async def test_an_unreadable_marker_counts_as_none(ledgers: Ledgers, stored: str) -> None:
    """Erring towards a re-evaluation (which then replaces it) is the fail-closed direction."""
    ledger = ledgers.new()
    assert isinstance(ledger, RedisLedger)
    client: aioredis.Redis = ledger.client
    await client.set(marker_key(ledger.namespace), stored)
    store = RedisReevaluationMarkers(client=client, namespace=ledger.namespace)
    assert await store.last_reevaluated() is None
    await store.mark_reevaluated(marker())
    assert await store.last_reevaluated() == marker()


async def test_an_unreachable_redis_is_a_ledger_error() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    store = RedisReevaluationMarkers(client=client, namespace="tlt")
    try:
        for call in (store.last_reevaluated(), store.mark_reevaluated(marker())):
            with pytest.raises(LedgerUnavailableError) as failed:
                await call
            assert failed.value.reason == "ledger.unreachable"
    finally:
        await client.aclose()
