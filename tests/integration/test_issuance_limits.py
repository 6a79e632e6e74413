"""Live-credential limits end to end on the real stack: a broker process-alike with a limit per
identity and a target with a cap of its own; an agent with a real SPIRE SVID fills them, gets
``429 limit_exceeded`` with ``Retry-After``, and frees a slot by releasing a credential."""

from __future__ import annotations

import secrets
import ssl
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.bootstrap import RunningBroker
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import (
    StartBroker,
    call,
    client_context,
    start_run,
    token_alive,
    workload_id,
)

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]


def _targets_with_kv_cap(tmp_path: Path, cap: int) -> Path:
    """The repository's catalog, with ``demo-kv`` capped at ``cap`` live credentials per
    identity (the rest unchanged)."""
    text = (REPO / "config" / "targets.toml").read_text()
    catalog = tomllib.loads(text)
    assert any(entry["name"] == "demo-kv" for entry in catalog["target"])
    marker = 'name = "demo-kv"\n'
    assert text.count(marker) == 1
    path = tmp_path / "targets.toml"
    path.write_text(text.replace(marker, f"{marker}max_live_per_identity = {cap}\n"))
    return path


async def _agent_of_its_own(
    stack: DevStack, broker: RunningBroker, tmp_path: Path, label: str, purpose: str
) -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    """A fresh agent identity (the session's other tests leave live credentials of the demo
    agent behind, which would count against it) and a run of alice's with it as the one
    participant: the agent's and the orchestrator's TLS contexts and the run id."""
    agent_id = f"spiffe://{stack.trust_domain}/agent/{label}-{secrets.token_hex(4)}"
    agent = client_context(stack, tmp_path, agent_id)
    orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
    run_id = f"wf-{secrets.token_hex(4)}"
    await start_run(
        stack,
        broker,
        orchestrator,
        run_id,
        owner="alice@example.test",
        purpose=purpose,
        participant=agent_id,
    )
    return agent, orchestrator, run_id


async def _ask(
    broker: RunningBroker, agent: ssl.SSLContext, run_id: str, target: str, task: str
) -> tuple[int, dict[str, Any], str | None]:
    """POST /v1/credentials; status, body and the Retry-After header."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{broker.url}/v1/credentials",
            ssl=agent,
            json={"workflow_id": run_id, "task_id": task, "target": target, "ttl_seconds": 120},
            headers={"Idempotency-Key": f"tlk-{secrets.token_hex(8)}"},
        ) as response,
    ):
        body = await response.json(content_type=None)
        if response.status == 201:
            for value in body["secret"].values():
                if isinstance(value, str) and len(value) >= 8:
                    remember_secret(value)
        return response.status, body, response.headers.get("Retry-After")


async def test_live_credentials_are_capped_per_identity_and_per_target(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start(
        TASKLEASE_ISSUANCE__LIVE_CREDENTIALS_PER_IDENTITY="3",
        TASKLEASE_TARGETS_FILE=str(_targets_with_kv_cap(tmp_path, 1)),
    )
    agent, orchestrator, run_id = await _agent_of_its_own(
        stack, broker, tmp_path, "capped", "limits OPS-1"
    )

    # demo-kv is capped at one live credential per identity.
    status, first, _ = await _ask(broker, agent, run_id, "demo-kv", "t1")
    assert status == 201, first
    status, refused, retry_after = await _ask(broker, agent, run_id, "demo-kv", "t2")
    assert (status, refused["code"], refused["reason"], refused["limit"]) == (
        429,
        "limit_exceeded",
        "limit.live_per_target",
        1,
    )
    assert retry_after is not None
    # Until the end of the minute the 120 s credential expires in (counts are per minute).
    assert 120 - 5 <= int(retry_after) <= 120 + 60
    assert refused["retry_after_seconds"] == int(retry_after)
    assert "secret" not in refused

    # Other targets count against the identity-wide limit of three.
    for task in ("t3", "t4"):
        status, issued, _ = await _ask(broker, agent, run_id, "demo-db", task)
        assert status == 201, issued
    status, refused, retry_after = await _ask(broker, agent, run_id, "demo-db", "t5")
    assert (status, refused["reason"], refused["limit"]) == (429, "limit.live_per_identity", 3)
    assert retry_after is not None

    # Nothing was minted or recorded for the refused requests: the run lists three leases.
    status, view = await call(broker, orchestrator, "GET", f"/v1/workflows/{run_id}")
    assert status == 200, view
    assert len(view["credentials"]) == 3

    # Releasing the demo-kv credential frees both its slots: the next demo-kv is issued.
    status, report = await call(
        broker, agent, "DELETE", f"/v1/credentials/{first['credential_id']}"
    )
    assert (status, report["complete"]) == (200, True)
    assert not token_alive(stack, first["token_accessor"])
    status, again, _ = await _ask(broker, agent, run_id, "demo-kv", "t6")
    assert status == 201, again

    # Another identity is not held back by this one's credentials (a fresh one too: the demo
    # agent may hold more than three live credentials of the session's other tests).
    other_agent, _, other_run_id = await _agent_of_its_own(
        stack, broker, tmp_path, "uncapped", "limits OPS-1"
    )
    status, other, _ = await _ask(broker, other_agent, other_run_id, "demo-db", "t1")
    assert status == 201, other


async def test_an_identity_is_issued_at_most_its_rate(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start(TASKLEASE_ISSUANCE__CREDENTIALS_PER_IDENTITY_PER_MINUTE="2")
    agent, orchestrator, run_id = await _agent_of_its_own(
        stack, broker, tmp_path, "paced", "rate OPS-2"
    )
    for task in ("t1", "t2"):  # the bucket holds two
        status, issued, _ = await _ask(broker, agent, run_id, "demo-kv", task)
        assert status == 201, issued
    status, refused, retry_after = await _ask(broker, agent, run_id, "demo-kv", "t3")
    assert (status, refused["code"], refused["reason"], refused["limit"]) == (
        429,
        "limit_exceeded",
        "limit.rate_per_identity",
        2,
    )
    # One token every 30 s; the two were taken a moment ago.
    assert retry_after is not None
    assert 20 <= int(retry_after) <= 30
    status, view = await call(broker, orchestrator, "GET", f"/v1/workflows/{run_id}")
    assert status == 200, view
    assert len(view["credentials"]) == 2


async def test_an_orchestrator_starts_at_most_its_rate_of_runs(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    broker = await start(TASKLEASE_ISSUANCE__RUNS_PER_IDENTITY_PER_MINUTE="2")
    # An orchestrator of its own (the demo orchestrator starts the session's other runs).
    orchestrator_id = f"spiffe://{stack.trust_domain}/orchestrator/paced-{secrets.token_hex(4)}"
    orchestrator = client_context(stack, tmp_path, orchestrator_id)
    body = {"owner": "alice@example.test", "purpose": "rate OPS-3", "ttl_seconds": 600}

    async def start_one() -> tuple[int, dict[str, Any], str | None]:
        run_id = f"wf-{secrets.token_hex(4)}"
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{broker.url}/v1/workflows", ssl=orchestrator, json={"id": run_id, **body}
            ) as response,
        ):
            return response.status, await response.json(), response.headers.get("Retry-After")

    for _ in range(2):  # the bucket holds two
        status, started, _ = await start_one()
        assert status == 201, started
    status, refused, retry_after = await start_one()
    assert (status, refused["code"], refused["reason"], refused["limit"]) == (
        429,
        "limit_exceeded",
        "limit.runs_per_identity",
        2,
    )
    assert retry_after is not None
    assert 20 <= int(retry_after) <= 30  # one token every 30 s
