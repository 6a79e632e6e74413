"""The chain writer and the file and stdout sinks: group commit, fsync policy, durable failures
fail closed, non-durable ones do not, chains restart after a failure, secrets are redacted."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker.adapters.audit_sinks import (
    JsonlFileAuditSink,
    SealedRecord,
    StructlogAuditSink,
    read_jsonl_records,
    records_from_lines,
)
from broker.adapters.audit_trail import AuditReadiness, ChainingAuditTrail
from broker.core.audit import REQUEST_ID, AgentToolCall, AuditEvent
from broker.core.audit_chain import FindingKind, verify_records
from broker.errors import AuditUnavailableError

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def tool_call(index: int, summary: str = "") -> AuditEvent:
    return AuditEvent(
        event_id=f"evt_{index}",
        time=NOW,
        actor="spiffe://td/agent/a",
        payload=AgentToolCall(tool="psql", summary=summary or f"call {index}"),
        workflow_id="wf-1",
    )


class ListSink:
    """A sink that keeps what it got; can fail, or wait on a gate, on demand."""

    def __init__(self, name: str = "list", *, durable: bool = True) -> None:
        self.name = name
        self.durable = durable
        self.batches: list[list[dict[str, Any]]] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def write(self, records: Sequence[SealedRecord]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise AuditUnavailableError("list sink failing", reason="audit.list_failed")
        self.batches.append([dict(r.record) for r in records])

    async def probe(self) -> str:
        if self.fail:
            raise AuditUnavailableError("list sink failing", reason="audit.list_failed")
        return "list"

    async def close(self) -> None:
        pass

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for batch in self.batches for r in batch]


async def test_records_are_chained_in_order_and_verify() -> None:
    sink = ListSink()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1")
    for index in range(5):
        await trail.record(tool_call(index))
    await trail.close()
    assert [r["event_id"] for r in sink.records] == [f"evt_{i}" for i in range(5)]
    assert [r["seq"] for r in sink.records] == [0, 1, 2, 3, 4]
    assert verify_records(sink.records).ok


async def test_concurrent_records_share_group_commits() -> None:
    sink = ListSink()
    sink.gate = asyncio.Event()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1", batch_max=64)
    first = asyncio.create_task(trail.record(tool_call(0)))
    await asyncio.sleep(0.01)  # the writer holds the first batch at the gate
    rest = [asyncio.create_task(trail.record(tool_call(i))) for i in range(1, 41)]
    await asyncio.sleep(0.01)
    sink.gate.set()
    await asyncio.gather(first, *rest)
    await trail.close()
    assert [len(batch) for batch in sink.batches] == [1, 40]
    assert verify_records(sink.records).ok


async def test_record_all_keeps_events_together_and_in_order() -> None:
    sink = ListSink()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1")
    await trail.record_all([tool_call(1), tool_call(2)])
    await trail.record_all([])
    await trail.close()
    assert [[r["event_id"] for r in b] for b in sink.batches] == [["evt_1", "evt_2"]]


async def test_a_failing_durable_sink_fails_the_record_and_restarts_the_chain() -> None:
    durable, other = ListSink("durable"), ListSink("other", durable=False)
    trail = ChainingAuditTrail(sinks=[durable, other], writer_id="w-1")
    await trail.record(tool_call(0))
    durable.fail = True
    with pytest.raises(AuditUnavailableError) as failed:
        await trail.record(tool_call(1))
    assert failed.value.reason == "audit.durable_failed"
    assert trail.writer == "w-1.1"
    check = await AuditReadiness(trail).check(NOW)
    assert (check.ok, check.name) == (False, "audit")
    assert "durable: list sink failing" in check.detail
    durable.fail = False
    await trail.record(tool_call(2))
    await trail.close()
    # The sink that missed a batch holds a chain that ends, then a new one: both verify.
    assert [(r["writer"], r["seq"]) for r in durable.records] == [("w-1", 0), ("w-1.1", 0)]
    assert [(r["writer"], r["seq"]) for r in other.records] == [
        ("w-1", 0),
        ("w-1", 1),
        ("w-1.1", 0),
    ]
    assert verify_records(durable.records).ok
    assert verify_records(other.records).ok


async def test_a_failing_non_durable_sink_fails_nobody_and_raises_an_alarm() -> None:
    durable, flaky = ListSink("durable"), ListSink("flaky", durable=False)
    trail = ChainingAuditTrail(sinks=[durable, flaky], writer_id="w-1")
    flaky.fail = True
    await trail.record(tool_call(0))
    check = await trail.check(NOW)
    assert (check.ok, check.alarm) == (True, True)
    assert check.detail.startswith("flaky: ")
    await trail.close()
    assert trail.metrics.failures.labels(sink="flaky", durable="False")._value.get() == 1


async def test_a_sink_that_does_not_answer_fails_the_record_in_time() -> None:
    sink = ListSink()
    sink.gate = asyncio.Event()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1", record_timeout_seconds=0.05)
    with pytest.raises(AuditUnavailableError) as failed:
        await trail.record(tool_call(0))
    assert failed.value.reason == "audit.timeout"
    sink.gate.set()
    await trail.close()


async def test_a_full_queue_refuses_at_once() -> None:
    sink = ListSink()
    sink.gate = asyncio.Event()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1", queue_size=2, batch_max=1)
    waiting = [asyncio.create_task(trail.record(tool_call(0)))]
    await asyncio.sleep(0.01)  # taken by the writer, which waits at the gate
    waiting += [asyncio.create_task(trail.record(tool_call(i))) for i in (1, 2)]
    await asyncio.sleep(0.01)  # two queued: the queue is full
    with pytest.raises(AuditUnavailableError) as refused:
        await trail.record(tool_call(9))
    assert refused.value.reason == "audit.queue_full"
    sink.gate.set()
    await asyncio.gather(*waiting)
    await trail.close()
    with pytest.raises(AuditUnavailableError, match="closed"):
        await trail.record(tool_call(10))


async def test_secret_shaped_text_is_redacted_before_chaining() -> None:
    sink = ListSink()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1")
    await trail.record(tool_call(0, summary="login with hvs.CAESIJ1234567890abcdefghijklmnop"))
    await trail.close()
    (record,) = sink.records
    assert record["payload"]["summary"] == "login with [redacted vault token]"
    assert verify_records(sink.records).ok
    assert trail.metrics.redacted._value.get() == 1


class ContextSink(ListSink):
    """Notes the context the writer task runs in."""

    def __init__(self) -> None:
        super().__init__("context")
        self.seen: list[tuple[dict[str, Any], str]] = []

    async def write(self, records: Sequence[SealedRecord]) -> None:
        self.seen.append((structlog.contextvars.get_contextvars(), REQUEST_ID.get()))
        await super().write(records)


async def test_the_writer_does_not_inherit_the_first_callers_context() -> None:
    """The writer task is started by whichever request records first; what it does and logs
    must not carry that request's bound log fields or request id."""
    sink = ContextSink()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1")
    token = REQUEST_ID.set("req-1")
    structlog.contextvars.bind_contextvars(principal="spiffe://td/first/caller")
    try:
        await trail.record(tool_call(0))
        await trail.close()
    finally:
        structlog.contextvars.unbind_contextvars("principal")
        REQUEST_ID.reset(token)
    assert sink.seen == [({}, "")]


