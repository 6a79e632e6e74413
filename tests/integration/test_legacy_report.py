"""Legacy targets on the real stack: an agent gets the shipped ``legacy-crm`` target (a task
token that reads a standing static secret in OpenBao's KV), capped at 5 minutes by the
default policies; the burn-down report then shows who uses it, through the API, the SDK and
``tasklease report legacy``, and ``tasklease_legacy_requests_total`` counts the request."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import pytest

from broker.bootstrap import RunningBroker
from broker.client import AdminClient, AgentClient, ApiError, Credential, OrchestratorClient
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import client_context, openbao_root, workload_id
from tests.integration.test_cli_remote import _cli, _json, _pems, _sdk
from tests.integration.test_metrics import scrape, value

pytestmark = pytest.mark.stack


async def test_a_legacy_credential_is_capped_and_shows_in_the_burn_down(
    stack: DevStack, running_broker: RunningBroker, tmp_path: Path
) -> None:
    broker = running_broker
    assert stack.endpoints is not None
    began = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    agent_id = workload_id(stack, "agent")
    run_id = f"wf-legacy-{secrets.token_hex(3)}"
    orchestrator = _sdk(_pems(stack, tmp_path, workload_id(stack, "orchestrator")))
    async with OrchestratorClient(broker.url, orchestrator) as client:
        await client.start_run(
            run_id,
            owner="carol@example.test",
            purpose="CRM sync OPS-77",
            ttl_seconds=600,
            participants=[agent_id],
        )
    async with AgentClient(broker.url, _sdk(_pems(stack, tmp_path, agent_id))) as client:
        credential = await client.request_credential(
            workflow=run_id, task="sync", target="legacy-crm", ttl_seconds=900
        )
    assert isinstance(credential, Credential)
    token = remember_secret(credential.secret["token"])

    # The task token reads the static secret, and nothing else; 5 minutes at most.
    task = hvac.Client(url=stack.endpoints.openbao_addr, token=token)
    read = task.secrets.kv.v2.read_secret_version(
        path="legacy/crm", mount_point="kv", raise_on_deleted_version=True
    )
    assert read["data"]["data"]["username"] == "crm-sync"
    remember_secret(read["data"]["data"]["password"])
    with pytest.raises(hvac.exceptions.Forbidden):
        task.secrets.kv.v2.read_secret_version(
            path="demo/app", mount_point="kv", raise_on_deleted_version=True
        )
    lookup = openbao_root(stack).auth.token.lookup(token)["data"]
    assert lookup["policies"] == ["target-legacy-crm"]
    assert 0 < lookup["ttl"] <= 300
    assert credential.ttl_seconds <= 300
    assert "legacy-short-ttl" in credential.policy_ids

    admin = _pems(stack, tmp_path, workload_id(stack, "admin"))
    async with AdminClient(broker.url, _sdk(admin)) as client:
        report = await client.legacy_report(since=began)
    assert datetime.fromisoformat(report["since"]) == began
    [crm] = [t for t in report["targets"] if t["target"]["name"] == "legacy-crm"]
    assert crm["target"]["legacy"] is True
    assert (crm["credentials"], crm["live"], crm["runs"], crm["complete"]) == (1, 1, 1, True)
    assert crm["holders"] == [
        {"who": agent_id, "credentials": 1, "last_issued_at": crm["last_issued_at"]}
    ]
    assert [(o["who"], o["credentials"]) for o in crm["owners"]] == [("carol@example.test", 1)]
    assert token not in json.dumps(report)  # metadata only

    # The CLI: JSON, and the table naming the holder.
    as_json = await _json(broker, admin, "report", "legacy", "--since", began.isoformat())
    assert [t["credentials"] for t in as_json["targets"]] == [1]
    table = await _cli(broker, admin, "report", "legacy", "--days", "1")
    assert table.exit_code == 0, table.output
    assert f"legacy-crm: held by {agent_id} (1); for carol@example.test (1)" in table.stdout

    # Admins only; a bad since is a typed 400.
    agent = _sdk(_pems(stack, tmp_path, agent_id))
    async with AdminClient(broker.url, agent) as client:
        with pytest.raises(ApiError) as refused:
            await client.legacy_report()
    assert (refused.value.status, refused.value.reason) == (403, "auth.role_required")
    async with AdminClient(broker.url, _sdk(admin)) as client:
        with pytest.raises(ApiError) as bad:
            await client.call("GET", "/v1/reports/legacy", params=[("since", "yesterday")])
    assert (bad.value.status, bad.value.reason) == (400, "query.invalid")

    # The trend beyond the ledger: the request was counted under the target's name.
    _, samples = await scrape(broker, client_context(stack, tmp_path, workload_id(stack, "admin")))
    issued = value(
        samples, "tasklease_legacy_requests_total", target="legacy-crm", outcome="issued"
    )
    assert issued >= 1
