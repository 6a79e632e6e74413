"""The audit trail on the real stack: a whole run told by its events (ordered, correlated,
no secret), reported events and their refusals, identity rejections, queries and OCSF export,
the CLI (verify, trace, tail) over the file and the Redis stream, and issuance failing closed
when a durable sink fails."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from broker.bootstrap import RunningBroker
from broker.cli import app as cli
from broker.devstack import DevStack
from tests.conftest import AUDIT_DIR, remember_secret
from tests.integration.clients import StartBroker, call, client_context, workload_id

pytestmark = pytest.mark.stack


class Actors:
    def __init__(self, stack: DevStack, tmp_path: Path) -> None:
        self.stack = stack
        self.orchestrator_id = workload_id(stack, "orchestrator")
        self.agent_id = workload_id(stack, "agent")
        self.admin_id = workload_id(stack, "admin")
        self.orchestrator = client_context(stack, tmp_path, self.orchestrator_id)
        self.agent = client_context(stack, tmp_path, self.agent_id)
        self.other_agent = client_context(
            stack, tmp_path, f"spiffe://{stack.trust_domain}/agent/other"
        )
        self.admin = client_context(stack, tmp_path, self.admin_id)
        self.anonymous = client_context(stack, tmp_path)

    async def start_run(self, broker: RunningBroker) -> str:
        run_id = f"wf-audit-{secrets.token_hex(4)}"
        status, body = await call(
            broker,
            self.orchestrator,
            "POST",
            "/v1/workflows",
            json_body={
                "id": run_id,
                "owner": "alice@example.test",
                "purpose": "nightly reconciliation OPS-1234",
                "ttl_seconds": 600,
                "labels": {"ticket": "OPS-1234"},
                "participants": [self.agent_id],
            },
            headers={"X-Request-Id": f"req-start-{run_id}"},
        )
        assert status == 201, body
        return run_id

    async def issue(self, broker: RunningBroker, run_id: str) -> tuple[int, dict[str, Any]]:
        return await call(
            broker,
            self.agent,
            "POST",
            "/v1/credentials",
            json_body={
                "workflow_id": run_id,
                "task_id": "load-orders",
                "target": "demo-kv",
                "ttl_seconds": 120,
                "justification": "read the demo secret",
            },
            headers={"X-Request-Id": f"req-issue-{run_id}"},
        )

    async def audit(self, broker: RunningBroker, query: str) -> dict[str, Any]:
        status, body = await call(broker, self.admin, "GET", f"/v1/audit?{query}")
        assert status == 200, body
        return body


@pytest.fixture
def actors(stack: DevStack, tmp_path: Path) -> Actors:
    return Actors(stack, tmp_path)


def _root(stack: DevStack) -> hvac.Client:
    assert stack.endpoints is not None
    return hvac.Client(url=stack.endpoints.openbao_addr, token=stack.endpoints.openbao_root_token)


def _audit_env() -> tuple[dict[str, str], str, Path]:
    """Settings for a broker with its own audit stream and file (both scanned at the end)."""
    tag = secrets.token_hex(4)
    stream = f"tl:audit:it{tag}"
    path = AUDIT_DIR / f"integration-{tag}.jsonl"
    return (
        {"TASKLEASE_AUDIT__REDIS__STREAM": stream, "TASKLEASE_AUDIT__FILE__PATH": str(path)},
        stream,
        path,
    )


async def _cli(*args: str) -> tuple[int, str]:
    """``tasklease audit …`` in a thread (the command runs its own event loop)."""
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["audit", *args])
    return result.exit_code, result.output


async def test_a_whole_run_is_told_by_ordered_correlated_events(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    env, stream, path = _audit_env()
    broker = await start(**env)
    run_id = await actors.start_run(broker)
    status, issued = await actors.issue(broker, run_id)
    assert status == 201, issued
    token = remember_secret(issued["secret"]["token"])
    credential_id = issued["credential_id"]
    for body in (
        {
            "type": "agent.tool_call",
            "tool": "vault kv get",
            "credential_id": credential_id,
            "summary": "read kv/demo/app",
            "details": {"path": "kv/demo/app"},
        },
        {
            "type": "agent.side_effect",
            "effect": "report.published",
            "credential_id": credential_id,
            "summary": "published the nightly report",
        },
    ):
        status, reported = await call(broker, actors.agent, "POST", "/v1/events", json_body=body)
        assert status == 201, reported
        assert (reported["workflow_id"], reported["credential_id"]) == (run_id, credential_id)
    status, completed = await call(
        broker,
        actors.orchestrator,
        "POST",
        f"/v1/workflows/{run_id}/complete?wait=true",
        json_body={"outcome": "completed"},
    )
    assert (status, completed["report"]["complete"]) == (200, True), completed
    with pytest.raises(hvac.exceptions.VaultError):
        _root(stack).auth.token.lookup_accessor(issued["token_accessor"])

    events = (await actors.audit(broker, f"workflow_id={run_id}"))["events"]
    assert [e["type"] for e in events] == [
        "workflow.started",
        "policy.decision",
        "credential.issued",
        "agent.tool_call",
        "agent.side_effect",
        "workflow.completed",
        "credential.revoked",
    ]
    started, decided, minted, tool, effect, ended, revoked = events
    assert {e["workflow_id"] for e in events} == {run_id}
    assert [e["credential_id"] for e in (minted, tool, effect, revoked)] == [credential_id] * 4
    assert {e["task_id"] for e in (decided, minted, tool, effect, revoked)} == {"load-orders"}
    assert (started["actor"], started["request_id"]) == (
        actors.orchestrator_id,
        f"req-start-{run_id}",
    )
    assert {decided["request_id"], minted["request_id"]} == {f"req-issue-{run_id}"}
    assert [hop["principal"] for hop in minted["chain"]] == [
        "alice@example.test",
        actors.orchestrator_id,
        actors.agent_id,
    ]
    assert [hop["verified"] for hop in minted["chain"]] == [False, True, True]
    assert decided["payload"]["outcome"] == "allow"
    assert decided["payload"]["policy_ids"] == issued["policy_ids"]
    assert decided["payload"]["context"]["context"]["run"]["owner"] == "alice@example.test"
    assert minted["payload"]["token_accessor"] == issued["token_accessor"]
    assert (ended["actor"], ended["payload"]["state"]) == (actors.orchestrator_id, "completed")
    assert (revoked["payload"]["cause"], revoked["payload"]["initiated_by"]) == (
        "run_completed",
        actors.orchestrator_id,
    )
    assert token not in json.dumps(events)
    # Correlation: a credential's events, and the same story as OCSF.
    by_credential = (await actors.audit(broker, f"credential_id={credential_id}"))["events"]
    assert [e["type"] for e in by_credential] == [
        "policy.decision",
        "credential.issued",
        "agent.tool_call",
        "agent.side_effect",
        "credential.revoked",
    ]
    ocsf = (await actors.audit(broker, f"workflow_id={run_id}&format=ocsf"))["events"]
    assert [e["class_uid"] for e in ocsf] == [6003, 3003, 3003, 6003, 6003, 6003, 3003]
    assert ocsf[2]["session"] == {"uid": credential_id}

    # The file and the stream each verify; the CLI tells the story from Redis.
    await broker.stop()
    code, output = await _cli("verify", "--file", str(path))
    assert (code, output.splitlines()[-1]) == (0, "OK: every chain verifies"), output
    code, output = await _cli("verify", "--stream", stream)
    assert code == 0, output
    code, trace = await _cli("trace", run_id, "--stream", stream)
    assert code == 0, trace
    assert trace.startswith(f'Run {run_id}: "nightly reconciliation OPS-1234"\n')
    for expected in (
        "  owner         alice@example.test (asserted by the orchestrator)",
        f"  started by    {actors.orchestrator_id} (verified) at ",
        f"{actors.agent_id} asked for demo-kv (task load-orders): ALLOW by ",
        f"credential {credential_id} issued to {actors.agent_id}: demo-kv (vault-token), ",
        f'tool call by {actors.agent_id} with {credential_id}: vault kv get — "read kv/demo/app"',
        f"side effect reported by {actors.agent_id} with {credential_id}: report.published",
        f"run ended by {actors.orchestrator_id}: completed (outcome completed; 1 credential(s)",
        f"credential {credential_id} revoked (run_completed, asked by {actors.orchestrator_id})"
        ", confirmed by OpenBao",
        f"  {credential_id}  demo-kv (vault-token) task load-orders held by {actors.agent_id}",
    ):
        assert expected in trace, (expected, trace)
    assert trace == (await _cli("trace", run_id, "--file", str(path)))[1]
    code, tail = await _cli("tail", "--file", str(path), "-n", "2")
    assert code == 0
    assert [line.split()[2] for line in tail.splitlines()] == [
        "workflow.completed",
        "credential.revoked",
    ]


async def test_reported_events_are_bound_to_what_the_caller_holds(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    status, issued = await actors.issue(broker, run_id)
    assert status == 201
    remember_secret(issued["secret"]["token"])
    credential_id = issued["credential_id"]
    tool = {"type": "agent.tool_call", "tool": "psql", "credential_id": credential_id}
    cases: list[tuple[Any, dict[str, Any], tuple[int, str]]] = [
        (
            actors.agent,
            {"type": "credential.revoked", "credential_id": credential_id},
            (400, "event.type_not_reportable"),
        ),
        (actors.agent, {"type": "agent.tool_call", "tool": "psql"}, (400, "event.unbound")),
        (
            actors.agent,
            {"type": "agent.tool_call", "credential_id": credential_id},
            (400, "invalid.tool"),
        ),
        (actors.other_agent, tool, (404, "credential.not_found")),
        (
            actors.agent,
            {"type": "agent.side_effect", "effect": "x", "workflow_id": run_id},
            (404, "workflow.not_found"),
        ),
        (actors.admin, tool, (403, "auth.role_required")),
        (actors.agent, {**tool, "evil": 1}, (400, "body.invalid")),
    ]
    for context, body, expected in cases:
        status, refused = await call(broker, context, "POST", "/v1/events", json_body=body)
        assert (status, refused.get("reason")) == expected, (body, refused)
    status, ok = await call(
        broker,
        actors.orchestrator,
        "POST",
        "/v1/events",
        json_body={"type": "agent.side_effect", "effect": "ticket.closed", "workflow_id": run_id},
    )
    assert (status, ok["workflow_id"], ok["credential_id"]) == (201, run_id, "")
    events = (await actors.audit(broker, f"workflow_id={run_id}&type=agent.side_effect"))["events"]
    assert [(e["actor"], e["payload"]["effect"]) for e in events] == [
        (actors.orchestrator_id, "ticket.closed")
    ]


async def test_a_rejected_identity_is_an_audit_event_and_queries_are_for_admins(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    request_id = f"req-anon-{secrets.token_hex(4)}"
    status, body = await call(
        broker, actors.anonymous, "GET", "/v1/whoami", headers={"X-Request-Id": request_id}
    )
    assert status == 401, body
    page = await actors.audit(broker, "type=identity.rejected&limit=500")
    mine = [e for e in page["events"] if e["request_id"] == request_id]
    while not mine and page["next_cursor"]:
        page = await actors.audit(
            broker, f"type=identity.rejected&limit=500&cursor={page['next_cursor']}"
        )
        mine = [e for e in page["events"] if e["request_id"] == request_id]
    (rejected,) = mine
    assert (rejected["payload"]["path"], rejected["payload"]["method"]) == ("/v1/whoami", "none")
    assert rejected["payload"]["reason"] == body["reason"]
    for context, query, expected in (
        (actors.agent, "", (403, "auth.role_required")),
        (actors.admin, "limit=0", (400, "query.invalid")),
        (actors.admin, "since=yesterday", (400, "query.invalid")),
        (actors.admin, "type=no.such", (400, "query.invalid")),
        (actors.admin, "cursor=abc", (400, "audit.bad_cursor")),
        (actors.admin, "colour=blue", (400, "query.invalid")),
    ):
        status, refused = await call(broker, context, "GET", f"/v1/audit?{query}")
        assert (status, refused.get("reason")) == expected, (query, refused)


async def test_a_failing_durable_sink_fails_issuance_closed_and_revokes_the_credential(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    env, stream, _ = _audit_env()
    broker = await start(**env)
    run_id = await actors.start_run(broker)
    assert stack.endpoints is not None
    admin = aioredis.Redis.from_url(stack.endpoints.redis_url, decode_responses=True)
    try:
        # A real Redis error on the audit stream only (the ledger is unaffected): WRONGTYPE.
        await admin.delete(stream)
        await admin.set(stream, "not a stream")
        status, body = await actors.issue(broker, run_id)
        assert (status, body["code"], body["reason"]) == (
            503,
            "audit_unavailable",
            "audit.redis_failed",
        )
        assert "secret" not in body
        status, ready = await call(broker, actors.anonymous, "GET", "/readyz")
        assert (status, ready["checks"]["audit"]["ok"]) == (503, False)
        assert "holds a string" in ready["checks"]["audit"]["detail"]
        # The credential was minted, then revoked: OpenBao no longer knows its token, and the
        # sweeper confirms the revocation in the ledger.
        status, run = await call(broker, actors.orchestrator, "GET", f"/v1/workflows/{run_id}")
        (lease,) = run["credentials"]
        assert lease["revoke_reason"] == "audit_unavailable"
        with pytest.raises(hvac.exceptions.VaultError):
            _root(stack).auth.token.lookup_accessor(lease["token_accessor"])
        for _ in range(100):
            status, current = await call(
                broker, actors.agent, "GET", f"/v1/credentials/{lease['credential_id']}"
            )
            if current["state"] == "revoked":
                break
            await asyncio.sleep(0.1)
        assert current["state"] == "revoked", current
    finally:
        await admin.delete(stream)
        await admin.aclose()
    # Repaired: issuance works again, and so does readiness.
    status, issued = await actors.issue(broker, run_id)
    assert status == 201, issued
    remember_secret(issued["secret"]["token"])
    status, ready = await call(broker, actors.anonymous, "GET", "/readyz")
    assert ready["checks"]["audit"]["ok"] is True, ready
