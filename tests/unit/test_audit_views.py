"""Pure views of the audit trail: the story of a run, OCSF export, and redaction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.core.audit import (
    AgentSideEffect,
    AgentToolCall,
    ApprovalDecided,
    ApprovalRequested,
    AuditEvent,
    AuditQuery,
    CredentialDenied,
    CredentialIssued,
    CredentialRevoked,
    CredentialRevokeFailed,
    EventType,
    IdentityRejected,
    Payload,
    PolicyDecision,
    QuarantineChanged,
    RevocationForced,
    WorkflowCompleted,
    WorkflowPurged,
    WorkflowStarted,
    record_runs,
)
from broker.core.audit_chain import ChainHead, seal
from broker.core.audit_ocsf import to_ocsf
from broker.core.audit_redact import REDACTED, redact, redact_event
from broker.core.audit_trace import render_trace, summary_line
from broker.core.model import DelegationChain, DelegationHop

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ORCH = "spiffe://td/orchestrator/demo"
AGENT = "spiffe://td/agent/demo"
ADMIN = "spiffe://td/admin/demo"
RUN_CHAIN = DelegationChain(
    (DelegationHop("owner", "alice@example.test", False), DelegationHop("orchestrator", ORCH, True))
)
AGENT_CHAIN = RUN_CHAIN.extended(DelegationHop("agent", AGENT, True))


def event(second: int, actor: str, payload: Payload, **ids: Any) -> AuditEvent:
    return AuditEvent(
        event_id=f"evt_{second}",
        time=T0 + timedelta(seconds=second),
        actor=actor,
        payload=payload,
        **ids,
    )


def sealed(events: list[AuditEvent]) -> list[dict[str, Any]]:
    head = ChainHead.start("w")
    records = []
    for item in events:
        record, head = seal(item.as_dict(), head)
        records.append(record)
    return records


TASK = {"workflow_id": "wf-42", "task_id": "load"}
STORY = [
    event(
        0,
        ORCH,
        WorkflowStarted(
            owner="alice@example.test",
            purpose="nightly reconciliation OPS-1234",
            deadline=T0 + timedelta(minutes=10),
            labels={"ticket": "OPS-1234"},
            participants=(AGENT,),
        ),
        chain=RUN_CHAIN,
        workflow_id="wf-42",
    ),
    event(
        1,
        AGENT,
        PolicyDecision(
            action="request_credential",
            target="prod-db",
            outcome="needs_approval",
            policy_ids=("restricted-needs-approval",),
        ),
        chain=AGENT_CHAIN,
        **TASK,
    ),
    event(
        2,
        AGENT,
        ApprovalRequested(
            target="prod-db",
            request_digest="ab" * 32,
            ttl_seconds=300,
            quorum=1,
            expires_at=T0 + timedelta(minutes=15),
            policy_ids=("restricted-needs-approval",),
        ),
        chain=AGENT_CHAIN,
        approval_id="apr_1",
        **TASK,
    ),
    event(
        3,
        "bob@example.test",
        ApprovalDecided(
            decision="approve",
            state="approved",
            approvers=("bob@example.test",),
            comment="ok for OPS-1234",
        ),
        chain=AGENT_CHAIN,
        approval_id="apr_1",
        **TASK,
    ),
    event(
        4,
        AGENT,
        PolicyDecision(
            action="request_credential",
            target="prod-db",
            outcome="allow",
            policy_ids=("agent-request", "approved"),
        ),
        chain=AGENT_CHAIN,
        approval_id="apr_1",
        **TASK,
    ),
    event(
        5,
        AGENT,
        CredentialIssued(
            target="prod-db",
            kind="database",
            expires_at=T0 + timedelta(seconds=65),
            ttl_seconds=60,
            token_accessor="acc123",
            vault_lease_count=1,
            policy_ids=("agent-request", "approved"),
        ),
        chain=AGENT_CHAIN,
        credential_id="cred_1",
        approval_id="apr_1",
        **TASK,
    ),
    event(
        6,
        AGENT,
        AgentToolCall(tool="psql", summary="SELECT count(*) FROM orders\x1b[31m"),
        chain=AGENT_CHAIN,
        credential_id="cred_1",
        **TASK,
    ),
    event(
        7,
        AGENT,
        AgentSideEffect(effect="report.upload", summary="uploaded 3 rows"),
        chain=AGENT_CHAIN,
        credential_id="cred_1",
        **TASK,
    ),
    event(
        8,
        ORCH,
        WorkflowCompleted(state="completed", outcome="completed", leases_due=1),
        chain=RUN_CHAIN,
        workflow_id="wf-42",
    ),
    event(
        9,
        "tasklease-broker",
        CredentialRevoked(cause="run_completed", target="prod-db", initiated_by=ORCH),
        chain=AGENT_CHAIN,
        credential_id="cred_1",
        **TASK,
    ),
    event(
        10,
        AGENT,
        CredentialDenied(
            target="demo-db", reason="quarantine.active", detail="issuance is quarantined"
        ),
        workflow_id="wf-42",
        task_id="t2",
    ),
    event(
        11,
        ADMIN,
        RevocationForced(
            selector={"holder": AGENT},
            reason="INC-7 leaked key",
            confirmed=1,
            credential_ids=("cred_2",),
            workflow_ids=("wf-42", "wf-43"),
        ),
    ),
    event(12, AGENT, AgentToolCall(tool="other"), workflow_id="wf-99"),
]

EXPECTED_TRACE = """\
Run wf-42: "nightly reconciliation OPS-1234"
  owner         alice@example.test (asserted by the orchestrator)
  started by    spiffe://td/orchestrator/demo (verified) at 2030-01-01 12:00:00Z
  deadline      2030-01-01 12:10:00Z
  labels        ticket=OPS-1234
  participants  spiffe://td/agent/demo

