"""What the audit hot path may not change while it gets cheaper: the hashed bytes (canonical JSON
exactly as ``json.dumps`` with the documented options renders it, golden lines written before
the change), the stdout sink's lines, and the trail's delivery when a caller gives up."""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.adapters.audit_sinks import (
    JsonlFileAuditSink,
    SealedRecord,
    StructlogAuditSink,
    read_jsonl_records,
    records_from_lines,
)
from broker.adapters.audit_trail import ChainingAuditTrail
from broker.core.audit import AgentToolCall, AuditEvent, CredentialIssued, PolicyDecision
from broker.core.audit_chain import ChainHead, canonical_json, seal_line, verify_records
from broker.core.model import DelegationChain, DelegationHop
from broker.errors import AuditUnavailableError

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _reference(value: Any) -> str:
    """The canonical form as documented (and as the chain hashed it from the start)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _outcome(render: Any, value: Any) -> tuple[str, str]:
    try:
        return "text", render(value)
    except (TypeError, ValueError) as exc:
        return "error", type(exc).__name__


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(_VALUES)
def test_canonical_json_is_json_dumps_with_the_documented_options(value: Any) -> None:
    assert _outcome(_reference, value) == _outcome(canonical_json, value)


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": [1, 2.5, None, True], "é": '\u2603\x00\n"\\'},
        {"nested": {"z": {}, "y": [], "x": ("t", "u")}},
        "\ud800 lone surrogate",
        {1: "int key", "1": "str key"},  # a duplicate after conversion: both stay
        {True: "bool key", None: "none key", 2.5: "float key"},
        {"nan": math.nan},  # refused: allow_nan=False
        {"inf": math.inf},
        {"mixed": {1: "a", "b": 2}},  # unorderable keys: refused alike
        {"object": object()},  # not JSON: refused alike
        10**400,
    ],
)
def test_canonical_json_matches_json_dumps_on_edge_cases(value: Any) -> None:
    assert _outcome(_reference, value) == _outcome(canonical_json, value)


def test_a_circular_value_is_refused_alike() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert _outcome(_reference, loop) == _outcome(canonical_json, loop) == ("error", "ValueError")


# Sealed by broker/core/audit_chain.py as of commit a643e52, before the hot-path work: the same
# events at the same head must give these exact lines, hashes included.
GOLDEN_LINES = (
    '{"actor":"spiffe://td/agent/a","approval_id":"","chain":[{"principal":"alice@example.test",'
    '"role":"owner","verified":false},{"principal":"spiffe://td/agent/a","role":"agent",'
    '"verified":true}],"credential_id":"","event_id":"evt_1","payload":{"action":'
    '"request_credential","context":{"context":{"big":1180591620717411303424,"justification":'
    '"caf\\u00e9 \\u2603 \\"quoted\\" \\\\ back\\nslash","list":[1,"2",[3.5,false]],"none":null,'
    '"ratio":0.1,"ttl_seconds":300},"principal":{"id":"spiffe://td/agent/a"}},'
    '"max_ttl_seconds":null,"outcome":"allow","policy_ids":["agent-request"],"reasons":[],'
    '"target":"demo-kv"},"prev_hash":'
    '"ed1eaac068f9bb7bb46b003768041ab0689ebdd1c803428d1b6ec3421d73a5d0","request_id":"req-1",'
    '"seq":0,"task_id":"t-1","time":"2030-01-01T12:00:00+00:00","type":"policy.decision","v":1,'
    '"workflow_id":"wf-1","writer":"golden","hash":'
    '"c51820c66383bb2dc51cac1cc05690c699aaa13ed76750fe4cb99f4e16cb8e04"}',
    '{"actor":"spiffe://td/agent/a","approval_id":"","chain":[{"principal":"alice@example.test",'
    '"role":"owner","verified":false},{"principal":"spiffe://td/agent/a","role":"agent",'
    '"verified":true}],"credential_id":"cred_1","event_id":"evt_2","payload":{"expires_at":'
    '"2030-01-01T12:05:00+00:00","kind":"vault-token","policy_ids":["agent-request"],'
    '"revocable":true,"target":"demo-kv","token_accessor":"acc123","ttl_seconds":300,'
    '"vault_lease_count":0},"prev_hash":'
    '"c51820c66383bb2dc51cac1cc05690c699aaa13ed76750fe4cb99f4e16cb8e04","request_id":"",'
    '"seq":1,"task_id":"t-1","time":"2030-01-01T12:00:00.000001+00:00","type":'
    '"credential.issued","v":1,"workflow_id":"wf-1","writer":"golden","hash":'
    '"11eb84407e08ecd6fa82e71783944173e4412a57de8c0da15e482310f803ea13"}',
)


def _golden_events() -> list[AuditEvent]:
    chain = DelegationChain(
        (
            DelegationHop("owner", "alice@example.test", False),
            DelegationHop("agent", "spiffe://td/agent/a", True),
        )
    )
    context = {
        "context": {
            "justification": 'café ☃ "quoted" \\ back\nslash',
            "ttl_seconds": 300,
            "ratio": 0.1,
            "big": 2**70,
            "none": None,
            "list": (1, "2", [3.5, False]),
        },
        "principal": {"id": "spiffe://td/agent/a"},
    }
    common: dict[str, Any] = {
        "actor": "spiffe://td/agent/a",
        "chain": chain,
        "workflow_id": "wf-1",
        "task_id": "t-1",
    }
    return [
        AuditEvent(
            event_id="evt_1",
            time=T0,
            request_id="req-1",
            payload=PolicyDecision(
                action="request_credential",
                target="demo-kv",
                outcome="allow",
                policy_ids=("agent-request",),
                context=context,
            ),
            **common,
        ),
        AuditEvent(
            event_id="evt_2",
            time=T0 + timedelta(microseconds=1),
            credential_id="cred_1",
            payload=CredentialIssued(
                target="demo-kv",
                kind="vault-token",
                expires_at=T0 + timedelta(minutes=5),
                ttl_seconds=300,
                token_accessor="acc123",
                policy_ids=("agent-request",),
            ),
            **common,
        ),
    ]


def test_sealing_gives_the_lines_and_hashes_written_before() -> None:
    head = ChainHead.start("golden")
    lines = []
    for event in _golden_events():
        record, line, head = seal_line(event.as_dict(), head)
        assert json.loads(line) == json.loads(json.dumps(record))
        lines.append(line)
    assert tuple(lines) == GOLDEN_LINES
    assert verify_records(json.loads(line) for line in GOLDEN_LINES).ok


def test_a_vetted_replacement_is_sealed_with_the_chain_fields() -> None:
    head = ChainHead.start("golden")
    event = _golden_events()[1].as_dict()
    record, line, _ = seal_line(
        event, head, vet=lambda data, _text: {**data, "task_id": "replaced"}
    )
    assert record["task_id"] == json.loads(line)["task_id"] == "replaced"
    assert (record["writer"], record["seq"], record["v"]) == ("golden", 0, 1)
    assert verify_records([json.loads(line)]).ok


# --------------------------------------------------------------------------- stdout sink


class _CountingWrites(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_the_stdout_sink_writes_a_group_commit_in_one_call_one_line_per_record() -> None:
    out = _CountingWrites()
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer(sort_keys=True)],
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    try:
        head = ChainHead.start("w-1")
        sealed = []
        for event in _golden_events():
            record, line, head = seal_line(event.as_dict(), head)
            sealed.append(SealedRecord(record, line))
        await StructlogAuditSink().write(sealed)
        await StructlogAuditSink().write([])
    finally:
        structlog.configure(**saved)
    lines = out.getvalue().splitlines()
    assert out.writes == 1
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]
    assert [p["event"] for p in parsed] == ["audit.record", "audit.record"]
    assert [p["level"] for p in parsed] == ["info", "info"]
    assert parsed[0]["timestamp"] == parsed[1]["timestamp"]
    assert [p["audit"] for p in parsed] == [s.record for s in sealed]
    records = list(records_from_lines(iter(lines)))
    assert verify_records(records).ok


# --------------------------------------------------------------------------- the trail


class _GatedSink:
    name = "gated"
    durable = True

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.records: list[dict[str, Any]] = []

    async def write(self, records: Sequence[SealedRecord]) -> None:
        await self.gate.wait()
        self.records.extend(dict(r.record) for r in records)

    async def probe(self) -> str:
        return "gated"

    async def close(self) -> None:
        pass


def _tool_call(index: int) -> AuditEvent:
    return AuditEvent(
        event_id=f"evt_{index}",
        time=T0,
        actor="spiffe://td/agent/a",
        payload=AgentToolCall(tool="psql", summary=f"call {index}"),
        workflow_id="wf-1",
    )


async def test_a_caller_that_gives_up_neither_loses_its_events_nor_fails_the_others() -> None:
    sink = _GatedSink()
    trail = ChainingAuditTrail(sinks=[sink], writer_id="w-1")
    first = asyncio.create_task(trail.record(_tool_call(0)))
    await asyncio.sleep(0.01)  # the writer holds the first batch at the gate
    leaving = asyncio.create_task(trail.record(_tool_call(1)))
    staying = asyncio.create_task(trail.record(_tool_call(2)))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.sleep(0)
    sink.gate.set()
    await asyncio.gather(first, staying)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await trail.record(_tool_call(3))  # the writer is still there
    await trail.close()
    assert [r["event_id"] for r in sink.records] == ["evt_0", "evt_1", "evt_2", "evt_3"]
    assert verify_records(sink.records).ok


async def test_a_timed_out_caller_fails_closed_and_its_events_are_still_delivered(
    tmp_path: Path,
) -> None:
    sink = _GatedSink()
    trail = ChainingAuditTrail(
        sinks=[sink, JsonlFileAuditSink(path=tmp_path / "a.jsonl")],
        writer_id="w-1",
        record_timeout_seconds=0.05,
    )
    with pytest.raises(AuditUnavailableError) as failed:
        await trail.record(_tool_call(0))
    assert failed.value.reason == "audit.timeout"
    sink.gate.set()
    await trail.record(_tool_call(1))
    await trail.close()
    assert [r["event_id"] for r in sink.records] == ["evt_0", "evt_1"]
    assert verify_records(read_jsonl_records(tmp_path / "a.jsonl")).ok
