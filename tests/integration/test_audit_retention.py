"""``audit.redis.retention_days`` on the stack's Redis: a group commit trims the main stream's
entries older than the retention (``XADD … MINID ~``), together with ``maxlen`` when both are
set, a run's copy expires no later than the retention, start-up says what is kept, and
``tasklease audit verify`` tells a trimmed head from tampering.

Determinism. ``MINID ~`` (like ``MAXLEN ~``) only drops whole radix-tree nodes of the stream,
and a node holds up to ``stream-node-max-entries`` (100) entries: a handful of old entries
followed by new ones would share one node, and nothing would be trimmed. The fixture sets
``stream-node-max-entries`` to 1 on the stack's Redis for the test (and restores it after), so
every entry is its own node and approximate trimming removes exactly the entries past the
bound, on the first group commit after they aged out. (In production a node is a few minutes
of group commits; a few entries past the bound may stay until their node is all old.)
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
import structlog.testing
from typer.testing import CliRunner

from broker.adapters.audit_redis import RedisAuditReader, RedisStreamAuditSink
from broker.adapters.audit_sinks import SealedRecord
from broker.adapters.clock import SystemClock
from broker.adapters.redis_ledger import RedisLedger
from broker.bootstrap import _audit_trail
from broker.cli import app as cli
from broker.cli_audit import EXIT_TAMPERED
from broker.config import AuditSettings, RedisSettings
from broker.core.audit import AgentToolCall, AuditEvent
from broker.core.audit_chain import ChainHead, seal_line, verify_records
from broker.devstack import DevStack

pytestmark = pytest.mark.stack

DAY = timedelta(days=1)
WRITER = "w-retention"


class Stream:
    """A fresh audit stream of a unique name on the stack's Redis, and one writer's chain."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.key = f"tlt:audit:ret{secrets.token_hex(5)}"
        self.run = f"wf-ret-{secrets.token_hex(3)}"
        self.head = ChainHead.start(WRITER)

    def sealed(self, when: datetime) -> SealedRecord:
        """The writer's next record: a tool call of the run, at ``when``."""
        seq = self.head.seq
        event = AuditEvent(
            event_id=f"evt_{seq}",
            time=when,
            actor="spiffe://td/agent/a",
            payload=AgentToolCall(tool="psql", summary=f"query {seq}"),
            workflow_id=self.run,
        )
        record, line, self.head = seal_line(event.as_dict(), self.head)
        return SealedRecord(record=record, line=line)

    async def old_entries(self, count: int, *, age: timedelta) -> str:
        """``count`` group commits of one record each, XADDed with explicit ids ``age`` ago
        (as a broker would have written them then); the last id."""
        start = datetime.now(UTC) - age
        ms = int(start.timestamp() * 1000)
        entry_id = ""
        for index in range(count):
            sealed = self.sealed(start + timedelta(milliseconds=index))
            entry_id = str(
                await self.client.xadd(self.key, {"r0": sealed.line}, id=f"{ms + index}-0")
            )
        return entry_id

    def sink(self, *, retention: timedelta | None = None, maxlen: int = 0) -> RedisStreamAuditSink:
        return RedisStreamAuditSink(
            client=self.client, stream=self.key, retention=retention, maxlen=maxlen
        )

    async def ids(self) -> list[str]:
        return [str(entry_id) for entry_id, _ in await self.client.xrange(self.key) or []]

    async def seqs(self) -> list[int]:
        reader = RedisAuditReader(client=self.client, stream=self.key)
        return [record["seq"] async for _, record in reader.every_record()]  # type: ignore[index]


@pytest.fixture
async def stream(stack: DevStack) -> AsyncIterator[Stream]:
    assert stack.endpoints is not None
    client = aioredis.Redis.from_url(stack.endpoints.redis_url, decode_responses=True)
    node_entries = str(
        (await client.config_get("stream-node-max-entries"))["stream-node-max-entries"]
    )
    await client.config_set("stream-node-max-entries", 1)  # see the module's docstring
    opened = Stream(client)
    try:
        yield opened
    finally:
        await client.config_set("stream-node-max-entries", node_entries)
        keys = [k async for k in client.scan_iter(match=f"{opened.key}*", count=1000)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


async def _cli(*args: str) -> tuple[int, str]:
    """``tasklease audit …`` in a thread (the command runs its own event loop)."""
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["audit", *args])
    return result.exit_code, result.output


