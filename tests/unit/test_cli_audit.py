"""``tasklease audit`` over files: verify names the tampered line and exits 4, trace and tail
read the same records."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from broker.cli import app
from broker.cli_audit import EXIT_TAMPERED
from broker.core.audit import AgentToolCall, AuditEvent, WorkflowStarted
from broker.core.audit_chain import ChainHead, seal

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def write_chain(path: Path, count: int = 4) -> list[dict[str, Any]]:
    head = ChainHead.start("w-cli")
    records = []
    for index in range(count):
        payload = (
            WorkflowStarted(owner="alice", purpose="p", deadline=T0 + timedelta(hours=1))
            if index == 0
            else AgentToolCall(tool="psql", summary=f"q{index}")
        )
        record, head = seal(
            AuditEvent(
                event_id=f"evt_{index}",
                time=T0 + timedelta(seconds=index),
                actor="spiffe://td/x/y",
                payload=payload,
                workflow_id="wf-1",
            ).as_dict(),
            head,
        )
        records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", *args])
    return result.exit_code, result.output


def test_verify_accepts_an_intact_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_chain(path)
    code, output = run("verify", "--file", str(path))
    assert code == 0, output
    assert f"head w-cli:3:{records[-1]['hash']}" in output
    assert output.splitlines()[-1] == "OK: every chain verifies"


def test_verify_names_the_edited_line_and_exits_4(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_chain(path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"q2"', '"DROP TABLE"')
    path.write_text("\n".join(lines) + "\n")
    code, output = run("verify", "--file", str(path))
    assert code == EXIT_TAMPERED
    assert f"EDITED at {path}:3: writer w-cli seq 2 event evt_2" in output
    code, output = run("verify", "--file", str(path), "--json")
    report = json.loads(output)
    assert (report["ok"], report["findings"][0]["where"]) == (False, f"{path}:3")


def test_verify_with_an_anchor_catches_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = write_chain(path)
    anchor = f"w-cli:3:{records[3]['hash']}"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:2]))
    assert run("verify", "--file", str(path))[0] == 0
    code, output = run("verify", "--file", str(path), "--anchor", anchor)
    assert code == EXIT_TAMPERED
    assert "TRUNCATED" in output
    assert run("verify", "--file", str(path), "--anchor", "nonsense")[0] == 2


def test_trace_and_tail_read_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_chain(path)
    code, trace = run("trace", "wf-1", "--file", str(path))
    assert code == 0
    assert trace.startswith('Run wf-1: "p"\n  owner         alice (asserted by the orchestrator)')
    code, tail = run("tail", "--file", str(path), "-n", "2", "--format", "json")
    assert [json.loads(line)["event_id"] for line in tail.splitlines()] == ["evt_2", "evt_3"]
    code, ocsf = run("tail", "--file", str(path), "-n", "1", "--format", "ocsf")
    assert json.loads(ocsf)["class_uid"] == 6003
    assert run("tail", "--file", str(path), "--follow")[0] == 2