Story
  2030-01-01 12:00:00Z  run started by spiffe://td/orchestrator/demo for owner alice@example.test
  2030-01-01 12:00:01Z  spiffe://td/agent/demo asked for prod-db (task load): NEEDS_APPROVAL by \
[restricted-needs-approval]
  2030-01-01 12:00:02Z  approval apr_1 requested by spiffe://td/agent/demo for prod-db (task load, \
quorum 1, by [restricted-needs-approval])
  2030-01-01 12:00:03Z  approval apr_1: approve by bob@example.test (now approved) — \
"ok for OPS-1234"
  2030-01-01 12:00:04Z  spiffe://td/agent/demo asked for prod-db (task load): ALLOW by \
[agent-request, approved]
  2030-01-01 12:00:05Z  credential cred_1 issued to spiffe://td/agent/demo: prod-db (database), \
60 s until 2030-01-01 12:01:05Z, token accessor acc123
  2030-01-01 12:00:06Z  tool call by spiffe://td/agent/demo with cred_1: psql — \
"SELECT count(*) FROM orders\\x1b[31m"
  2030-01-01 12:00:07Z  side effect reported by spiffe://td/agent/demo with cred_1: \
report.upload — "uploaded 3 rows"
  2030-01-01 12:00:08Z  run ended by spiffe://td/orchestrator/demo: completed (outcome \