async def test_a_group_commit_trims_entries_past_the_retention_and_verify_says_why(
    stream: Stream, broker_env: dict[str, str]
) -> None:
    """Twenty group commits of three days ago, then three new ones with a retention of one
    day: the old entries are gone, the new ones are there, the run's copy expires within the
    retention, and ``verify`` reports the head the trimming took (naming the flag) unless
    ``--allow-trimmed-head``."""
    last_old = await stream.old_entries(20, age=3 * DAY)
    assert len(await stream.ids()) == 20
    sink = stream.sink(retention=DAY)  # index_ttl stays at its default, 90 days
    await sink.probe()  # Redis 7.0 knows MINID
    now = datetime.now(UTC)
    for batch in range(3):
        await sink.write([stream.sealed(now), stream.sealed(now)])
        if batch == 0:  # the first group commit already trimmed every entry past the bound
            assert len(await stream.ids()) == 1
    ids = await stream.ids()
    assert len(ids) == 3
    assert all(entry_id > last_old for entry_id in ids)  # same width: a string compare works
    cut = int((now - DAY).timestamp() * 1000)
    assert await stream.client.xrange(stream.key, max=str(cut)) == []
    assert await stream.seqs() == list(range(20, 26))
    # The run's copy holds the new records and expires within the retention, not 90 days.
    run_ttl = await stream.client.ttl(sink.run_key(stream.run))
    assert 0 < run_ttl <= DAY.total_seconds()
    # The chain's head (seq 0..19) is gone, and only from the head: Redis says so.
    head = await RedisAuditReader(client=stream.client, stream=stream.key).head()
    assert (head.length, head.entries_added, head.removed, head.trimmed) == (3, 23, 20, True)
    # verify: a missing head, explained, exit 4; with --allow-trimmed-head every chain verifies.
    code, output = await _cli("verify", "--stream", stream.key)
    assert code == EXIT_TAMPERED, output
    assert f"HEAD_MISSING at {ids[0]}.0: writer {WRITER} seq 20" in output
    assert (
        f"{stream.key} looks trimmed: its 20 oldest entries (of 23 ever added) are gone" in output
    )
    assert "verify with --allow-trimmed-head" in output
    code, output = await _cli("verify", "--stream", stream.key, "--json")
    report = json.loads(output)
    assert [f["kind"] for f in report["findings"]] == ["head_missing"]
    assert "--allow-trimmed-head" in report["findings"][0]["detail"]
    code, output = await _cli("verify", "--stream", stream.key, "--allow-trimmed-head")
    assert code == 0, output
    assert output.splitlines()[-1] == "OK: every chain verifies"
    assert f"{WRITER}: 6 records, seq 20..25" in output


async def test_maxlen_and_retention_both_apply(stream: Stream) -> None:
    """Redis takes one trimming strategy per XADD: with both set, the XADD trims by MINID and
    an XTRIM by MAXLEN follows in the same pipeline. Old entries go by age, and the stream
    never holds more than ``maxlen`` entries."""
    await stream.old_entries(5, age=3 * DAY)
    sink = stream.sink(retention=DAY, maxlen=3)
    now = datetime.now(UTC)
    await sink.write([stream.sealed(now)])
    assert await stream.seqs() == [5]  # MINID took the five old ones; MAXLEN had nothing to do
    for _ in range(5):
        await sink.write([stream.sealed(now)])
    assert await stream.seqs() == [8, 9, 10]  # MAXLEN ~ 3, exact with one entry per node
    records = [
        r async for _, r in RedisAuditReader(client=stream.client, stream=stream.key).every_record()
    ]
    assert verify_records(records, allow_trimmed_head=True).ok


async def test_without_a_retention_nothing_is_trimmed(stream: Stream) -> None:
    """Today's default: old entries stay, and the run's copy lives ``index_ttl_days``."""
    await stream.old_entries(5, age=30 * DAY)
    sink = stream.sink()
    await sink.write([stream.sealed(datetime.now(UTC))])
    assert await stream.seqs() == list(range(6))
    assert await stream.client.ttl(sink.run_key(stream.run)) > 89 * DAY.total_seconds()
    head = await RedisAuditReader(client=stream.client, stream=stream.key).head()
    assert (head.removed, head.trimmed) == (0, False)


async def test_a_head_deleted_along_with_the_middle_is_not_taken_for_trimming(
    stream: Stream, broker_env: dict[str, str]
) -> None:
    """XDEL of the first entry and of one inside the stream is not trimming: ``head`` says so,
    and verify reports the missing head and the deletion without suggesting
    ``--allow-trimmed-head``."""
    await stream.old_entries(4, age=DAY / 2)
    ids = await stream.ids()
    await stream.client.xdel(stream.key, ids[0], ids[2])
    head = await RedisAuditReader(client=stream.client, stream=stream.key).head()
    assert (head.removed, head.head_only, head.trimmed) == (2, False, False)
    code, output = await _cli("verify", "--stream", stream.key)
    assert code == EXIT_TAMPERED
    assert f"HEAD_MISSING at {ids[1]}.0: writer {WRITER} seq 1" in output
    assert f"DELETED at {ids[3]}.0: writer {WRITER} seq 2" in output
    assert "--allow-trimmed-head" not in output


async def test_start_up_logs_the_retention_in_force(stack: DevStack) -> None:
    """``audit.redis.configured`` says what the main stream keeps and when runs expire."""
    assert stack.endpoints is not None
    ledger = RedisLedger(settings=RedisSettings(url=stack.endpoints.redis_url))
    stream_key = f"tlt:audit:ret{secrets.token_hex(5)}"
    config = AuditSettings.model_validate(
        {
            "stdout": {"enabled": False},
            "redis": {"stream": stream_key, "retention_days": 30, "maxlen": 100_000},
        }
    )
    try:
        with structlog.testing.capture_logs() as logs:
            trail, _ = await _audit_trail(config, ledger, SystemClock())
            await trail.close()
    finally:
        await ledger.close()
    [configured] = [line for line in logs if line["event"] == "audit.redis.configured"]
    assert configured["stream"] == stream_key
    assert (configured["retention_days"], configured["maxlen"], configured["run_ttl_days"]) == (
        30,
        100_000,
        30,
    )
    assert configured["keeps"] == "30 days (MINID ~) and 100000 entries (MAXLEN ~)"
