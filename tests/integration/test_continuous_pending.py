"""A withdrawn approval's re-evaluation survives a broker stop, on the real stack.

A credential (a real OpenBao task token, recorded in the Redis ledger) was issued with an
approval for a target that needs one. The approval is withdrawn in the real approval store;
the re-evaluation is noted in Redis, then Redis goes down before its first attempt can read
the ledger, so the attempt fails and a retry waits. The broker stops. Redis comes back; a new
authorizer (a new process: its own connections) resumes the noted re-evaluation at start-up,
which revokes the task token in OpenBao and records the revocation in the ledger.

And the wiring: a broker started through bootstrap resumes a record a stopped broker left in
Redis, although the decision-inputs marker says nothing else needs deciding.

And the window before the first attempt: the approvals use case notes the re-evaluation
before it stores the withdrawal, so a broker killed right after the approval store's write
(before the audit event, the webhook and the re-evaluation) leaves a note the next broker
resumes, which revokes the real task token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from broker.adapters.clock import SystemClock
from broker.adapters.config_files import load_target_catalog
from broker.adapters.memory_audit import MemoryAuditTrail
from broker.adapters.redis_approvals import RedisApprovalStore
from broker.adapters.redis_ledger import RedisLedger
from broker.adapters.redis_reevaluation import (
    RedisPendingScopeRecords,
    RedisReevaluationMarkers,
    pending_key,
)
from broker.adapters.vault import VaultMinter
from broker.approvals import Approvals
from broker.config import RedisSettings
from broker.continuous import (
    APPROVAL,
    ApprovalStoreStates,
    ContinuousAuthorizer,
    ReevaluatingWithdrawals,
)
from broker.core.approvals import Approval, ApprovalStatus, ApprovalSubject, Verdict
from broker.core.audit import CredentialRevoked, EventType
from broker.core.authn import Caller
from broker.core.identity import AuthMethod, WorkloadIdentity
from broker.core.model import LeaseState, Sensitivity, TargetKind, WorkflowRun
from broker.core.ports import PENDING_APPROVAL, PendingScopeRecord
from broker.core.roles import Role
from broker.core.spiffe_id import SpiffeId
from broker.devstack import DevStack
from broker.policy_reload import LivePolicy
from broker.revocation import Revoker
from tests.integration.clients import (
    DEMO_ORCHESTRATOR,
    DEMO_ROLES,
    StartBroker,
    broker_minter_and_ledger,
    demo_kv_lease,
    demo_policy_engine,
    issue_recorded,
    token_alive,
)

pytestmark = pytest.mark.stack

AGENT = "spiffe://tasklease.test/agent/demo"
RUN = "wf-pending"
# demo-kv made restricted: a credential for it is allowed only with a granted approval.
TARGETS = load_target_catalog(Path("config/targets.toml"))
RESTRICTED = {
    **TARGETS,
    "demo-kv": dataclasses.replace(TARGETS["demo-kv"], sensitivity=Sensitivity.RESTRICTED),
}


@pytest.fixture
async def parts(stack: DevStack) -> AsyncIterator[tuple[RedisLedger, VaultMinter]]:
    """A Redis ledger in its own namespace, and the broker's minter logged into OpenBao."""
    async with broker_minter_and_ledger(stack, "cp") as (minter, ledger):
        yield ledger, minter


class RedisStoppingRecords(RedisPendingScopeRecords):
    """Stops the stack's Redis right after the pending record is stored: the first attempt
    of the re-evaluation then finds Redis down."""

    def __init__(self, stack: DevStack, ledger: RedisLedger) -> None:
        super().__init__(client=ledger.client, namespace=ledger.namespace)
        self._stack = stack
        self.stopped = False

    async def note_pending(self, record: PendingScopeRecord) -> None:
        await super().note_pending(record)
        await asyncio.to_thread(self._stack.processes["redis"].stop)
        self.stopped = True


def authorizer(
    ledger: RedisLedger,
    minter: VaultMinter,
    audit: MemoryAuditTrail,
    pending: RedisPendingScopeRecords,
    *,
    retry: timedelta,
) -> ContinuousAuthorizer:
    clock = SystemClock()
    return ContinuousAuthorizer(
        ledger=ledger,
        policy=LivePolicy(demo_policy_engine()),
        targets=RESTRICTED,
        roles=DEMO_ROLES,
        revoker=Revoker(ledger=ledger, minter=minter, clock=clock, audit=audit),
        clock=clock,
        audit=audit,
        approvals=ApprovalStoreStates(
            RedisApprovalStore(client=ledger.client, namespace=ledger.namespace)
        ),
        pending=pending,
        writer="pending-test",
        retry_base=retry,
        retry_cap=retry,
    )


