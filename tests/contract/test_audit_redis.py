"""The Redis audit stream on a real Redis: the sink's writes, the reader's queries and pages,
verification from the stream, failures as AuditUnavailableError, readiness."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker.adapters.audit_redis import RedisAuditReader, RedisStreamAuditSink
from broker.adapters.audit_trail import ChainingAuditTrail
from broker.core.audit import (
    AgentToolCall,
    AuditEvent,
    AuditQuery,
    CredentialIssued,
    EventType,
    Payload,
    RevocationForced,
    WorkflowStarted,
)
from broker.core.audit_chain import verify_records
from broker.devstack import DevStack
from broker.errors import AuditUnavailableError, BadRequestError
from tests.audit_dump import dump_audit_streams
from tests.secret_scan import scan_paths

pytestmark = pytest.mark.stack

NOW = datetime.now(UTC).replace(microsecond=0)
AGENT = "spiffe://td/agent/a"
ORCH = "spiffe://td/orchestrator/o"


class Streams:
    def __init__(self, client: aioredis.Redis, url: str) -> None:
        self.client = client
        self.url = url
        self.key = f"tlt:audit:{uuid.uuid4().hex[:10]}"

    def sink(self, **kwargs: Any) -> RedisStreamAuditSink:
        return RedisStreamAuditSink(client=self.client, stream=self.key, **kwargs)

    def reader(self, **kwargs: Any) -> RedisAuditReader:
        return RedisAuditReader(client=self.client, stream=self.key, **kwargs)


@pytest.fixture
async def streams(stack: DevStack) -> AsyncIterator[Streams]:
    assert stack.endpoints is not None
    client = aioredis.Redis.from_url(stack.endpoints.redis_url, decode_responses=True)
    opened = Streams(client, stack.endpoints.redis_url)
    try:
        yield opened
    finally:
        keys = [k async for k in client.scan_iter(match=f"{opened.key}*", count=1000)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


def event(second: int, payload: Payload, actor: str = AGENT, **ids: Any) -> AuditEvent:
    return AuditEvent(
        event_id=f"evt_{second}",
        time=NOW + timedelta(seconds=second),
        actor=actor,
        payload=payload,
        **ids,
    )


STORY = [
    event(
        0,
        WorkflowStarted(owner="alice", purpose="p", deadline=NOW + timedelta(hours=1)),
        actor=ORCH,
        workflow_id="wf-a",
    ),
    event(
        1,
        CredentialIssued(target="demo-db", kind="database", expires_at=NOW, ttl_seconds=60),
        workflow_id="wf-a",
        task_id="t1",
        credential_id="cred_a1",
    ),
    event(2, AgentToolCall(tool="psql"), workflow_id="wf-a", credential_id="cred_a1"),
    event(
        3,
        WorkflowStarted(owner="bob", purpose="p", deadline=NOW + timedelta(hours=1)),
        actor=ORCH,
        workflow_id="wf-b",
    ),
    event(4, AgentToolCall(tool="curl"), workflow_id="wf-b"),
    event(5, AgentToolCall(tool="psql"), workflow_id="wf-a", credential_id="cred_a1"),
    event(
        6,
        RevocationForced(
            selector={"holder": AGENT},
            reason="INC",
            credential_ids=("cred_a1",),
            workflow_ids=("wf-a", "wf-b"),
        ),
        actor="spiffe://td/admin/x",
    ),
]


async def written(streams: Streams, **sink_args: Any) -> ChainingAuditTrail:
    trail = ChainingAuditTrail(sinks=[streams.sink(**sink_args)], writer_id="w-redis")
    await trail.record_all(STORY[:3])
    await trail.record_all(STORY[3:])
    await trail.close()
    return trail


def ids(page: Any) -> list[str]:
    return [r["event_id"] for r in page.records]


async def test_every_record_is_in_the_stream_and_verifies(streams: Streams) -> None:
    await written(streams)
    entries = [entry async for entry in streams.reader().every_record()]
    assert [r["event_id"] for _, r in entries] == [f"evt_{i}" for i in range(7)]  # type: ignore[index]
    assert verify_records(r for _, r in entries).ok


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (AuditQuery(workflow_id="wf-a"), ["evt_0", "evt_1", "evt_2", "evt_5", "evt_6"]),
        (AuditQuery(workflow_id="wf-b"), ["evt_3", "evt_4", "evt_6"]),
        (AuditQuery(credential_id="cred_a1"), ["evt_1", "evt_2", "evt_5", "evt_6"]),
        (AuditQuery(actor=ORCH), ["evt_0", "evt_3"]),
        (AuditQuery(types=frozenset({EventType.AGENT_TOOL_CALL})), ["evt_2", "evt_4", "evt_5"]),
        (
            AuditQuery(since=NOW + timedelta(seconds=2), until=NOW + timedelta(seconds=5)),
            ["evt_2", "evt_3", "evt_4"],
        ),
        (AuditQuery(workflow_id="wf-a", actor=AGENT), ["evt_1", "evt_2", "evt_5"]),
        (AuditQuery(credential_id="cred_unknown"), []),
        (AuditQuery(workflow_id="wf-none"), []),
    ],
)
async def test_queries(streams: Streams, query: AuditQuery, expected: list[str]) -> None:
    await written(streams)
    page = await streams.reader().query(query)
    assert (ids(page), page.next_cursor) == (expected, None)


async def test_pages_follow_the_cursor(streams: Streams) -> None:
    await written(streams)
    reader = streams.reader()
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await reader.query(AuditQuery(limit=3, cursor=cursor))
        seen += ids(page)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert (seen, pages) == ([f"evt_{i}" for i in range(7)], 3)


async def test_a_bounded_scan_stops_with_a_cursor_to_go_on(streams: Streams) -> None:
    await written(streams)
    reader = streams.reader(scan_budget=2)
    query = AuditQuery(actor="spiffe://td/admin/x")
    first = await reader.query(query)
    assert (ids(first), first.scanned) == ([], 2)
    assert first.next_cursor is not None
    found: list[str] = []
    cursor: str | None = first.next_cursor
    while cursor is not None:
        page = await reader.query(AuditQuery(actor="spiffe://td/admin/x", cursor=cursor))
        found += ids(page)
        cursor = page.next_cursor
    assert found == ["evt_6"]


async def test_a_page_may_end_inside_a_group_commit(streams: Streams) -> None:
    await written(streams)
    reader = streams.reader()
    first = await reader.query(AuditQuery(limit=2))
    assert (ids(first), first.next_cursor is not None) == (["evt_0", "evt_1"], True)
    assert str(first.next_cursor).endswith(".2")
    second = await reader.query(AuditQuery(limit=2, cursor=first.next_cursor))
    assert ids(second) == ["evt_2", "evt_3"]
    assert str(second.next_cursor).endswith(".1")  # evt_3 opened the second group commit
    third = await reader.query(AuditQuery(limit=10, cursor=second.next_cursor))
    assert (ids(third), third.next_cursor) == (["evt_4", "evt_5", "evt_6"], None)


@pytest.mark.parametrize("cursor", ["abc", "1-2-3", "(1-0", "9" * 30, "1-0.x"])
async def test_a_forged_cursor_is_a_bad_request(streams: Streams, cursor: str) -> None:
    with pytest.raises(BadRequestError) as bad:
        await streams.reader().query(AuditQuery(cursor=cursor))
    assert bad.value.reason == "audit.bad_cursor"


async def test_the_tail_is_the_newest_oldest_first(streams: Streams) -> None:
    await written(streams)
    tail = await streams.reader().tail(2)
    assert [r["event_id"] for _, r in tail] == ["evt_5", "evt_6"]  # type: ignore[index]


async def test_a_trimmed_stream_verifies_only_as_trimmed(streams: Streams) -> None:
    trail = ChainingAuditTrail(sinks=[streams.sink(maxlen=1)], writer_id="w-trim")
    for index in range(300):  # MAXLEN ~ trims whole radix-tree nodes (100 entries by default)
        await trail.record(event(index, AgentToolCall(tool="t"), workflow_id="wf-t"))
    await trail.close()
    records = [r async for _, r in streams.reader().every_record()]
    assert 0 < len(records) < 300
    report = verify_records(records)
    assert [f.kind.value for f in report.findings] == ["head_missing"]
    assert verify_records(records, allow_trimmed_head=True).ok


async def test_a_stream_key_of_another_type_fails_writes_and_readiness(streams: Streams) -> None:
    await streams.client.set(streams.key, "not a stream")
    sink = streams.sink()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-broken")
    with pytest.raises(AuditUnavailableError) as failed:
        await trail.record(STORY[0])
    assert failed.value.reason == "audit.redis_failed"
    assert "WRONGTYPE" in failed.value.detail
    with pytest.raises(AuditUnavailableError, match="holds a string"):
        await sink.probe()
    check = await trail.check(NOW)
    assert not check.ok
    await streams.client.delete(streams.key)
    assert (await trail.check(NOW)).detail.startswith("redis: last write failed")
    await trail.record(STORY[0])
    await trail.close()
    records = [r async for _, r in streams.reader().every_record()]
    assert [(r["writer"], r["seq"]) for r in records] == [("w-broken.1", 0)]  # type: ignore[index]


async def test_an_unreachable_redis_is_audit_unavailable() -> None:
    # No retries: redis-py's default (10, jittered backoff up to 1 s) can outlast the trail's
    # record timeout on a loaded machine, which then answers audit.timeout instead.
    client = aioredis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    sink = RedisStreamAuditSink(client=client, stream="tlt:audit:none")
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-down")
    with pytest.raises(AuditUnavailableError) as failed:
        await trail.record(STORY[0])
    assert failed.value.reason == "audit.redis_failed"
    with pytest.raises(AuditUnavailableError):
        await sink.probe()
    await trail.close()
    await client.aclose()


async def test_one_entry_per_group_commit_and_run_streams_expire(streams: Streams) -> None:
    await written(streams, index_ttl=timedelta(days=2))
    assert await streams.client.xlen(streams.key) == 2  # two record_all calls
    assert await streams.client.xlen(f"{streams.key}:run:wf-a") == 2
    assert await streams.client.xlen(f"{streams.key}:run:wf-b") == 1  # only the second
    assert 0 < await streams.client.ttl(f"{streams.key}:run:wf-a") <= 2 * 86400
    assert await streams.client.ttl(streams.key) == -1  # the main stream is kept


async def test_the_session_scan_reads_the_audit_streams(streams: Streams, tmp_path: Path) -> None:
    """SECURITY 38: what the suite left in Redis audit streams is copied out and scanned (a
    planted token is found; the stream is deleted before the session's own scan)."""
    await written(streams)
    planted = '{"payload": {"summary": "hvs.CAESIJ1234567890abcdefghijklmnop"}}'
    await streams.client.xadd(f"{streams.key}:run:wf-planted", {"r0": "{}", "r1": planted})
    files = dump_audit_streams(streams.url, tmp_path)
    mine = [f for f in files if f.name.startswith(streams.key.replace(":", "_"))]
    assert len(mine) == 4  # the main stream and three run streams
    findings = scan_paths(mine)
    assert [(f.path.name, f.kind) for f in findings] == [
        (f"{streams.key.replace(':', '_')}_run_wf-planted.jsonl", "vault token")
    ]
