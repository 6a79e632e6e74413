"""The hash chain: sealing, and a verifier that names each kind of tampering and where."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.audit import AgentToolCall, AuditEvent
from broker.core.audit_chain import (
    ChainHead,
    FindingKind,
    canonical_json,
    genesis_hash,
    parse_anchor,
    record_hash,
    seal,
    seal_line,
    verify_records,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def chain(count: int, writer: str = "w-a", *, start: int = 0) -> list[dict[str, Any]]:
    head = ChainHead.start(writer)
    records = []
    for index in range(count):
        event = AuditEvent(
            event_id=f"evt_{writer}_{index}",
            time=T0 + timedelta(seconds=index),
            actor="spiffe://td/agent/a",
            payload=AgentToolCall(tool="psql", summary=f"query {index}"),
            workflow_id="wf-1",
        )
        record, head = seal(event.as_dict(), head)
        records.append(record)
    return records[start:]


def rehash_from(records: list[dict[str, Any]], index: int) -> None:
    """What an attacker with write access can do: recompute the chain from ``index`` on."""
    for position in range(index, len(records)):
        if position > 0:
            records[position]["prev_hash"] = records[position - 1]["hash"]
        records[position]["hash"] = record_hash(records[position])


def kinds(records: list[Any], **kwargs: Any) -> list[tuple[str, int, int | None]]:
    report = verify_records(records, **kwargs)
    return [(f.kind.value, f.position, f.seq) for f in report.findings]


def test_an_untouched_chain_verifies() -> None:
    report = verify_records(chain(5))
    assert report.ok
    ((summary),) = report.writers
    assert (summary.writer, summary.records, summary.first_seq, summary.last_seq) == (
        "w-a",
        5,
        0,
        4,
    )


def test_interleaved_writers_verify_per_writer() -> None:
    a, b = chain(4, "w-a"), chain(3, "w-b")
    mixed = [a[0], b[0], a[1], a[2], b[1], b[2], a[3]]
    report = verify_records(mixed)
    assert report.ok
    assert [w.writer for w in report.writers] == ["w-a", "w-b"]


def test_the_hash_covers_chain_fields_and_is_independent_of_key_order() -> None:
    (record,) = chain(1)
    shuffled = dict(reversed(list(record.items())))
    assert record_hash(shuffled) == record["hash"]
    assert canonical_json(shuffled) == canonical_json(record)
    assert record["prev_hash"] == genesis_hash("w-a")
    assert record["v"] == 1


def test_the_stored_line_is_the_record() -> None:
    event = chain(1)[0]
    body = {k: v for k, v in event.items() if k not in ("v", "writer", "seq", "prev_hash", "hash")}
    record, line, head = seal_line(body, ChainHead.start("w-a"))
    assert json.loads(line) == record == event
    assert head == ChainHead("w-a", 1, record["hash"])


def test_a_vetter_may_replace_the_event_before_it_is_hashed() -> None:
    seen: list[str] = []

    def vet(event: Mapping[str, Any], text: str) -> Mapping[str, Any] | None:
        seen.append(text)
        return {**event, "actor": "[redacted]"}

    record, line, _ = seal_line({"event_id": "e", "actor": "x"}, ChainHead.start("w"), vet=vet)
    assert '"actor":"x"' in seen[0]
    assert (record["actor"], json.loads(line)["actor"]) == ("[redacted]", "[redacted]")
    assert record_hash(record) == record["hash"]


def test_seal_refuses_an_event_carrying_chain_fields() -> None:
    with pytest.raises(ValueError, match="chain fields"):
        seal({"event_id": "x", "hash": "0" * 64}, ChainHead.start("w"))


@pytest.mark.parametrize("writer", ["", "w\n1", "w\u202e"])
def test_a_writer_id_is_printable_ascii(writer: str) -> None:
    with pytest.raises(ValueError, match="writer id"):
        ChainHead.start(writer)


def test_an_edited_event_is_found_at_its_position() -> None:
    records = chain(5)
    records[2]["payload"]["summary"] = "DROP TABLE orders"
    report = verify_records(records)
    assert [(f.kind, f.position, f.seq, f.event_id) for f in report.findings] == [
        (FindingKind.EDITED, 2, 2, "evt_w-a_2")
    ]


def test_an_edited_chain_field_is_an_edit() -> None:
    records = chain(4)
    records[1]["actor"] = "spiffe://td/someone/else"
    records[3]["seq"] = 3  # unchanged value: no finding
    assert kinds(records) == [("edited", 1, 1)]


def test_an_edit_hidden_by_rehashing_the_record_breaks_the_next_link() -> None:
    records = chain(5)
    records[2]["payload"]["summary"] = "nothing to see"
    records[2]["hash"] = record_hash(records[2])
    report = verify_records(records)
    assert [(f.kind, f.position, f.seq) for f in report.findings] == [
        (FindingKind.LINK_BROKEN, 3, 3)
    ]
    assert "seq 2 was changed and re-hashed" in report.findings[0].detail


def test_a_deleted_event_is_named_with_its_neighbours() -> None:
    records = chain(5)
    del records[2]
    report = verify_records(records)
    assert [(f.kind, f.position, f.seq) for f in report.findings] == [(FindingKind.DELETED, 2, 2)]
    assert "seq 2 is missing: between seq 1 (event evt_w-a_1) and seq 3" in (
        report.findings[0].detail
    )


def test_several_deleted_events_are_one_range() -> None:
    records = chain(8)
    del records[2:5]
    report = verify_records(records)
    assert [(f.kind, f.seq) for f in report.findings] == [(FindingKind.DELETED, 2)]
    assert "seq 2..4 are missing" in report.findings[0].detail


def test_an_inserted_event_with_a_taken_seq_is_the_one_reported() -> None:
    records = chain(5)
    forged = copy.deepcopy(records[2])
    forged["event_id"] = "evt_forged"
    forged["payload"]["summary"] = "approved by nobody"
    forged["hash"] = record_hash(forged)  # correctly linked to seq 1, self-consistent
    records.insert(3, forged)
    report = verify_records(records)
    assert [(f.kind, f.position, f.event_id) for f in report.findings] == [
        (FindingKind.INSERTED, 3, "evt_forged")
    ]


def test_an_inserted_event_placed_before_the_genuine_one_is_still_the_one_reported() -> None:
    records = chain(5)
    forged = copy.deepcopy(records[2])
    forged["event_id"] = "evt_forged"
    forged["hash"] = record_hash(forged)
    records.insert(2, forged)
    report = verify_records(records)
    assert [(f.kind, f.position, f.event_id) for f in report.findings] == [
        (FindingKind.INSERTED, 2, "evt_forged")
    ]


def test_reordered_events_are_found() -> None:
    records = chain(6)
    records[1], records[4] = records[4], records[1]
    report = verify_records(records)
    found = [(f.kind, f.seq) for f in report.findings]
    assert (FindingKind.REORDERED, 4) in found or (FindingKind.REORDERED, 1) in found
    assert {f.kind for f in report.findings} == {FindingKind.REORDERED}


def test_two_adjacent_events_swapped() -> None:
    records = chain(4)
    records[1], records[2] = records[2], records[1]
    report = verify_records(records)
    assert [(f.kind, f.position) for f in report.findings] == [(FindingKind.REORDERED, 1)]
    assert "seq 2 is stored out of order (between seq 0 and seq 1)" in report.findings[0].detail


def test_a_deleted_head_is_reported_unless_the_stream_is_trimmed() -> None:
    trimmed = chain(6, start=2)
    assert kinds(trimmed) == [("head_missing", 0, 2)]
    assert verify_records(trimmed, allow_trimmed_head=True).ok


def test_a_seq_zero_that_does_not_start_at_the_genesis_hash() -> None:
    records = chain(3)
    records[0]["prev_hash"] = "0" * 64
    rehash_from(records, 0)
    assert kinds(records) == [("bad_genesis", 0, 0)]


def test_a_rewritten_tail_and_a_truncation_need_an_anchor() -> None:
    """Without a secret, a rewrite from a record on, or a cut tail, is a valid chain: an
    anchor noted elsewhere (another sink's copy, a log collector) catches both."""
    original = chain(6)
    anchor = ("w-a", 3, original[3]["hash"])
    rewritten = copy.deepcopy(original)
    rewritten[2]["payload"]["summary"] = "rewritten"
    rehash_from(rewritten, 2)
    assert verify_records(rewritten).ok
    assert kinds(rewritten, anchors=[anchor]) == [("anchor_mismatch", 3, 3)]
    truncated = original[:3]
    assert verify_records(truncated).ok
    assert kinds(truncated, anchors=[anchor]) == [("truncated", -1, 3)]
    assert verify_records(original, anchors=[anchor]).ok


@pytest.mark.parametrize(
    ("record", "detail"),
    [
        ("not json", "not a JSON object"),
        ([1, 2], "not a JSON object"),
        ({"writer": "w", "seq": 0, "prev_hash": "x"}, "hash, prev_hash"),
        ({"writer": "", "seq": -1, "hash": "0" * 64, "prev_hash": "0" * 64}, "writer, seq"),
        ({"writer": "w", "seq": True, "hash": "A" * 64, "prev_hash": "0" * 64}, "seq, hash"),
    ],
)
def test_malformed_records_are_reported(record: object, detail: str) -> None:
    report = verify_records([*chain(2), record])
    assert [(f.kind, f.position) for f in report.findings] == [(FindingKind.MALFORMED, 2)]
    assert detail in report.findings[0].detail


def test_anchor_text_is_parsed_with_colons_in_the_writer() -> None:
    digest = "a" * 64
    assert parse_anchor(f"host-1:2:{digest}") == ("host-1", 2, digest)
    assert parse_anchor(f"h:x.1:17:{digest}") == ("h:x.1", 17, digest)
    for bad in ("w:1", f"w:x:{digest}", "w:1:zz", f":1:{digest}"):
        with pytest.raises(ValueError, match="writer:seq"):
            parse_anchor(bad)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=2, max_value=12),
    data=st.data(),
)
def test_any_single_tampering_is_found(size: int, data: st.DataObject) -> None:
    """Property: an edit, a deletion (not of the last), an insertion of a copy, or a swap of
    two different records in one writer's chain is always reported."""
    records = chain(size)
    kind = data.draw(st.sampled_from(["edit", "delete", "insert", "swap"]))
    index = data.draw(st.integers(min_value=0, max_value=size - 2))
    if kind == "edit":
        records[index]["payload"]["summary"] += "!"
    elif kind == "delete":
        del records[index]
    elif kind == "insert":
        records.insert(index + 1, copy.deepcopy(records[index]))
    else:
        other = data.draw(st.integers(min_value=index + 1, max_value=size - 1))
        records[index], records[other] = records[other], records[index]
    assert not verify_records(records).ok