async def test_the_stdout_sink_writes_whatever_the_log_level(tmp_path: Path) -> None:
    out = tmp_path / "stdout.jsonl"
    saved = structlog.get_config()
    with out.open("w") as handle:
        structlog.configure(
            processors=[structlog.processors.JSONRenderer(sort_keys=True)],
            wrapper_class=structlog.make_filtering_bound_logger(40),  # error and above only
            logger_factory=structlog.WriteLoggerFactory(file=handle),
            cache_logger_on_first_use=False,
        )
        try:
            trail = ChainingAuditTrail(sinks=[StructlogAuditSink()], writer_id="w-1")
            await trail.record(tool_call(0))
            await trail.close()
        finally:
            structlog.configure(**saved)

    records = read_jsonl_records(out)
    assert [r["event_id"] for r in records if isinstance(r, dict)] == ["evt_0"]
    assert verify_records(records).ok


# --------------------------------------------------------------------------- the file sink


@pytest.mark.parametrize(("policy", "fsyncs"), [("always", 3), ("batch", 1), ("never", 0)])
async def test_file_sink_fsync_policy(
    policy: str, fsyncs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_sync = os.fdatasync

    def counting_sync(fd: int) -> None:
        calls.append(fd)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_sync)
    path = tmp_path / "audit" / "a.jsonl"
    sink = JsonlFileAuditSink(path=path, fsync=policy)  # type: ignore[arg-type]
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1")
    await trail.record_all([tool_call(1), tool_call(2), tool_call(3)])
    await trail.close()
    assert len(calls) == fsyncs
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event_id"] for line in lines] == ["evt_1", "evt_2", "evt_3"]
    assert verify_records(read_jsonl_records(path)).ok


async def test_file_sink_failure_is_audit_unavailable() -> None:
    """/dev/full: every write fails with ENOSPC, a real OS error."""
    sink = JsonlFileAuditSink(path=Path("/dev/full"), fsync="never")
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1")
    with pytest.raises(AuditUnavailableError) as failed:
        await trail.record(tool_call(0))
    assert failed.value.reason == "audit.file_failed"
    assert "ENOSPC" in failed.value.detail
    await trail.close()


async def test_file_sink_probe_reports_a_path_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    sink = JsonlFileAuditSink(path=tmp_path / "not-a-dir" / "a.jsonl")
    with pytest.raises(AuditUnavailableError, match="not writable") as failed:
        await sink.probe()
    assert failed.value.reason == "audit.file_failed"
    assert str(await JsonlFileAuditSink(path=tmp_path / "ok.jsonl").probe()).startswith(
        str(tmp_path / "ok.jsonl")
    )


async def test_file_sink_starts_a_new_line_after_a_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"truncated": ')
    trail = ChainingAuditTrail(sinks=[JsonlFileAuditSink(path=path)], writer_id="w-1")
    await trail.record(tool_call(0))
    await trail.close()
    report = verify_records(read_jsonl_records(path))
    assert [f.kind for f in report.findings] == [FindingKind.MALFORMED]
    assert report.writers[0].records == 1


async def test_file_sink_follows_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    trail = ChainingAuditTrail(sinks=[JsonlFileAuditSink(path=path)], writer_id="w-1")
    await trail.record(tool_call(0))
    path.rename(tmp_path / "a.jsonl.1")
    await trail.record(tool_call(1))
    await trail.close()
    rotated = [*read_jsonl_records(tmp_path / "a.jsonl.1"), *read_jsonl_records(path)]
    assert [r["seq"] for r in rotated if isinstance(r, dict)] == [0, 1]
    assert verify_records(rotated).ok


def test_log_lines_are_read_for_their_audit_records_only() -> None:
    lines = [
        '{"event": "request.failed", "status": 401}',
        '{"event": "audit.record", "audit": {"event_id": "e1", "seq": 0}}',
        "",
        '{"event_id": "e2", "seq": 1}',
        "not json",
    ]
    assert list(records_from_lines(iter(lines))) == [
        {"event_id": "e1", "seq": 0},
        {"event_id": "e2", "seq": 1},
        "not json",
    ]