completed; 1 credential(s) to revoke)
  2030-01-01 12:00:09Z  credential cred_1 revoked (run_completed, asked by \
spiffe://td/orchestrator/demo), confirmed by OpenBao
  2030-01-01 12:00:10Z  spiffe://td/agent/demo was refused demo-db (task t2): \
quarantine.active — issuance is quarantined
  2030-01-01 12:00:11Z  forced revocation by spiffe://td/admin/demo: "INC-7 leaked key" \
(1 confirmed revoked, 0 still live)

Credentials
  cred_1  prod-db (database) task load held by spiffe://td/agent/demo
      decision ALLOW [agent-request, approved], approval apr_1; issued 2030-01-01 12:00:05Z, \
expires 2030-01-01 12:01:05Z; revoked 2030-01-01 12:00:09Z (run_completed)

Delegation
  alice@example.test (owner, asserted) → spiffe://td/orchestrator/demo (orchestrator, \
verified) → spiffe://td/agent/demo (agent, verified)
"""


def test_the_trace_tells_the_story_of_a_run() -> None:
    """Owner, starter, decisions, approval, credential, tool calls, side effects, revocation
    and why, a refusal, a forced revocation that addressed the run; nothing of other runs;
    a hostile escape sequence shown escaped."""
    assert render_trace(sealed(STORY), "wf-42") == EXPECTED_TRACE


def test_the_trace_does_not_depend_on_the_stored_order() -> None:
    records = sealed(STORY)
    assert render_trace(list(reversed(records)), "wf-42") == EXPECTED_TRACE


def test_each_credential_shows_the_decision_that_allowed_it() -> None:
    """Two credentials for one task of one agent, each allowed by its own decision: a
    decision names its credential, so each credential line shows its own (not the task's
    latest decision, which is all records without the link can say)."""

    def decided(second: int, target: str, policy: str, credential_id: str) -> AuditEvent:
        return event(
            second,
            AGENT,
            PolicyDecision(
                action="request_credential", target=target, outcome="allow", policy_ids=(policy,)
            ),
            chain=AGENT_CHAIN,
            credential_id=credential_id,
            **TASK,
        )

    def issued(second: int, target: str, policy: str, credential_id: str) -> AuditEvent:
        return event(
            second,
            AGENT,
            CredentialIssued(
                target=target,
                kind="vault-token",
                expires_at=T0 + timedelta(minutes=5),
                ttl_seconds=300,
                token_accessor=f"acc-{credential_id}",
                vault_lease_count=0,
                policy_ids=(policy,),
            ),
            chain=AGENT_CHAIN,
            credential_id=credential_id,
            **TASK,
        )

    story = [
        STORY[0],
        decided(1, "kv-a", "policy-a", "cred_a"),
        decided(2, "kv-b", "policy-b", "cred_b"),
        issued(3, "kv-a", "policy-a", "cred_a"),
        issued(4, "kv-b", "policy-b", "cred_b"),
    ]
    credentials = render_trace(sealed(story), "wf-42").split("Credentials\n")[1]
    lines = credentials.splitlines()
    assert lines[0].startswith("  cred_a  kv-a (vault-token)")
    assert lines[1].startswith("      decision ALLOW [policy-a];")
    assert lines[2].startswith("  cred_b  kv-b (vault-token)")
    assert lines[3].startswith("      decision ALLOW [policy-b];")


def test_a_trace_without_the_start_or_without_events_says_so() -> None:
    assert render_trace([], "wf-x") == "Run wf-x\n  no audit events for this run\n"
    without_start = render_trace(sealed(STORY[1:3]), "wf-42")
    assert "(no workflow.started event" in without_start
    assert "Credentials" not in without_start


def test_a_purge_ends_the_story_of_a_run() -> None:
    purged = event(
        13,
        "spiffe://td/broker",
        WorkflowPurged(
            state="completed",
            over_at=T0,
            retention_days=30,
            leases=1,
            lease_states={"revoked": 1},
        ),
        workflow_id="wf-42",
    )
    trace = render_trace(sealed([*STORY, purged]), "wf-42")
    assert (
        "run purged from the ledger by spiffe://td/broker: over since 2030-01-01T12:00:00+00:00, "
        "kept 30 day(s); 1 lease record(s) deleted (history stays here)"
    ) in trace


def test_a_summary_line_per_record() -> None:
    line = summary_line(sealed(STORY)[5])
    assert line.startswith("2030-01-01 12:00:05Z  credential.issued        spiffe://td/agent/demo")
    assert "run=wf-42 task=load cred=cred_1 approval=apr_1" in line


def test_a_forced_revocation_belongs_to_every_run_it_addressed() -> None:
    forced = sealed(STORY)[11]
    assert record_runs(forced) == ["wf-42", "wf-43"]
    assert AuditQuery(workflow_id="wf-43").matches(forced)
    assert AuditQuery(credential_id="cred_2").matches(forced)
    assert not AuditQuery(workflow_id="wf-99").matches(forced)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (AuditQuery(), 13),
        (AuditQuery(workflow_id="wf-42"), 12),
        (AuditQuery(credential_id="cred_1"), 4),
        # ... and the steps of the approval it was issued with (not the decisions).
        (AuditQuery(credential_id="cred_1", approval_id="apr_1"), 6),
        (AuditQuery(credential_id="cred_2", approval_id="apr_1"), 3),
        (AuditQuery(actor=ORCH), 2),
        (AuditQuery(types=frozenset({EventType.POLICY_DECISION})), 2),
        (AuditQuery(since=T0 + timedelta(seconds=5), until=T0 + timedelta(seconds=8)), 3),
        (
            AuditQuery(
                workflow_id="wf-42", actor=AGENT, types=frozenset({EventType.AGENT_TOOL_CALL})
            ),
            1,
        ),
    ],
)
def test_query_filters(query: AuditQuery, expected: int) -> None:
    assert sum(1 for r in sealed(STORY) if query.matches(r)) == expected


def test_a_query_is_bounded() -> None:
    for bad in ({"limit": 0}, {"limit": 501}, {"since": datetime(2030, 1, 1)}):  # noqa: DTZ001
        with pytest.raises(ValueError, match=r"limit|timezone"):
            AuditQuery(**bad)


# --------------------------------------------------------------------------- OCSF


@pytest.mark.parametrize(
    ("payload", "class_uid", "activity_id", "status_id", "severity_id"),
    [
        (PolicyDecision(action="a", target="t", outcome="allow"), 3003, 99, 1, 1),
        (PolicyDecision(action="a", target="t", outcome="deny"), 3003, 99, 2, 3),
        (PolicyDecision(action="a", target="t", outcome="needs_approval"), 3003, 99, 99, 1),
        (
            CredentialIssued(target="t", kind="database", expires_at=T0, ttl_seconds=1),
            3003,
            1,
            1,
            1,
        ),
        (CredentialDenied(target="t", reason="policy.deny"), 3003, 1, 2, 3),
        (CredentialRevoked(cause="ttl_expired"), 3003, 99, 1, 1),
        (CredentialRevokeFailed(attempts=8, error="x"), 3003, 99, 2, 4),
        (RevocationForced(selector={}, reason="r", still_live=1), 3003, 99, 2, 3),
        (QuarantineChanged(action="set", kind="target", value="t"), 3003, 99, 1, 3),
        (ApprovalDecided(decision="deny", state="denied"), 3003, 99, 2, 3),
        (IdentityRejected(method="bearer", reason="jwt.aud_mismatch"), 3002, 1, 2, 3),
        (
            WorkflowStarted(owner="o", purpose="p", deadline=T0),
            6003,
            1,
            1,
            1,
        ),
        (WorkflowCompleted(state="completed"), 6003, 3, 1, 1),
        (AgentToolCall(tool="psql"), 6003, 99, 1, 1),
        (AgentSideEffect(effect="x"), 6003, 99, 1, 1),
        (
            WorkflowPurged(state="completed", over_at=T0, retention_days=30, leases=2),
            6003,
            4,
            1,
            1,
        ),
    ],
)
def test_each_event_type_maps_to_an_ocsf_class(
    payload: Payload, class_uid: int, activity_id: int, status_id: int, severity_id: int
) -> None:
    (record,) = sealed([event(0, AGENT, payload, workflow_id="wf-1")])
    ocsf = to_ocsf(record)
    assert (
        ocsf["class_uid"],
        ocsf["activity_id"],
        ocsf["type_uid"],
        ocsf["status_id"],
        ocsf["severity_id"],
    ) == (class_uid, activity_id, class_uid * 100 + activity_id, status_id, severity_id)
    assert ocsf["metadata"]["uid"] == "evt_0"
    assert ocsf["metadata"]["correlation_uid"] == "wf-1"
    assert ocsf["time"] == int(T0.timestamp() * 1000)


def test_an_issued_credential_in_ocsf_keeps_the_record_for_verification() -> None:
    record = sealed(STORY)[5]
    ocsf = to_ocsf(record)
    assert ocsf["type_name"] == "Authorize Session: Assign Privileges"
    assert ocsf["actor"]["user"] == {"uid": AGENT, "name": AGENT, "type": "Service"}
    assert [a["policy"]["uid"] for a in ocsf["actor"]["authorizations"]] == [
        "agent-request",
        "approved",
    ]
    assert ocsf["privileges"] == ["prod-db"]
    assert ocsf["session"] == {"uid": "cred_1"}
    assert {"uid": "wf-42", "type": "workflow_run"} in ocsf["resources"]
    assert ocsf["unmapped"]["tasklease"] == record
    tool_call = to_ocsf(sealed(STORY)[6])
    assert tool_call["api"]["operation"] == "psql"


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("planted", "kind"),
    [
        ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----", "private key"),
        ("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJlc2lnbmF0dXJl", "jwt"),
        ("hvs.CAESIJ1234567890abcdefghijklmnop", "vault token"),
        ("s.AbCdEfGhIjKlMnOpQrStUvWx12", "vault token"),
    ],
)
def test_secret_shapes_are_redacted_anywhere(planted: str, kind: str) -> None:
    data = {"payload": {"summary": f"used {planted} here", "list": [planted]}}
    clean, count = redact(data)
    assert count == 2
    assert clean == {
        "payload": {"summary": f"used [redacted {kind}] here", "list": [f"[redacted {kind}]"]}
    }


def test_passwords_in_urls_and_secret_named_keys_are_redacted_accessors_kept() -> None:
    clean, count = redact(
        {
            "token_accessor": "hkb0xrKu4ciE6GTfmAYBxf7A",
            "details": {
                "db_password": "hunter2",
                "api_key": "k-123",
                "token": "t",
                "client_secret": "x",
                "authorization_required": True,
                "note": "postgres://app:hunter2@db:5432/orders",
            },
            "vault_lease_count": 2,
        }
    )
    assert count == 5
    assert clean == {
        "token_accessor": "hkb0xrKu4ciE6GTfmAYBxf7A",
        "details": {
            "db_password": REDACTED,
            "api_key": REDACTED,
            "token": REDACTED,
            "client_secret": REDACTED,
            "authorization_required": True,
            "note": f"postgres://app:{REDACTED}@db:5432/orders",
        },
        "vault_lease_count": 2,
    }


def test_clean_events_are_unchanged() -> None:
    record = sealed(STORY)[5]
    assert redact(record) == (record, 0)


@pytest.mark.parametrize(
    "data",
    [
        {"details": {"password_hash": "x"}},
        {"details": {"Authorization": "Bearer abc"}},
        {"details": {"my_token": "t"}},
        {"details": {"token": "t"}},
        {"details": {"note": "connect to mysql://root:toor@db/x"}},
        {"summary": "key -----BEGIN PRIVATE KEY-----\nAAAA"},
        {"summary": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJlc2lnbmF0dXJl"},
        {"summary": "line\ns.AbCdEfGhIjKlMnOpQrStUvWx12"},
        {"token_accessor": "acc", "kind": "vault-token", "actor": "spiffe://td/a"},
        {"owner": "alice@example.test", "actor": "spiffe://td/a"},
    ],
)
def test_the_fast_path_never_skips_what_the_full_walk_would_redact(data: dict[str, Any]) -> None:
    assert redact_event(data) == redact(data)