async def test_a_withdrawal_cut_short_by_a_stop_is_revoked_by_the_next_broker(
    stack: DevStack, parts: tuple[RedisLedger, VaultMinter]
) -> None:
    ledger, minter = parts
    approval, accessor = await credential_under(
        stack,
        parts,
        lambda: withdrawn_approval(ledger, "cred_pending_001", "t-approved"),
        credential_id="cred_pending_001",
        task_id="t-approved",
        purpose="a withdrawn approval survives a stop",
    )

    # The first broker: notes the re-evaluation, then Redis goes down under its first attempt.
    stopping = RedisStoppingRecords(stack, ledger)
    first = authorizer(ledger, minter, MemoryAuditTrail(), stopping, retry=timedelta(seconds=60))
    try:
        with capture_logs() as logs:
            assert await first.approval_withdrawn(approval) is None
            assert stopping.stopped
            (waiting,) = first.pending()
            assert (waiting.scope.kind, waiting.error) == (APPROVAL, "ledger.unreachable")
            await first.close()  # the broker stops with the retry pending
    finally:
        await asyncio.to_thread(stack.restart_redis)
    assert [e["records"] for e in logs if e["event"] == "continuous.pending_kept"] == [1]
    assert await asyncio.to_thread(token_alive, stack, accessor)  # still live after the stop

    # The next broker: its own connections to the same Redis, the same OpenBao.
    second_ledger = RedisLedger(
        settings=RedisSettings(url=stack.endpoints.redis_url),  # type: ignore[union-attr]
        namespace=ledger.namespace,
    )
    audit = MemoryAuditTrail()
    pending = RedisPendingScopeRecords(
        client=second_ledger.client, namespace=second_ledger.namespace
    )
    assert len((await pending.read_pending(limit=10)).records) == 1
    second = authorizer(second_ledger, minter, audit, pending, retry=timedelta(milliseconds=200))
    try:
        with capture_logs() as logs:
            second.resume_pending()
            await asyncio.wait_for(second.drain(), timeout=60)
        # Revoked in OpenBao and in the ledger, audited, and the record cleared.
        assert not await asyncio.to_thread(token_alive, stack, accessor)
        (resumed,) = [e for e in logs if e["event"] == "continuous.pending_resumed"]
        assert (resumed["count"], resumed["each_scope"]) == (1, True)
        stored = await second_ledger.get_lease("cred_pending_001")
        assert stored is not None
        assert (stored.state, stored.revoke_reason) == (
            LeaseState.REVOKED,
            "continuous_authorization",
        )
        (event,) = [e for e in audit.events if e.type is EventType.CREDENTIAL_REVOKED]
        assert isinstance(event.payload, CredentialRevoked)
        assert event.approval_id == approval.id
        assert "start-up: resumed" in event.payload.reason
        assert f"approval {approval.id} was withdrawn by carol@example.test" in (
            event.payload.reason
        )
        assert await second_ledger.client.hlen(pending_key(ledger.namespace)) == 0
        assert second.pending() == []
    finally:
        await second.close()
        await second_ledger.close()


# --------------------------------------------------------------------------- a started broker

_REDIS_DB = 12


@pytest.fixture
def redis_url(stack: DevStack) -> str:
    """A Redis database of this test's own (flushed): a started broker decides the live
    leases of its ledger, and this test must only see its own."""
    assert stack.endpoints is not None
    base, _, database = stack.endpoints.redis_url.rpartition("/")
    assert database == "0"
    url = f"{base}/{_REDIS_DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


async def until(probe: Callable[[], Awaitable[bool]], *, within: float = 20.0) -> None:
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.1)


