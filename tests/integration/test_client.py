"""The Python SDK (broker.client) against a live broker on the real stack: a task credential
that works and is revoked on exit (also on an exception), waiting for a human approval, a
timeout, the broker's identity check, and a py-spiffe X509Source from the SPIRE agent."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import psycopg
import pytest
from spiffe import X509Source

from broker.bootstrap import RunningBroker
from broker.client import (
    AdminClient,
    AgentClient,
    ApiError,
    ApprovalRefusedError,
    ApprovalTimeoutError,
    Credential,
    OrchestratorClient,
    PemAuth,
    TaskCredential,
    TaskleaseClient,
    X509SourceAuth,
)
from broker.devstack import DevStack
from tests.conftest import remember_secret
from tests.integration.clients import StartBroker, orders_as, workload_id

pytestmark = pytest.mark.stack


def _auth(stack: DevStack, spiffe_id: str, *, broker_id: str | None = None) -> PemAuth:
    minted = stack.mint_x509_svid(spiffe_id, ttl_seconds=600)
    remember_secret(minted["key"])
    return PemAuth(
        bundle=minted["bundle"], chain=minted["svid"], key=minted["key"], broker_id=broker_id
    )


def _broker_id(stack: DevStack) -> str:
    return f"spiffe://{stack.trust_domain}/tasklease/broker"


async def _start_run(stack: DevStack, broker: RunningBroker, **extra: Any) -> str:
    run_id = f"wf-sdk-{secrets.token_hex(3)}"
    async with OrchestratorClient(
        broker.url, _auth(stack, workload_id(stack, "orchestrator"))
    ) as orchestrator:
        run = await orchestrator.start_run(
            run_id,
            owner="alice@example.test",
            purpose="SDK test OPS-1234",
            ttl_seconds=600,
            labels={"ticket": "OPS-1234"},
            participants=[workload_id(stack, "agent")],
            **extra,
        )
    assert run["state"] == "active"
    return run_id


def _pg_login(stack: DevStack, secret: Any) -> int:
    return orders_as(stack, secret["username"], secret["password"])


async def _state(stack: DevStack, broker: RunningBroker, credential_id: str) -> str:
    async with AdminClient(broker.url, _auth(stack, workload_id(stack, "admin"))) as admin:
        return str((await admin.credential(credential_id))["state"])


async def test_a_task_credential_works_inside_the_block_and_is_revoked_after(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    broker = running_broker
    run_id = await _start_run(stack, broker)
    agent = _auth(stack, workload_id(stack, "agent"), broker_id=_broker_id(stack))
    async with TaskCredential(
        broker.url, agent, workflow=run_id, task="load", target="demo-db", ttl_seconds=120
    ) as cred:
        remember_secret(cred.secret["password"])
        assert cred.kind == "database"
        assert 0 < cred.ttl_seconds <= 120
        assert _pg_login(stack, cred.secret) > 0
    assert await _state(stack, broker, cred.credential_id) == "revoked"
    with pytest.raises(psycopg.OperationalError):
        _pg_login(stack, cred.secret)


async def test_the_credential_is_released_when_the_block_raises(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    broker = running_broker
    run_id = await _start_run(stack, broker)
    task = TaskCredential(
        broker.url,
        _auth(stack, workload_id(stack, "agent")),
        workflow=run_id,
        task="boom",
        target="demo-db",
    )
    with pytest.raises(RuntimeError, match="the tool failed"):
        async with task as cred:
            remember_secret(cred.secret["password"])
            raise RuntimeError("the tool failed")
    assert task.credential is not None
    assert await _state(stack, broker, task.credential.credential_id) == "revoked"


class _LosesTheFirstAnswer(AgentClient):
    """The broker mints and answers, but the first credential answer never reaches the
    agent (a connection cut after the request was processed)."""

    lost: dict[str, Any] | None = None

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        status, body = await super().call(method, path, **kwargs)
        if (method, path, self.lost) == ("POST", "/v1/credentials", None):
            remember_secret(body["secret"]["password"])
            self.lost = body
            raise ApiError(0, "unreachable", "client.unreachable", "the answer was lost", {})
        return status, body


async def test_a_credential_whose_answer_was_lost_is_revoked_and_another_issued(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    """The SDK asks again with the same Idempotency-Key, learns that a credential was minted
    (409 replayed, no secret), releases it, and asks under a new key: the agent ends up with
    one working credential, and the one whose secret nobody received no longer logs in."""
    broker = running_broker
    run_id = await _start_run(stack, broker)
    auth = _auth(stack, workload_id(stack, "agent"), broker_id=_broker_id(stack))
    async with _LosesTheFirstAnswer(broker.url, auth, backoff=0.0) as agent:
        cred = await agent.request_credential(
            workflow=run_id, task="lossy", target="demo-db", ttl_seconds=120
        )
        assert isinstance(cred, Credential)
        remember_secret(cred.secret["password"])
        lost = agent.lost
        assert lost is not None
        assert cred.credential_id != lost["credential_id"]
        assert await _state(stack, broker, lost["credential_id"]) == "revoked"
        with pytest.raises(psycopg.OperationalError):
            _pg_login(stack, lost["secret"])
        assert _pg_login(stack, cred.secret) > 0
        await agent.release(cred.credential_id)


async def test_a_restricted_target_waits_for_an_approval_then_issues(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    """202 → the agent polls → an approval bot (approver role) approves → the SDK asks again
    with the approval and gets the credential, which works."""
    broker = running_broker
    run_id = await _start_run(stack, broker)
    approver = AdminClient(
        broker.url, _auth(stack, f"spiffe://{stack.trust_domain}/approval-bot/sdk-test")
    )

    async def approve_when_asked() -> None:
        for _ in range(200):
            pending = [a for a in await approver.approvals() if a["workflow_id"] == run_id]
            if pending:
                await approver.decide(pending[0]["id"], approve=True, comment="ok for OPS-1234")
                return
            await asyncio.sleep(0.1)
        raise AssertionError("no approval was requested")

    deciding = asyncio.create_task(approve_when_asked())
    task = TaskCredential(
        broker.url,
        _auth(stack, workload_id(stack, "agent")),
        workflow=run_id,
        task="prod-read",
        target="prod-db",
        ttl_seconds=60,
        approval_timeout=30,
        poll_seconds=0.2,
    )
    try:
        async with task as cred:
            remember_secret(cred.secret["password"])
            assert task.approval_id is not None
            assert _pg_login(stack, cred.secret) > 0
    finally:
        await deciding
        await approver.close()


async def test_waiting_for_an_approval_times_out_and_a_denial_is_refused(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    broker = running_broker
    run_id = await _start_run(stack, broker)
    agent_auth = _auth(stack, workload_id(stack, "agent"))
    task = TaskCredential(
        broker.url,
        agent_auth,
        workflow=run_id,
        task="prod-read",
        target="prod-db",
        approval_timeout=0.5,
        poll_seconds=0.1,
    )
    with pytest.raises(ApprovalTimeoutError):
        async with task:
            pass
    assert task.approval_id is not None

    async with AdminClient(
        broker.url, _auth(stack, f"spiffe://{stack.trust_domain}/approval-bot/sdk-test")
    ) as approver:
        await approver.decide(task.approval_id, approve=False, comment="not today")
    async with AgentClient(broker.url, agent_auth) as agent:
        with pytest.raises(ApprovalRefusedError) as refused:
            await agent.wait_for_approval(task.approval_id, timeout=5)
    assert refused.value.reason == "approval.denied"


async def test_refusals_are_api_errors_with_the_problem_code(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    broker = running_broker
    async with AgentClient(broker.url, _auth(stack, workload_id(stack, "agent"))) as agent:
        with pytest.raises(ApiError) as caught:
            await agent.request_credential(workflow="wf-nowhere", task="t", target="demo-db")
    assert (caught.value.status, caught.value.reason) == (404, "workflow.not_found")


async def test_a_broker_with_another_spiffe_id_is_refused(
    stack: DevStack, running_broker: RunningBroker
) -> None:
    broker = running_broker
    wrong = _auth(
        stack, workload_id(stack, "agent"), broker_id=f"spiffe://{stack.trust_domain}/evil"
    )
    async with TaskleaseClient(broker.url, wrong) as client:
        with pytest.raises(ApiError) as caught:
            await client.whoami()
    assert caught.value.reason == "client.wrong_broker"
    right = _auth(stack, workload_id(stack, "agent"), broker_id=_broker_id(stack))
    async with TaskleaseClient(broker.url, right) as client:
        assert (await client.whoami())["principal"] == workload_id(stack, "agent")


async def test_an_x509_source_from_the_spire_agent_authenticates(
    stack: DevStack, start: StartBroker
) -> None:
    """The SDK with py-spiffe's X509Source on the real Workload API. This test process is
    registered as the broker workload, which holds no API role: the broker authenticates it
    over mTLS (the refusal names that identity) and then refuses it for want of a role."""
    broker = await start()
    assert stack.endpoints is not None
    socket = f"unix://{stack.endpoints.spire_agent_socket}"
    source = await asyncio.to_thread(X509Source, socket_path=socket, timeout_in_seconds=15)
    try:
        auth = X509SourceAuth(source, broker_id=_broker_id(stack))
        async with TaskleaseClient(broker.url, auth) as client:
            with pytest.raises(ApiError) as caught:
                await client.whoami()
        # TaskCredential also takes the X509Source itself.
        task = TaskCredential(
            broker.url,
            source,
            workflow="wf-nowhere",
            task="t",
            target="demo-db",
            broker_id=_broker_id(stack),
        )
        with pytest.raises(ApiError) as refused:
            async with task:
                pass
    finally:
        source.close()
    assert (refused.value.status, refused.value.reason) == (403, "auth.no_role")
    assert (caught.value.status, caught.value.reason) == (403, "auth.no_role")
    assert _broker_id(stack) in caught.value.detail
