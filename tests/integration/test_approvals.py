"""Approvals end to end on the real stack: an agent's restricted request waits (202), a person
with an OIDC ID token from a test issuer approves, the agent retries with the approval id and
gets a credential that really logs into PostgreSQL; quorum, separation of duties, single use,
binding to the request, expiry and withdrawal; signed webhooks to a receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from broker.adapters.webhook_notifier import verify_signature
from broker.bootstrap import RunningBroker
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import StartBroker, call, client_context, workload_id
from tests.integration.clients import orders_as as _orders_as
from tests.jwt_tokens import Signer, ec_key, token

pytestmark = pytest.mark.stack

ISSUER = "https://idp.approvals.tasklease.test/realms/ops"
WEBHOOK_SECRET = remember_secret("whsec-e2e-" + "5be1" * 10)
SECRET_ENV = "TASKLEASE_TEST_WEBHOOK_SECRET"
TWO_PERSON_RULE = """
// Test-only: prod-db needs two distinct approvers.
@id("prod-db-two-person-rule")
@approval("required")
@quorum("2")
@reason("prod-db needs two approvers")
forbid (principal, action == Action::"request_credential", resource)
when { resource.name == "prod-db" }
unless { context.approval.approved && context.approval.approver_count >= 2 };
"""
# Test-only: a restricted target whose mint OpenBao refuses (the task token's policy does not
# cover this database role, so reading its credentials is a 403 and the token is revoked).
REFUSED_TARGET = """
[[target]]
name = "prod-db-refused"
kind = "database"
description = "restricted target whose credential read OpenBao refuses (test)"
mount = "database"
role = "no-such-role"
policies = ["target-demo-db"]
system = "demo-postgres"
environment = "production"
sensitivity = "restricted"
max_ttl = "15m"
"""


@dataclass
class Webhooks:
    """A receiver on 127.0.0.1 that checks every signature."""

    url: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_signature(
            WEBHOOK_SECRET.encode(),
            timestamp=request.headers.get("X-Tasklease-Timestamp", ""),
            body=body,
            signature=request.headers.get("X-Tasklease-Signature", ""),
            now=time.time(),
        ):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.events.append(json.loads(body))
        return web.Response(status=204)

    async def wait_for(self, event: str, approval_id: str, step: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for seen in self.events:
                data = seen["data"]
                if (seen["type"], data["approval"]["id"], data["step"]) == (
                    event,
                    approval_id,
                    step,
                ):
                    return seen
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event}/{step} webhook for {approval_id}: {self.events}")


@pytest.fixture
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()
    app = web.Application()
    app.router.add_post("/tasklease", hooks.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hooks.url = f"http://127.0.0.1:{runner.addresses[0][1]}/tasklease"
    try:
        yield hooks
    finally:
        await runner.cleanup()


class World:
    """The demo orchestrator and agents (real SVIDs), people from a test OIDC issuer, and the
    broker configuration that ties them together."""

    def __init__(self, stack: DevStack, tmp_path: Path, webhooks: Webhooks) -> None:
        self.stack = stack
        self.tmp_path = tmp_path
        self.webhooks = webhooks
        self.agent_id = workload_id(stack, "agent")
        self.orchestrator = client_context(stack, tmp_path, workload_id(stack, "orchestrator"))
        self.agent = client_context(stack, tmp_path, self.agent_id)
        self.other_agent = client_context(
            stack, tmp_path, f"spiffe://{stack.trust_domain}/agent/other"
        )
        self.admin = client_context(stack, tmp_path, workload_id(stack, "admin"))
        self.anonymous = client_context(stack, tmp_path)
        self.signer = Signer(kid="approvals-idp-1", key=ec_key(label="approvals-idp"), alg="ES256")
        jwks = tmp_path / "idp-jwks.json"
        jwks.write_text(json.dumps({"keys": [{**self.signer.jwk(), "use": "sig"}]}))
        self.identities = tmp_path / "identities.toml"
        self.identities.write_text(
            Path("config/identities.toml").read_text()
            # The demo agent is also an approver here, to show it still cannot approve itself.
            + f'\n[[workload]]\npattern = "{self.agent_id}"\nroles = ["approver"]\n'
            + f'\n[[oidc_issuer]]\nissuer = "{ISSUER}"\naudience = "tasklease"\n'
            f'algorithms = ["ES256"]\njwks_file = "{jwks}"\n'
            f'\n[[human]]\nissuer = "{ISSUER}"\nclaim = "groups"\nvalue = "approvers"\n'
            'roles = ["approver"]\n'
        )

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "TASKLEASE_IDENTITIES_FILE": str(self.identities),
            "TASKLEASE_NOTIFICATIONS__WEBHOOK_URLS": json.dumps([self.webhooks.url]),
            "TASKLEASE_NOTIFICATIONS__WEBHOOK_SECRET_ENV": SECRET_ENV,
            SECRET_ENV: WEBHOOK_SECRET,
            **extra,
        }

    def policy_dir_with(self, extra: str) -> Path:
        policies = self.tmp_path / "policies"
        shutil.copytree("config/policies", policies)
        (policies / "zz-test-extra.cedar").write_text(extra)
        return policies

    def person(self, name: str, groups: tuple[str, ...] = ("approvers",)) -> dict[str, str]:
        """Authorization header with an ID token for ``name``@example.test."""
        issued = int(time.time())
        id_token = token(
            self.signer,
            sub=name,
            claims={
                "iss": ISSUER,
                "aud": "tasklease",
                "iat": issued,
                "exp": issued + 300,
                "email": f"{name}@example.test",
                "groups": list(groups),
            },
        )
        return {"Authorization": f"Bearer {id_token}"}

    @staticmethod
    def principal(name: str) -> str:
        return f"oidc:{ISSUER}#{name}"

    async def start_run(self, broker: RunningBroker, owner: str = "alice@example.test") -> str:
        run_id = f"wf-{secrets.token_hex(4)}"
        status, body = await call(
            broker,
            self.orchestrator,
            "POST",
            "/v1/workflows",
            json_body={
                "id": run_id,
                "owner": owner,
                "purpose": "quarterly close INC-77",
                "ttl_seconds": 900,
                "labels": {"ticket": "OPS-1234"},
                "participants": [self.agent_id],
            },
        )
        assert status == 201, body
        return run_id

    async def ask(
        self,
        broker: RunningBroker,
        run_id: str,
        *,
        task: str = "close-books",
        ttl: int = 120,
        approval_id: str | None = None,
        context: Any = None,
        target: str = "prod-db",
    ) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {
            "workflow_id": run_id,
            "task_id": task,
            "target": target,
            "ttl_seconds": ttl,
            "justification": "read the ledger for the quarterly close",
        }
        if approval_id is not None:
            body["approval_id"] = approval_id
        return await call(broker, context or self.agent, "POST", "/v1/credentials", json_body=body)

    async def decide(
        self, broker: RunningBroker, approval_id: str, who: Any, decision: str = "approve"
    ) -> tuple[int, dict[str, Any]]:
        context, headers = (self.anonymous, who) if isinstance(who, dict) else (who, None)
        return await call(
            broker,
            context,
            "POST",
            f"/v1/approvals/{approval_id}/decision",
            json_body={"decision": decision, "comment": "checked the ticket"},
            headers=headers,
        )

    async def opened(self, broker: RunningBroker, run_id: str, **kwargs: Any) -> str:
        status, body = await self.ask(broker, run_id, **kwargs)
        assert status == 202, body
        return str(body["approval_id"])


@pytest.fixture
def world(stack: DevStack, tmp_path: Path, webhooks: Webhooks) -> World:
    return World(stack, tmp_path, webhooks)


async def _pending_gauge(broker: RunningBroker, world: World) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/metrics", ssl=world.anonymous) as response,
    ):
        text = await response.text()
    (value,) = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tasklease_approvals_pending"
    ]
    return value


async def test_a_restricted_request_waits_for_a_person_then_the_credential_works(
    stack: DevStack, start: StartBroker, world: World
) -> None:
    broker = await start(**world.env())
    run_id = await world.start_run(broker)
    waiting_before = await _pending_gauge(broker, world)

    status, pending = await world.ask(broker, run_id)
    assert status == 202, pending
    assert await _pending_gauge(broker, world) == waiting_before + 1
    approval_id = pending["approval_id"]
    assert (pending["status"], pending["state"], pending["quorum"], pending["reused"]) == (
        "approval_pending",
        "pending",
        1,
        False,
    )
    assert pending["poll_url"] == f"/v1/approvals/{approval_id}"
    assert "restricted-needs-approval" in pending["policy_ids"]
    requested = await world.webhooks.wait_for("approval.requested", approval_id, "request")
    assert requested["data"]["approval"]["target"] == "prod-db"

    # The identical request reuses the pending approval.
    status, again = await world.ask(broker, run_id)
    assert (status, again["approval_id"], again["reused"]) == (202, approval_id, True)
    # The agent polls; approvers list what waits for them.
    status, polled = await call(broker, world.agent, "GET", pending["poll_url"])
    assert (status, polled["state"], polled["holder"]) == (200, "pending", world.agent_id)
    status, listed = await call(
        broker, world.anonymous, "GET", "/v1/approvals?state=pending", headers=world.person("bob")
    )
    assert status == 200
    assert approval_id in [a["id"] for a in listed["approvals"]]
    # Too early: nobody approved yet.
    status, early = await world.ask(broker, run_id, approval_id=approval_id)
    assert (status, early["reason"]) == (409, "approval.quorum_not_reached")

    status, decided = await world.decide(broker, approval_id, world.person("bob"))
    assert status == 200, decided
    assert (decided["state"], decided["approvers"]) == ("approved", [world.principal("bob")])
    await world.webhooks.wait_for("approval.decided", approval_id, "approve")
    assert await _pending_gauge(broker, world) == waiting_before

    status, issued = await world.ask(broker, run_id, approval_id=approval_id)
    assert status == 201, issued
    secret = issued["secret"]
    remember_secret(secret["password"])
    assert await asyncio.to_thread(_orders_as, stack, secret["username"], secret["password"]) == 3
    assert issued["approval_id"] == approval_id
    status, polled = await call(broker, world.agent, "GET", pending["poll_url"])
    assert (polled["state"], polled["credential_id"]) == ("used", issued["credential_id"])

    # Single use; bound to the exact request.
    status, twice = await world.ask(broker, run_id, approval_id=approval_id)
    assert (status, twice["reason"]) == (409, "approval.used")
    status, other = await world.ask(broker, run_id, task="another-task", approval_id=approval_id)
    assert (status, other["reason"]) == (403, "approval.digest_mismatch")
    status, longer = await world.ask(broker, run_id, ttl=600, approval_id=approval_id)
    assert (status, longer["reason"]) == (403, "approval.digest_mismatch")
    assert world.webhooks.bad_signatures == 0

    # Every step is an audit event, correlated by the approval id.
    status, audit = await call(
        broker,
        world.admin,
        "GET",
        f"/v1/audit?workflow_id={run_id}&type=approval.requested,approval.decided",
    )
    assert status == 200, audit
    steps = [
        (e["type"], e["payload"].get("decision"), e["actor"], e["credential_id"])
        for e in audit["events"]
        if e["approval_id"] == approval_id
    ]
    assert steps == [
        ("approval.requested", None, world.agent_id, ""),
        ("approval.decided", "approve", world.principal("bob"), ""),
        ("approval.decided", "use", world.agent_id, issued["credential_id"]),
    ]
    # The credential's own story includes who approved it and why it was allowed.
    status, story = await call(
        broker, world.admin, "GET", f"/v1/audit?credential_id={issued['credential_id']}"
    )
    assert status == 200, story
    assert [(e["type"], e["payload"].get("decision")) for e in story["events"]] == [
        ("approval.requested", None),
        ("approval.decided", "approve"),
        ("approval.decided", "use"),
        ("policy.decision", None),
        ("credential.issued", None),
    ]


async def test_separation_of_duties_roles_and_a_final_denial(
    start: StartBroker, world: World
) -> None:
    broker = await start(**world.env())
    # The run is owned by carol, named by her principal id.
    run_id = await world.start_run(broker, owner=world.principal("carol"))
    approval_id = await world.opened(broker, run_id)

    status, own = await world.decide(broker, approval_id, world.agent)  # the requester
    assert (status, own["reason"]) == (403, "approval.sod_violation")
    status, owner = await world.decide(broker, approval_id, world.person("carol"))
    assert (status, owner["reason"]) == (403, "approval.sod_violation")
    status, admin = await world.decide(broker, approval_id, world.admin)
    assert (status, admin["reason"]) == (403, "approval.not_approver")
    status, developer = await world.decide(
        broker, approval_id, world.person("dave", groups=("developers",))
    )
    assert (status, developer["reason"]) == (403, "auth.no_role")
    status, hidden = await call(broker, world.other_agent, "GET", f"/v1/approvals/{approval_id}")
    assert (status, hidden["reason"]) == (404, "approval.not_found")
    status, listing = await call(broker, world.other_agent, "GET", "/v1/approvals")
    assert (status, listing["reason"]) == (403, "approval.not_approver")
    # Bad input is a typed 4xx, never a 500.
    bob = world.person("bob")
    for path, expected in (
        ("/v1/approvals?state=bogus", (400, "query.invalid")),
        ("/v1/approvals?limit=0", (400, "query.invalid")),
        ("/v1/approvals/apr_" + "0" * 24, (404, "approval.not_found")),
        ("/v1/approvals/" + "x" * 3000, (404, "approval.not_found")),
    ):
        status, body = await call(broker, world.anonymous, "GET", path, headers=bob)
        assert (status, body["reason"]) == expected, path
    status, bad = await call(
        broker,
        world.anonymous,
        "POST",
        f"/v1/approvals/{approval_id}/decision",
        json_body={"decision": "maybe", "evil": "\r\n"},
        headers=bob,
    )
    assert (status, bad["reason"]) == (400, "body.invalid")

    status, denied = await world.decide(broker, approval_id, world.person("bob"), "deny")
    assert (status, denied["state"], denied["closed_by"]) == (
        200,
        "denied",
        world.principal("bob"),
    )
    await world.webhooks.wait_for("approval.decided", approval_id, "deny")
    status, late = await world.decide(broker, approval_id, world.person("erin"))
    assert (status, late["reason"]) == (409, "approval.denied")
    status, refused = await world.ask(broker, run_id, approval_id=approval_id)
    assert (status, refused["reason"]) == (409, "approval.denied")


async def test_a_quorum_of_two_distinct_approvers(
    stack: DevStack, start: StartBroker, world: World
) -> None:
    broker = await start(
        **world.env(TASKLEASE_POLICY_DIR=str(world.policy_dir_with(TWO_PERSON_RULE)))
    )
    run_id = await world.start_run(broker)
    status, pending = await world.ask(broker, run_id)
    assert (status, pending["quorum"]) == (202, 2), pending
    approval_id = pending["approval_id"]

    status, one = await world.decide(broker, approval_id, world.person("bob"))
    assert (status, one["state"], one["approver_count"]) == (200, "pending", 1)
    status, early = await world.ask(broker, run_id, approval_id=approval_id)
    assert (status, early["reason"]) == (409, "approval.quorum_not_reached")
    status, twice = await world.decide(broker, approval_id, world.person("bob"))
    assert (status, twice["reason"]) == (409, "approval.duplicate_approver")
    # The second approver is an approval bot with its own SVID (identities.toml: approver).
    bot_id = f"spiffe://{stack.trust_domain}/approval-bot/chatops"
    bot = client_context(stack, world.tmp_path, bot_id)
    status, two = await world.decide(broker, approval_id, bot)
    assert (status, two["state"], two["approvers"]) == (
        200,
        "approved",
        [world.principal("bob"), bot_id],
    )
    status, issued = await world.ask(broker, run_id, approval_id=approval_id)
    assert status == 201, issued
    secret = issued["secret"]
    remember_secret(secret["password"])
    assert await asyncio.to_thread(_orders_as, stack, secret["username"], secret["password"]) == 3

    # An approver withdraws the used approval: continuous authorization decides the credential
    # again without it, revokes it, and the database login ends.
    status, withdrawn = await call(
        broker,
        world.anonymous,
        "POST",
        f"/v1/approvals/{approval_id}/withdraw",
        json_body={"comment": "wrong quarter"},
        headers=world.person("erin"),
    )
    assert (status, withdrawn["state"]) == (200, "withdrawn"), withdrawn
    status, credential = await call(
        broker, world.agent, "GET", f"/v1/credentials/{issued['credential_id']}"
    )
    assert (status, credential["state"]) == (200, "revoked"), credential
    with pytest.raises(psycopg.OperationalError):
        await asyncio.to_thread(_orders_as, stack, secret["username"], secret["password"])


async def test_expired_and_withdrawn_approvals_are_refused(
    start: StartBroker, world: World
) -> None:
    broker = await start(**world.env(TASKLEASE_APPROVALS__TTL_SECONDS="6"))
    run_id = await world.start_run(broker)
    expiring = await world.opened(broker, run_id, task="expiring")
    opened_at = time.monotonic()
    status, _ = await world.decide(broker, expiring, world.person("bob"))
    assert status == 200

    # Withdrawn by the requester after approval, before use.
    withdrawn = await world.opened(broker, run_id, task="withdrawn")
    status, _ = await world.decide(broker, withdrawn, world.person("bob"))
    assert status == 200
    status, body = await call(
        broker,
        world.agent,
        "POST",
        f"/v1/approvals/{withdrawn}/withdraw",
        json_body={"comment": "the job was cancelled"},
    )
    assert (status, body["state"], body["closed_by"]) == (200, "withdrawn", world.agent_id)
    await world.webhooks.wait_for("approval.decided", withdrawn, "withdraw")
    status, refused = await world.ask(broker, run_id, task="withdrawn", approval_id=withdrawn)
    assert (status, refused["reason"]) == (409, "approval.withdrawn")
    # Another agent cannot withdraw (or see) someone else's approval.
    status, hidden = await call(
        broker, world.other_agent, "POST", f"/v1/approvals/{expiring}/withdraw"
    )
    assert (status, hidden["reason"]) == (404, "approval.not_found")

    await asyncio.sleep(max(0.0, 6.5 - (time.monotonic() - opened_at)))
    status, expired = await world.ask(broker, run_id, task="expiring", approval_id=expiring)
    assert (status, expired["reason"]) == (409, "approval.expired")
    status, polled = await call(broker, world.agent, "GET", f"/v1/approvals/{expiring}")
    assert (status, polled["state"]) == (200, "expired")
    # Asking again opens a fresh approval.
    fresh = await world.opened(broker, run_id, task="expiring")
    assert fresh != expiring


async def test_an_approval_used_for_a_mint_openbao_refused_is_released(
    start: StartBroker, world: World
) -> None:
    targets = world.tmp_path / "targets.toml"
    targets.write_text(Path("config/targets.toml").read_text() + REFUSED_TARGET)
    broker = await start(**world.env(TASKLEASE_TARGETS_FILE=str(targets)))
    run_id = await world.start_run(broker)
    target = "prod-db-refused"
    approval_id = await world.opened(broker, run_id, target=target)
    status, _ = await world.decide(broker, approval_id, world.person("bob"))
    assert status == 200

    # Refused by OpenBao, nothing minted: the approval is approved and unused again, so the
    # agent's retry with the same approval reaches the mint again (not 409 approval.used).
    for _ in range(2):
        status, refused = await world.ask(broker, run_id, target=target, approval_id=approval_id)
        assert (status, refused["reason"]) == (503, "vault.forbidden"), refused
        status, polled = await call(broker, world.agent, "GET", f"/v1/approvals/{approval_id}")
        assert (status, polled["state"], polled["credential_id"]) == (200, "approved", None)

    status, audit = await call(
        broker, world.admin, "GET", f"/v1/audit?workflow_id={run_id}&type=approval.decided"
    )
    assert status == 200, audit
    steps = [
        (e["payload"]["decision"], e["actor"], e["credential_id"])
        for e in audit["events"]
        if e["approval_id"] == approval_id
    ]
    assert [step[:2] for step in steps] == [
        ("approve", world.principal("bob")),
        ("use", world.agent_id),
        ("release", "tasklease"),
        ("use", world.agent_id),
        ("release", "tasklease"),
    ]
    first, second = steps[1][2], steps[3][2]
    assert first != second and (steps[2][2], steps[4][2]) == (first, second)
    # No record of either attempt is left: nothing exists to revoke.
    for credential_id in (first, second):
        status, _ = await call(broker, world.agent, "GET", f"/v1/credentials/{credential_id}")
        assert status == 404