async def test_a_started_broker_resumes_a_withdrawal_a_stopped_broker_left_pending(
    stack: DevStack, start: StartBroker, redis_url: str
) -> None:
    """The wiring: bootstrap gives the authorizer the Redis records and resumes them at
    start-up, even when the decision-inputs marker says nothing else needs deciding."""
    env = {
        "TASKLEASE_REDIS__URL": redis_url,
        "TASKLEASE_POLICY__RELOAD_INTERVAL_SECONDS": "0",
        # This test's ledger is not the other tests' (db 0): its reconciler must not take
        # their live task tokens for orphans.
        "TASKLEASE_VAULT__RECONCILE_GRACE_SECONDS": "86400",
    }
    first = await start(**env)
    assert first.runtime.continuous is not None
    inputs = first.runtime.continuous.inputs_digest()
    markers = RedisReevaluationMarkers(
        client=first.runtime.ledger.client, namespace=first.runtime.ledger.namespace
    )

    async def marked() -> bool:
        marker = await markers.last_reevaluated()
        return marker is not None and marker.digest == inputs

    await until(marked)  # a fresh ledger: nothing to decide, the digest is noted

    # What a broker stopped mid-withdrawal leaves: a live credential for the restricted
    # prod-db (a real OpenBao task token), its approval withdrawn, the re-evaluation noted.
    ledger, minter = first.runtime.ledger, first.runtime.minter
    now = SystemClock().now()
    assert await ledger.create_run(
        WorkflowRun(
            id=RUN,
            owner="alice@example.test",
            purpose="a withdrawn approval survives a stop",
            started_by=DEMO_ORCHESTRATOR,
            created_at=now,
            deadline=now + timedelta(hours=1),
            labels={"ticket": "CHG-1"},
        )
    )
    approval = await withdrawn_approval(ledger, "cred_pending_002", "t-prod", target="prod-db")
    lease = await issue_recorded(
        ledger,
        minter,
        dataclasses.replace(
            demo_kv_lease(
                "cred_pending_002", workflow_id=RUN, task_id="t-prod", holder=AGENT, now=now
            ),
            target="prod-db",
            kind=TargetKind.DATABASE,
            sensitivity=Sensitivity.RESTRICTED,
            approval_id=approval.id,
        ),
    )
    pending = RedisPendingScopeRecords(client=ledger.client, namespace=ledger.namespace)
    await pending.note_pending(
        PendingScopeRecord(
            id="pnd_" + "c" * 24,
            kind=PENDING_APPROVAL,
            key=approval.id,
            workflow_id=RUN,
            task_id="t-prod",
            reason=f"approval {approval.id} was withdrawn by carol@example.test",
            noted_at=now,
            noted_by="a-stopped-broker",
        )
    )
    assert await asyncio.to_thread(token_alive, stack, lease.token_accessor)

    with capture_logs() as logs:
        second = await start(**env)
        assert second.runtime.continuous is not None

        async def revoked() -> bool:
            return not await asyncio.to_thread(token_alive, stack, lease.token_accessor)

        await until(revoked)
        await asyncio.wait_for(second.runtime.continuous.drain(), timeout=20)

    assert [e["event"] for e in logs if e["event"].startswith("continuous.inputs")] == [
        "continuous.inputs_unchanged"
    ]
    (resumed,) = [e for e in logs if e["event"] == "continuous.pending_resumed"]
    assert (resumed["count"], resumed["each_scope"]) == (1, True)
    stored = await second.runtime.ledger.get_lease(lease.credential_id)
    assert stored is not None
    assert (stored.state, stored.revoke_reason) == (LeaseState.REVOKED, "continuous_authorization")
    assert (await pending.read_pending(limit=10)).records == ()


# --------------------------------------------------------------------------- killed mid-withdrawal


class Killed(BaseException):
    """The broker process dies here: nothing after this point runs (not an ``Exception``, so
    no handler of the code under test sees it)."""


class DyingApprovalStore(RedisApprovalStore):
    """The real approval store; the broker is killed right after it wrote a withdrawal."""

    async def save_approval(self, approval: Approval, *, expected_version: int) -> bool:
        saved = await super().save_approval(approval, expected_version=expected_version)
        if saved and approval.state is ApprovalStatus.WITHDRAWN:
            raise Killed
        return saved


async def used_approval(
    ledger: RedisLedger, credential_id: str, task_id: str, *, target: str = "demo-kv"
) -> Approval:
    """An approval for the credential's request, approved by bob and used for
    ``credential_id``, each step stored in the real approval store."""
    store = RedisApprovalStore(client=ledger.client, namespace=ledger.namespace)
    now = SystemClock().now()
    lease = demo_kv_lease(credential_id, workflow_id=RUN, task_id=task_id, holder=AGENT, now=now)
    opened = Approval.open(
        subject=ApprovalSubject(
            workflow_id=RUN, task_id=task_id, target=target, ttl_seconds=300, holder=AGENT
        ),
        owner="alice@example.test",
        chain=lease.chain,
        now=now,
        validity=timedelta(hours=1),
        policy_ids=("restricted-needs-approval",),
    )
    assert await store.create_approval(opened, replaces=None)
    approved = opened.decide(
        approver="bob@example.test", display="Bob", verdict=Verdict.APPROVE, now=now
    )
    assert await store.save_approval(approved, expected_version=opened.version)
    used = approved.consume(digest=opened.digest, credential_id=credential_id, now=now)
    assert await store.save_approval(used, expected_version=approved.version)
    return used


async def withdrawn_approval(
    ledger: RedisLedger, credential_id: str, task_id: str, *, target: str = "demo-kv"
) -> Approval:
    """:func:`used_approval`, then withdrawn by carol (stored)."""
    used = await used_approval(ledger, credential_id, task_id, target=target)
    store = RedisApprovalStore(client=ledger.client, namespace=ledger.namespace)
    withdrawn = used.withdraw(
        by="carol@example.test", now=SystemClock().now(), comment="no longer needed"
    )
    assert await store.save_approval(withdrawn, expected_version=used.version)
    return withdrawn


