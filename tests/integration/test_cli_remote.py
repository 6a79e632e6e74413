"""The ``tasklease`` commands that talk to a live broker (targets, leases, revoke, quarantine,
approvals), run through typer's CliRunner with real SVIDs on the real stack.

The CLI runs its own event loop (``asyncio.run``), so each invocation runs in a thread while
the test's loop keeps serving the broker."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from broker.bootstrap import RunningBroker
from broker.cli import app
from broker.client import (
    AdminClient,
    AgentClient,
    ApiError,
    Credential,
    OrchestratorClient,
    PemAuth,
    PendingApproval,
)
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import workload_id

pytestmark = pytest.mark.stack


def _pems(stack: DevStack, tmp_path: Path, spiffe_id: str) -> dict[str, Path]:
    minted = stack.mint_x509_svid(spiffe_id, ttl_seconds=600)
    remember_secret(minted["key"])
    name = spiffe_id.rsplit("/", 2)[-2] + "-" + secrets.token_hex(2)
    paths = {
        "cert": tmp_path / f"{name}.pem",
        "key": tmp_path / f"{name}-key.pem",
        "bundle": tmp_path / f"{name}-bundle.pem",
    }
    paths["cert"].write_text(minted["svid"])
    paths["key"].write_text(minted["key"])
    paths["bundle"].write_text(minted["bundle"])
    return paths


def _sdk(paths: dict[str, Path]) -> PemAuth:
    return PemAuth(bundle=paths["bundle"], chain=paths["cert"], key=paths["key"])


async def _cli(broker: RunningBroker, paths: dict[str, Path] | None, *args: str) -> Result:
    identity: list[str] = []
    if paths is not None:
        identity = [
            "--cert",
            str(paths["cert"]),
            "--key",
            str(paths["key"]),
            "--bundle",
            str(paths["bundle"]),
        ]
    argv = ["--url", broker.url, *identity, *args]
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, argv, env={"SPIFFE_ENDPOINT_SOCKET": ""})


async def _json(broker: RunningBroker, paths: dict[str, Path], *args: str) -> Any:
    result = await _cli(broker, paths, "--output", "json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def _issue(
    stack: DevStack, broker: RunningBroker, tmp_path: Path, target: str = "demo-db"
) -> tuple[str, Credential | PendingApproval]:
    run_id = f"wf-cli-{secrets.token_hex(3)}"
    orchestrator = _sdk(_pems(stack, tmp_path, workload_id(stack, "orchestrator")))
    async with OrchestratorClient(broker.url, orchestrator) as client:
        await client.start_run(
            run_id,
            owner="alice@example.test",
            purpose="CLI test OPS-1234",
            ttl_seconds=600,
            labels={"ticket": "OPS-1234"},
            participants=[workload_id(stack, "agent")],
        )
    agent = _sdk(_pems(stack, tmp_path, workload_id(stack, "agent")))
    async with AgentClient(broker.url, agent) as client:
        answer = await client.request_credential(
            workflow=run_id, task="t1", target=target, ttl_seconds=300
        )
    if isinstance(answer, Credential):
        remember_secret(answer.secret["password"])
    return run_id, answer


async def test_targets_ls_lists_the_catalog(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    agent = _pems(stack, tmp_path, workload_id(stack, "agent"))
    targets = await _json(running_broker, agent, "targets", "ls")
    by_name = {t["name"]: t for t in targets}
    assert by_name["demo-db"]["kind"] == "database"
    assert by_name["demo-ssh"]["revocable"] is False
    table = await _cli(running_broker, agent, "targets", "ls")
    assert table.exit_code == 0
    assert "demo-db" in table.stdout


async def test_leases_ls_then_revoke_by_run_with_a_final_report(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    broker = running_broker
    run_id, credential = await _issue(stack, broker, tmp_path)
    assert isinstance(credential, Credential)
    admin = _pems(stack, tmp_path, workload_id(stack, "admin"))
    leases = await _json(broker, admin, "leases", "ls", "--run", run_id)
    assert [(x["credential_id"], x["state"]) for x in leases] == [
        (credential.credential_id, "active")
    ]

    refused = await _cli(broker, admin, "revoke", "--reason", "INC-7")
    assert refused.exit_code == 2  # no selector: a usage error, nothing revoked
    answered_no = await _cli(broker, admin, "revoke", "--run", run_id, "--reason", "INC-7")
    assert answered_no.exit_code == 1  # the confirmation prompt read no "y"
    result = await _cli(broker, admin, "revoke", "--run", run_id, "--reason", "INC-7", "--yes")
    assert result.exit_code == 0, result.output
    assert "1 confirmed revoked, 0 still live" in result.stdout
    again = await _json(broker, admin, "revoke", "--run", run_id, "--reason", "INC-7", "--yes")
    assert again["complete"] is True
    assert [r["credential_id"] for r in again["confirmed_revoked"]] in (
        [credential.credential_id],
        [],
    )
    leases = await _json(broker, admin, "leases", "ls", "--run", run_id)
    assert [x["state"] for x in leases] == ["revoked"]


async def test_quarantine_set_ls_lift(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    admin = _pems(stack, tmp_path, workload_id(stack, "admin"))
    value = f"wf-q-{secrets.token_hex(3)}"
    result = await _cli(
        running_broker, admin, "quarantine", "set", "workflow", value, "--reason", "INC-9"
    )
    assert result.exit_code == 0, result.output
    listed = await _json(running_broker, admin, "quarantine", "ls")
    assert any(q["value"] == value and q["reason"] == "INC-9" for q in listed)
    lifted = await _cli(running_broker, admin, "quarantine", "lift", "workflow", value)
    assert lifted.exit_code == 0, lifted.output
    listed = await _json(running_broker, admin, "quarantine", "ls")
    assert all(q["value"] != value for q in listed)


async def test_approvals_ls_and_approve(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    broker = running_broker
    _, pending = await _issue(stack, broker, tmp_path, target="prod-db")
    assert isinstance(pending, PendingApproval)
    bot = _pems(stack, tmp_path, f"spiffe://{stack.trust_domain}/approval-bot/cli")
    listed = await _json(broker, bot, "approvals", "ls")
    assert pending.approval_id in [a["id"] for a in listed]
    result = await _cli(
        broker, bot, "approvals", "approve", pending.approval_id, "--comment", "OPS-1234 ok"
    )
    assert result.exit_code == 0, result.output
    assert "approved" in result.stdout


async def test_runs_show_then_complete_with_a_final_report(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    broker = running_broker
    run_id, credential = await _issue(stack, broker, tmp_path)
    assert isinstance(credential, Credential)
    admin = _pems(stack, tmp_path, workload_id(stack, "admin"))
    view = await _json(broker, admin, "runs", "show", run_id)
    assert (view["state"], view["owner"]) == ("active", "alice@example.test")
    assert [(x["credential_id"], x["state"]) for x in view["credentials"]] == [
        (credential.credential_id, "active")
    ]
    table = await _cli(broker, admin, "runs", "show", run_id)
    assert table.exit_code == 0, table.output
    assert f"run {run_id} (active)" in table.stdout

    ended = await _cli(broker, admin, "runs", "complete", run_id, "--outcome", "cancelled")
    assert ended.exit_code == 0, ended.output
    assert "1 confirmed revoked, 0 still live" in ended.stdout
    view = await _json(broker, admin, "runs", "show", run_id)
    assert (view["state"], view["outcome"]) == ("cancelled", "cancelled")
    assert [x["state"] for x in view["credentials"]] == ["revoked"]

    unknown = await _cli(broker, admin, "runs", "show", "wf-nowhere")
    assert unknown.exit_code == 1
    assert "workflow.not_found" in unknown.output


async def test_runs_ls_lists_an_owners_runs_latest_over_first_and_pages(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    """Three runs of one owner among the session's others: the CLI lists them by deadline,
    latest first; the SDK pages through them with the cursor; an orchestrator may not list
    another's runs, an agent none, and a cursor that was never given is a 400."""
    broker = running_broker
    owner = f"dana-{secrets.token_hex(3)}@example.test"
    orchestrator_paths = _pems(stack, tmp_path, workload_id(stack, "orchestrator"))
    async with OrchestratorClient(broker.url, _sdk(orchestrator_paths)) as client:
        for ttl in (600, 900, 700):
            await client.start_run(
                f"wf-ls-{ttl}-{secrets.token_hex(2)}",
                owner=owner,
                purpose="listing OPS-77",
                ttl_seconds=ttl,
                labels={"ticket": f"OPS-{ttl}", "team": "finance"},
            )
        with pytest.raises(ApiError) as refused:
            await client.list_runs(started_by="spiffe://tasklease.test/orchestrator/other")
        assert (refused.value.status, refused.value.reason) == (403, "auth.not_your_runs")
        mine = await client.list_runs(owner=owner)
        assert len(mine["runs"]) == 3
    admin = _pems(stack, tmp_path, workload_id(stack, "admin"))
    listed = await _json(broker, admin, "runs", "ls", "--owner", owner)
    assert [run["id"].split("-")[2] for run in listed] == ["900", "700", "600"]
    assert {run["state"] for run in listed} == {"active"}
    ticket = await _json(
        broker, admin, "runs", "ls", "--label", "ticket=OPS-700", "--label", "team=finance"
    )
    assert [run["id"].split("-")[2] for run in ticket] == ["700"]
    bad_label = await _cli(broker, admin, "runs", "ls", "--label", "ticket")
    assert bad_label.exit_code == 2  # a usage error: nothing asked
    table = await _cli(broker, admin, "runs", "ls", "--owner", owner, "--limit", "2")
    assert table.exit_code == 0, table.output
    assert "2 runs" in table.stdout

    async with AdminClient(broker.url, _sdk(admin)) as client:
        seen: list[str] = []
        cursor = None
        for _ in range(50):
            page = await client.list_runs(owner=owner, states=("active",), limit=1, cursor=cursor)
            seen += [run["id"] for run in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [run["id"] for run in listed]
        with pytest.raises(ApiError) as bad:
            await client.list_runs(cursor="not-a-cursor")
        assert (bad.value.status, bad.value.reason) == (400, "query.invalid")
    agent = _pems(stack, tmp_path, workload_id(stack, "agent"))
    forbidden = await _cli(broker, agent, "runs", "ls")
    assert forbidden.exit_code == 1
    assert "auth.role_required" in forbidden.stderr


async def test_errors_are_clear_with_exit_codes(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    agent = _pems(stack, tmp_path, workload_id(stack, "agent"))
    forbidden = await _cli(running_broker, agent, "leases", "ls", "--all")
    assert forbidden.exit_code == 1
    assert "auth.role_required" in forbidden.stderr
    nobody = await _cli(running_broker, None, "targets", "ls")
    assert nobody.exit_code == 3
    assert "no identity" in nobody.stderr
    half = await _cli(running_broker, None, "--cert", str(agent["cert"]), "targets", "ls")
    assert half.exit_code == 3


async def test_audit_trace_tail_and_verify_over_https(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    """`tasklease audit … --remote` reads GET /v1/audit with the admin's own identity."""
    broker = running_broker
    run_id, credential = await _issue(stack, broker, tmp_path)
    assert isinstance(credential, Credential)
    admin = _pems(stack, tmp_path, workload_id(stack, "admin"))
    done = await _cli(broker, admin, "revoke", "--run", run_id, "--reason", "INC-8", "--yes")
    assert done.exit_code == 0, done.output

    trace = await _cli(broker, admin, "audit", "trace", run_id, "--remote")
    assert trace.exit_code == 0, trace.output
    assert f"Run {run_id}" in trace.stdout
    assert credential.credential_id[:9] in trace.stdout
    assert "INC-8" in trace.stdout
    assert credential.secret["password"] not in trace.stdout

    tail = await _cli(broker, admin, "audit", "tail", "--remote", "-n", "3", "--format", "json")
    assert tail.exit_code == 0, tail.output
    lines = [json.loads(line) for line in tail.stdout.splitlines() if line.strip()]
    assert len(lines) == 3
    assert all("hash" in record and "type" in record for record in lines)

    verify = await _cli(broker, admin, "audit", "verify", "--remote")
    assert verify.exit_code == 0, verify.output
    assert "OK: every chain verifies" in verify.stdout

    agent = _pems(stack, tmp_path, workload_id(stack, "agent"))
    refused = await _cli(broker, agent, "audit", "trace", run_id, "--remote")
    assert refused.exit_code == 1
    assert "auth.role_required" in refused.stderr
