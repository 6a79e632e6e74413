"""Issuance end to end through the HTTP API on the real stack: an orchestrator starts a run, an
agent with a SPIRE SVID exchanges it for per-task credentials of every kind."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.bootstrap import RunningBroker
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import (
    StartBroker,
    call,
    client_context,
    token_accessors,
    workload_id,
)
from tests.integration.clients import openbao_root as _root
from tests.integration.clients import orders_as as _pg_rows

pytestmark = pytest.mark.stack


class Actors:
    """The demo orchestrator, agent and a stranger agent, each with its own real SVID."""

    def __init__(self, stack: DevStack, tmp_path: Path) -> None:
        self.stack = stack
        self.orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
        self.agent = client_context(stack, tmp_path, workload_id(stack, "agent"))
        self.other_agent_id = f"spiffe://{stack.trust_domain}/agent/other"
        self.other_agent = client_context(stack, tmp_path, self.other_agent_id)
        self.anonymous = client_context(stack, tmp_path)

    async def start_run(self, broker: RunningBroker, **overrides: Any) -> str:
        run_id = f"wf-{secrets.token_hex(4)}"
        body = {
            "id": run_id,
            "owner": "alice@example.test",
            "purpose": "nightly reconciliation OPS-1234",
            "ttl_seconds": 600,
            "labels": {"ticket": "OPS-1234"},
            "participants": [workload_id(self.stack, "agent")],
            **overrides,
        }
        status, run = await call(broker, self.orchestrator, "POST", "/v1/workflows", json_body=body)
        assert status == 201, run
        return run_id

    async def request(
        self,
        broker: RunningBroker,
        run_id: str,
        target: str,
        *,
        ttl: int = 60,
        context: Any = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> tuple[int, dict[str, Any]]:
        body = {
            "workflow_id": run_id,
            "task_id": "task-1",
            "target": target,
            "ttl_seconds": ttl,
            "justification": "read the orders table",
            **extra,
        }
        return await call(
            broker,
            context or self.agent,
            "POST",
            "/v1/credentials",
            json_body=body,
            headers=headers,
        )


@pytest.fixture
def actors(stack: DevStack, tmp_path: Path) -> Actors:
    return Actors(stack, tmp_path)


async def test_an_agent_gets_database_credentials_for_one_task_and_queries(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    status, issued = await actors.request(broker, run_id, "demo-db", ttl=60)
    assert status == 201, issued
    secret = issued["secret"]
    remember_secret(secret["password"])
    assert await asyncio.to_thread(_pg_rows, stack, secret["username"], secret["password"]) == 3
    assert (issued["state"], issued["kind"], issued["holder"], issued["owner"]) == (
        "active",
        "database",
        workload_id(stack, "agent"),
        "alice@example.test",
    )
    assert 0 < issued["ttl_seconds"] <= 60
    assert [hop["role"] for hop in issued["delegation_chain"]] == ["owner", "orchestrator", "agent"]
    # OpenBao holds the bound: the task token's TTL and metadata.
    token = _root(stack).auth.token.lookup_accessor(issued["token_accessor"])["data"]
    assert 0 < token["ttl"] <= 60
    assert token["meta"]["credential_id"] == issued["credential_id"]
    assert token["meta"]["workflow_id"] == run_id
    assert token["meta"]["task_id"] == "task-1"
    assert token["meta"]["holder"] == workload_id(stack, "agent")
    assert token["meta"]["owner"] == "alice@example.test"
    # The orchestrator sees the credential's metadata (never the secret).
    status, run = await call(broker, actors.orchestrator, "GET", f"/v1/workflows/{run_id}")
    assert status == 200
    (listed,) = run["credentials"]
    assert listed["credential_id"] == issued["credential_id"]
    assert "secret" not in listed
    assert secret["password"] not in str(run)


async def test_pki_certificate_not_after_is_within_the_ttl(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    status, issued = await actors.request(broker, run_id, "demo-cert", ttl=120)
    assert status == 201, issued
    cert = x509.load_pem_x509_certificate(issued["secret"]["certificate"].encode())
    assert cert.not_valid_after_utc <= datetime.fromisoformat(issued["expires_at"]) + timedelta(
        seconds=2
    )
    assert cert.not_valid_after_utc <= datetime.now(UTC) + timedelta(seconds=122)
    remember_secret(issued["secret"]["private_key"].splitlines()[1])


async def test_ssh_certificate_is_clamped_and_says_it_cannot_be_revoked(
    stack: DevStack, start: StartBroker, actors: Actors, tmp_path: Path
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    public = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    status, issued = await actors.request(
        broker, run_id, "demo-ssh", ttl=3600, params={"public_key": public}
    )
    assert status == 201, issued
    assert issued["revocable"] is False
    assert "cannot be revoked early" in issued["note"]
    # demo-ssh's max_ttl (5 min) clamps the 1 h request.
    assert issued["ttl_seconds"] <= 300
    cert_file = tmp_path / "agent-cert.pub"
    cert_file.write_text(issued["secret"]["signed_key"])
    keygen = shutil.which("ssh-keygen")
    assert keygen is not None
    listing = await asyncio.to_thread(
        subprocess.run,
        [keygen, "-L", "-f", str(cert_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "user certificate" in listing.stdout
    valid_line = next(line for line in listing.stdout.splitlines() if "Valid:" in line)
    until = datetime.fromisoformat(valid_line.split(" to ")[1].strip())
    # ssh-keygen prints local time without a zone; the certificate is at most 5 min + skew.
    assert until - datetime.now() <= timedelta(seconds=302)  # noqa: DTZ005 - ssh-keygen's local time


async def test_vault_token_kind_returns_a_task_token_with_the_target_policies(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    status, issued = await actors.request(broker, run_id, "demo-kv", ttl=30)
    assert status == 201, issued
    assert stack.endpoints is not None
    task = hvac.Client(
        url=stack.endpoints.openbao_addr, token=remember_secret(issued["secret"]["token"])
    )
    read = task.secrets.kv.v2.read_secret_version(
        path="demo/app", mount_point="kv", raise_on_deleted_version=True
    )
    assert read["data"]["data"]["note"] == "demo value, not a credential"
    # Only the target's policy (not even `default`), and the granted TTL.
    lookup = _root(stack).auth.token.lookup_accessor(issued["token_accessor"])["data"]
    assert lookup["policies"] == ["target-demo-kv"]
    assert lookup["ttl"] <= 30


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-target", (404, "target.unknown")),
        ("not-participant", (403, "policy.deny")),
        ("unknown-run", (404, "workflow.not_found")),
        ("bad-body", (400, "body.invalid")),
        ("orchestrator-asks", (403, "auth.role_required")),
    ],
)
async def test_refusals_are_typed_problems(
    stack: DevStack, start: StartBroker, actors: Actors, case: str, expected: tuple[int, str]
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    if case == "unknown-target":
        status, body = await actors.request(broker, run_id, "no-such-target")
    elif case == "not-participant":
        status, body = await actors.request(broker, run_id, "demo-db", context=actors.other_agent)
        assert "agent-request" in body["detail"] or body["policy_ids"]
    elif case == "unknown-run":
        status, body = await actors.request(broker, "wf-nope", "demo-db")
    elif case == "bad-body":
        status, body = await call(
            broker,
            actors.agent,
            "POST",
            "/v1/credentials",
            json_body={"workflow_id": run_id, "evil": "\r\n"},
        )
    else:
        status, body = await actors.request(broker, run_id, "demo-db", context=actors.orchestrator)
    assert (status, body.get("reason")) == expected, body
    assert body["type"].startswith("https://tasklease.dev/problems/")


async def test_a_run_past_its_deadline_issues_nothing(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker, ttl_seconds=1)
    await asyncio.sleep(1.2)
    status, body = await actors.request(broker, run_id, "demo-db")
    assert (status, body["reason"]) == (409, "workflow.not_active")


async def test_a_retried_request_with_the_same_idempotency_key_never_mints_twice(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    headers = {"Idempotency-Key": f"retry-{secrets.token_hex(4)}"}
    first_status, first = await actors.request(broker, run_id, "demo-kv", headers=headers)
    assert first_status == 201
    remember_secret(first["secret"]["token"])
    again_status, again = await actors.request(broker, run_id, "demo-kv", headers=headers)
    assert (again_status, again["reason"], again["credential_id"]) == (
        409,
        "idempotency.replayed",
        first["credential_id"],
    )
    assert "secret" not in again
    # Same key, different request: a conflict, not a replay.
    other_status, other = await actors.request(broker, run_id, "demo-db", headers=headers)
    assert (other_status, other["reason"]) == (409, "idempotency.key_reused")


async def test_a_jwt_svid_bounds_the_credential_ttl(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    """TTL = min(..., JWT-SVID expiry - now): a credential never outlives the proof."""
    broker = await start()
    run_id = await actors.start_run(broker)
    jwt_svid = stack.mint_jwt_svid(
        workload_id(stack, "agent"), audience="tasklease", ttl_seconds=40
    )
    status, issued = await actors.request(
        broker,
        run_id,
        "demo-kv",
        ttl=600,
        context=actors.anonymous,
        headers={"Authorization": f"Bearer {jwt_svid}"},
    )
    assert status == 201, issued
    remember_secret(issued["secret"]["token"])
    assert issued["ttl_seconds"] <= 40


async def test_openbao_down_is_a_503_and_leaves_no_live_credential(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    stack.stop_openbao()
    try:
        status, body = await actors.request(broker, run_id, "demo-db")
    finally:
        stack.start_openbao_again()
    assert (status, body["code"]) == (503, "vault_unavailable")
    status, run = await call(broker, actors.orchestrator, "GET", f"/v1/workflows/{run_id}")
    assert [c for c in run["credentials"] if c["state"] == "active"] == []


async def test_redis_down_is_a_503_and_nothing_is_minted(
    stack: DevStack, start: StartBroker, actors: Actors
) -> None:
    broker = await start()
    run_id = await actors.start_run(broker)
    before = token_accessors(stack)
    stack.processes["redis"].stop()
    try:
        status, body = await actors.request(broker, run_id, "demo-db")
    finally:
        stack.restart_redis()
    assert (status, body["code"]) == (503, "ledger_unavailable")
    assert token_accessors(stack) - before == set()  # no task token was minted


async def test_a_quarantine_blocks_issuance_until_lifted_or_expired(
    stack: DevStack, start: StartBroker, actors: Actors, tmp_path: Path
) -> None:
    broker = await start()
    admin = client_context(stack, tmp_path, workload_id(stack, "admin"))
    run_id = await actors.start_run(broker)
    agent = workload_id(stack, "agent")
    for kind, value in [
        ("identity", agent),
        ("identity_prefix", agent.rsplit("/", 1)[0] + "/"),
        ("workflow", run_id),
        ("target", "demo-kv"),
    ]:
        status, body = await call(
            broker,
            admin,
            "POST",
            "/v1/quarantines",
            json_body={
                "kind": kind,
                "value": value,
                "reason": "incident INC-7",
                "ttl_seconds": 600,
            },
        )
        assert status == 201, body
        status, refused = await actors.request(broker, run_id, "demo-kv")
        assert (status, refused["reason"]) == (403, "quarantine.active"), (kind, refused)
        status, _ = await call(
            broker, admin, "DELETE", "/v1/quarantines", json_body={"kind": kind, "value": value}
        )
        assert status == 200
    status, issued = await actors.request(broker, run_id, "demo-kv")
    assert status == 201
    remember_secret(issued["secret"]["token"])
    # An expiring quarantine lifts itself.
    status, _ = await call(
        broker,
        admin,
        "POST",
        "/v1/quarantines",
        json_body={"kind": "target", "value": "demo-kv", "reason": "short", "ttl_seconds": 1},
    )
    assert status == 201
    status, listed = await call(broker, admin, "GET", "/v1/quarantines")
    assert [q["value"] for q in listed["quarantines"]] == ["demo-kv"]
    await asyncio.sleep(1.2)
    status, issued = await actors.request(broker, run_id, "demo-kv")
    assert status == 201, issued
    remember_secret(issued["secret"]["token"])
    # Only admins quarantine.
    status, body = await call(
        broker,
        actors.agent,
        "POST",
        "/v1/quarantines",
        json_body={"kind": "target", "value": "demo-kv", "reason": "x", "ttl_seconds": 60},
    )
    assert (status, body["reason"]) == (403, "auth.role_required")