async def credential_under(
    stack: DevStack,
    parts: tuple[RedisLedger, VaultMinter],
    approval: Callable[[], Awaitable[Approval]],
    *,
    credential_id: str,
    task_id: str,
    purpose: str,
) -> tuple[Approval, str]:
    """A run, the approval ``approval`` makes for ``credential_id``, and a demo-kv credential
    issued under it (a real, live OpenBao task token): the approval and the token's accessor."""
    ledger, minter = parts
    now = SystemClock().now()
    assert await ledger.create_run(
        WorkflowRun(
            id=RUN,
            owner="alice@example.test",
            purpose=purpose,
            started_by=DEMO_ORCHESTRATOR,
            created_at=now,
            deadline=now + timedelta(hours=1),
        )
    )
    made = await approval()
    lease = await issue_recorded(
        ledger,
        minter,
        dataclasses.replace(
            demo_kv_lease(credential_id, workflow_id=RUN, task_id=task_id, holder=AGENT, now=now),
            approval_id=made.id,
        ),
    )
    assert await asyncio.to_thread(token_alive, stack, lease.token_accessor)
    return made, lease.token_accessor


async def test_a_broker_killed_right_after_storing_a_withdrawal_leaves_it_to_the_next(
    stack: DevStack, parts: tuple[RedisLedger, VaultMinter]
) -> None:
    ledger, minter = parts
    approval, accessor = await credential_under(
        stack,
        parts,
        lambda: used_approval(ledger, "cred_killed_001", "t-killed"),
        credential_id="cred_killed_001",
        task_id="t-killed",
        purpose="a withdrawal survives its broker being killed",
    )

    # The first broker, wired as bootstrap wires it; killed once the withdrawal is written.
    pending = RedisPendingScopeRecords(client=ledger.client, namespace=ledger.namespace)
    first = authorizer(ledger, minter, MemoryAuditTrail(), pending, retry=timedelta(seconds=60))
    approvals = Approvals(
        store=DyingApprovalStore(client=ledger.client, namespace=ledger.namespace),
        audit=MemoryAuditTrail(),
        clock=SystemClock(),
        withdrawal_hook=ReevaluatingWithdrawals(first),
    )
    admin = Caller(
        WorkloadIdentity(
            SpiffeId.parse("spiffe://tasklease.test/admin/demo"),
            SystemClock().now() + timedelta(hours=1),
            AuthMethod.X509_SVID,
        ),
        frozenset({Role.ADMIN}),
    )
    try:
        with pytest.raises(Killed):
            await approvals.withdraw(admin, approval.id, comment="wrong ticket")
    finally:
        await first.close()  # the process is gone: nothing it queued runs

    store = RedisApprovalStore(client=ledger.client, namespace=ledger.namespace)
    stored = await store.get_approval(approval.id)
    assert stored is not None and stored.state is ApprovalStatus.WITHDRAWN
    (noted,) = (await pending.read_pending(limit=10)).records
    assert (noted.key, noted.task_id) == (approval.id, "t-killed")
    assert await asyncio.to_thread(token_alive, stack, accessor)  # nobody decided it yet

    # The next broker: its own connections to the same Redis, the same OpenBao.
    second_ledger = RedisLedger(
        settings=RedisSettings(url=stack.endpoints.redis_url),  # type: ignore[union-attr]
        namespace=ledger.namespace,
    )
    audit = MemoryAuditTrail()
    second_pending = RedisPendingScopeRecords(
        client=second_ledger.client, namespace=second_ledger.namespace
    )
    second = authorizer(
        second_ledger, minter, audit, second_pending, retry=timedelta(milliseconds=200)
    )
    try:
        second.resume_pending()
        await asyncio.wait_for(second.drain(), timeout=60)
        assert not await asyncio.to_thread(token_alive, stack, accessor)
        revoked = await second_ledger.get_lease("cred_killed_001")
        assert revoked is not None
        assert (revoked.state, revoked.revoke_reason) == (
            LeaseState.REVOKED,
            "continuous_authorization",
        )
        (event,) = [e for e in audit.events if e.type is EventType.CREDENTIAL_REVOKED]
        assert isinstance(event.payload, CredentialRevoked)
        assert event.approval_id == approval.id
        assert (
            f"start-up: resumed: approval {approval.id} was withdrawn by "
            "spiffe://tasklease.test/admin/demo" in event.payload.reason
        )
        assert await second_ledger.client.hlen(pending_key(ledger.namespace)) == 0
    finally:
        await second.close()
        await second_ledger.close()
