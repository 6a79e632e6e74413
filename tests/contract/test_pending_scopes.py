"""The pending re-evaluation records: the same behaviour from the in-memory fake and Redis."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from broker.adapters.memory_reevaluation import InMemoryPendingScopeRecords
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.redis_reevaluation import (
    RedisPendingScopeRecords,
    encode_pending,
    pending_key,
)
from broker.core.ports import PENDING_APPROVAL, PendingScopeRecord, PendingScopeRecords
from broker.errors import LedgerUnavailableError
from tests.contract.conftest import Ledgers

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
# The Redis layout and foreign values: only the real adapter has them.
REDIS_ONLY = pytest.mark.parametrize("ledgers", ["redis"], indirect=True)


def stores(ledgers: Ledgers) -> tuple[PendingScopeRecords, PendingScopeRecords]:
    """A record store and a second handle on the same data (its own connections for Redis)."""
    return ledgers.pair(
        InMemoryPendingScopeRecords,
        lambda ledger: RedisPendingScopeRecords(client=ledger.client, namespace=ledger.namespace),
    )


def record(n: int = 1, *, task: str = "t-1") -> PendingScopeRecord:
    return PendingScopeRecord(
        id=f"pnd_{n:024x}",
        kind=PENDING_APPROVAL,
        key=f"apr_{n:024x}",
        workflow_id="wf-1",
        task_id=task,
        reason=f"approval apr_{n:024x} was withdrawn by bob@example.test",
        noted_at=NOW,
        noted_by="host-1-abcd",
    )


async def test_there_is_nothing_pending_at_first(ledgers: Ledgers) -> None:
    store, _ = stores(ledgers)
    read = await store.read_pending(limit=10)
    assert (read.records, read.unreadable, read.complete) == ((), (), True)


async def test_a_noted_record_is_read_back_by_every_replica(ledgers: Ledgers) -> None:
    store, twin = stores(ledgers)
    await store.note_pending(record(1))
    for handle in (store, twin):
        read = await handle.read_pending(limit=10)
        assert (read.records, read.unreadable, read.complete) == ((record(1),), (), True)


async def test_each_note_is_its_own_and_clearing_one_leaves_the_others(ledgers: Ledgers) -> None:
    store, twin = stores(ledgers)
    first = record(1)
    again = PendingScopeRecord(
        id=f"pnd_{9:024x}",
        kind=first.kind,
        key=first.key,
        workflow_id=first.workflow_id,
        task_id=first.task_id,
        reason=first.reason,
        noted_at=NOW,
        noted_by="host-2-efgh",
    )
    await store.note_pending(first)
    await twin.note_pending(again)
    await store.clear_pending([first.id, "pnd_" + "f" * 24])  # an unknown id is ignored
    read = await twin.read_pending(limit=10)
    assert read.records == (again,)
    await twin.clear_pending([])
    await twin.clear_pending([again.id])
    assert (await store.read_pending(limit=10)).records == ()


async def test_a_read_stops_at_its_limit_and_says_so(ledgers: Ledgers) -> None:
    store, _ = stores(ledgers)
    noted = {record(n, task=f"t-{n}") for n in range(1, 6)}
    for each in noted:
        await store.note_pending(each)
    seen: set[PendingScopeRecord] = set()
    completes = []
    while True:
        read = await store.read_pending(limit=2)
        assert len(read.records) <= 2
        seen |= set(read.records)
        completes.append(read.complete)
        await store.clear_pending([r.id for r in read.records])
        if read.complete:
            break
    assert (seen, completes) == (noted, [False, False, True])


async def test_a_limit_must_be_positive(ledgers: Ledgers) -> None:
    store, _ = stores(ledgers)
    with pytest.raises(ValueError, match="limit"):
        await store.read_pending(limit=0)


@REDIS_ONLY
async def test_redis_holds_one_hash_of_ids_and_text(ledgers: Ledgers) -> None:
    ledger = ledgers.new()
    assert isinstance(ledger, RedisLedger)
    store = RedisPendingScopeRecords(client=ledger.client, namespace=ledger.namespace)
    await store.note_pending(record(1))
    keys = [key async for key in ledger.client.scan_iter(match=f"{ledger.namespace}:*")]
    assert keys == [pending_key(ledger.namespace)]
    stored = await ledger.client.hgetall(pending_key(ledger.namespace))
    assert stored == {
        record(1).id: (
            '{"v":1,"kind":"approval","key":"apr_000000000000000000000001",'
            '"workflow_id":"wf-1","task_id":"t-1",'
            '"reason":"approval apr_000000000000000000000001 was withdrawn by bob@example.test",'
            '"noted_at":"2030-01-01T12:00:00+00:00","noted_by":"host-1-abcd"}'
        )
    }


@REDIS_ONLY
async def test_ledgers_in_other_namespaces_do_not_share_them(ledgers: Ledgers) -> None:
    store, _ = stores(ledgers)
    other, _ = stores(ledgers)
    await store.note_pending(record(1))
    assert (await other.read_pending(limit=10)).records == ()


def _valid() -> dict[str, object]:
    return json.loads(encode_pending(record(2)))  # type: ignore[no-any-return]


@REDIS_ONLY
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pnd_" + "a" * 24, b"not json"),
        ("pnd_" + "a" * 24, b"[]"),
        ("pnd_" + "a" * 24, b"{}"),
        ("pnd_" + "a" * 24, json.dumps(_valid() | {"v": 2}).encode()),  # another version
        ("pnd_" + "a" * 24, json.dumps(_valid() | {"kind": "target"}).encode()),
        ("pnd_" + "a" * 24, json.dumps(_valid() | {"key": "apr-1"}).encode()),
        ("pnd_" + "a" * 24, json.dumps(_valid() | {"task_id": "a b"}).encode()),
        ("pnd_" + "a" * 24, json.dumps(_valid() | {"reason": "x\ny"}).encode()),
        ("pnd_" + "a" * 24, json.dumps(_valid() | {"noted_at": "2030-01-01T12:00"}).encode()),
        ("pnd_" + "a" * 24, b"\xff\xfe not utf-8"),
        ("not-an-id", encode_pending(record(2)).encode()),
        (b"pnd_\xff", encode_pending(record(2)).encode()),  # a field that is not UTF-8
    ],
)
async def test_an_unreadable_entry_is_reported_by_id_and_can_be_cleared(
    ledgers: Ledgers, field: str | bytes, value: bytes
) -> None:
    """Never raised: a corrupt entry must not stop a start-up (the authorizer then decides
    every live lease in its place)."""
    ledger = ledgers.new()
    assert isinstance(ledger, RedisLedger)
    store = RedisPendingScopeRecords(client=ledger.client, namespace=ledger.namespace)
    await store.note_pending(record(1))
    await ledger.client.hset(pending_key(ledger.namespace), field, value)

    read = await store.read_pending(limit=10)
    assert (read.records, len(read.unreadable), read.complete) == ((record(1),), 1, True)
    await store.clear_pending(read.unreadable)
    assert await ledger.client.hlen(pending_key(ledger.namespace)) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "pnd_" + "A" * 24},  # not lowercase hex
        {"id": "pnd_" + "a" * 23},
        {"id": "apr_" + "a" * 24},  # not a pending id
        {"kind": "everything"},  # a kind nothing resumes
        {"key": "apr-1"},  # not an approval id
        {"workflow_id": "wf 1"},
        {"task_id": ""},
        {"reason": ""},
        {"reason": "r" * 501},
        {"reason": "a\nb"},
        {"noted_by": ""},
        {"noted_by": "w" * 201},
        {"noted_at": NOW.replace(tzinfo=None)},
    ],
)
def test_a_record_is_valid_from_construction(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "id": "pnd_" + "a" * 24,
        "kind": PENDING_APPROVAL,
        "key": "apr_" + "b" * 24,
        "workflow_id": "wf-1",
        "task_id": "t-1",
        "reason": "withdrawn",
        "noted_at": NOW,
        "noted_by": "broker",
    }
    with pytest.raises(ValueError):
        PendingScopeRecord(**(fields | changes))  # type: ignore[arg-type]


async def test_an_unreachable_redis_is_a_ledger_error() -> None:
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    store = RedisPendingScopeRecords(client=client, namespace="tlt")
    try:
        for call in (
            store.note_pending(record(1)),
            store.read_pending(limit=10),
            store.clear_pending([record(1).id]),
        ):
            with pytest.raises(LedgerUnavailableError) as failed:
                await call
            assert failed.value.reason == "ledger.unreachable"
    finally:
        await client.aclose()
